"""The processor: from (image, question) to the model's inputs, and from generated ids back to a caption.

transformers' own InternVL processor tiles images with GotOcr2's image processor, which is not pixel-identical
to InternVL2's, and its chat template differs from the one the releases were trained with; so captune keeps
its own: InternVL2's tiling (`tiling.py`) and conversation templates (`templates.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from captune.inputs.templates import (
    Template,
    encode_prompt,
    stop_token_id,
)
from captune.inputs.tiling import count_tiles, normalize, tile_pixels

DEFAULT_QUESTION = "Provide a one-sentence caption for the provided image."


@dataclass
class Processor:
    tokenizer: Any
    template: Template
    tile_size: int = 448
    max_tiles: int = 12
    min_tiles: int = 1
    thumbnail: bool = True
    dynamic: bool = True
    tokens_per_tile: int = 256
    # a prompt depends only on the question and the tile count
    _prompt_cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def stop_token_id(self) -> int:
        return stop_token_id(self.tokenizer, self.template)

    @property
    def pad_token_id(self) -> int:
        tok = self.tokenizer
        return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def _tiling(self, max_tiles: int | None) -> dict[str, Any]:
        max_tiles = (max_tiles or self.max_tiles) if self.dynamic else 1
        return {"max_tiles": max_tiles, "tile_size": self.tile_size, "thumbnail": self.thumbnail,
                "min_tiles": min(self.min_tiles, max_tiles)}

    def tile(self, image: Image.Image | str | Path, max_tiles: int | None = None) -> torch.Tensor:
        """InternVL2's dynamic tiling: `[n, 3, S, S]`, the thumbnail last."""
        return normalize(self.tile_uint8(image, max_tiles)).contiguous()

    def tile_uint8(self, image: Image.Image | str | Path, max_tiles: int | None = None) -> torch.Tensor:
        """The same tiles before normalisation (uint8), for moving to the GPU cheaply; see `tiling.normalize`."""
        return tile_pixels(image, **self._tiling(max_tiles))

    def num_tiles(self, path: str | Path, max_tiles: int | None = None) -> int:
        """The tile count of an image file from its header alone (no decoding); raises if it cannot be read."""
        with Image.open(path) as im:
            return self.tiles_for_size(*im.size, max_tiles=max_tiles)

    def tiles_for_size(self, width: int, height: int, max_tiles: int | None = None) -> int:
        """The tile count of a `width` x `height` image (the thumbnail included), as `tile` makes them."""
        return count_tiles(width, height, **self._tiling(max_tiles))

    def prompt_ids(self, question: str, num_tiles: int) -> list[int]:
        key = (question, num_tiles)
        if key not in self._prompt_cache:
            self._prompt_cache[key] = encode_prompt(self.tokenizer, question, num_tiles * self.tokens_per_tile,
                                                    self.template)
        return list(self._prompt_cache[key])

    def prepare(
        self, image: Image.Image | str | Path, question: str = DEFAULT_QUESTION, max_tiles: int | None = None
    ) -> dict[str, Any]:
        """One sample: `input_ids` (a list) and `pixel_values`, uint8 tiles `[n, 3, S, S]` (normalised on the
        model's device by `generate`). Runs in DataLoader workers."""
        pixel_values = self.tile_uint8(image, max_tiles)
        return {"input_ids": self.prompt_ids(question, pixel_values.shape[0]), "pixel_values": pixel_values}

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Left-pad prompts to one length (generation appends on the right) and stack all tiles."""
        length = max(len(s["input_ids"]) for s in samples)
        input_ids = torch.full((len(samples), length), self.pad_token_id, dtype=torch.long)  # [B, T]
        attention_mask = torch.zeros((len(samples), length), dtype=torch.long)  # [B, T]
        for i, s in enumerate(samples):
            n = len(s["input_ids"])
            input_ids[i, length - n :] = torch.tensor(s["input_ids"], dtype=torch.long)
            attention_mask[i, length - n :] = 1
        pixel_values = torch.cat([s["pixel_values"] for s in samples])  # [sum of tiles, 3, S, S]
        return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values}

    def __call__(
        self, images: list[Image.Image | str | Path], question: str = DEFAULT_QUESTION, max_tiles: int | None = None
    ) -> dict[str, torch.Tensor]:
        return self.collate([self.prepare(image, question, max_tiles) for image in images])

    def decode(self, ids: list[int] | torch.Tensor) -> str:
        """The answer as model.chat() returns it: up to the stop token, special tokens dropped, stripped."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        if self.stop_token_id in ids:
            ids = ids[: ids.index(self.stop_token_id)]
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        return text.split(self.template.stop)[0].strip()
