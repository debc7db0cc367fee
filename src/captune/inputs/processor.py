"""The processor: from (image, question) to the model's inputs, and from generated ids back to a caption.

transformers' own InternVL processor tiles images with GotOcr2's image processor, which is not pixel-identical
to InternVL2's, and its chat template differs from the one the releases were trained with; so captune keeps
its own: InternVL2's tiling (`tiling.py`) and conversation templates (`templates.py`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
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

    def collate(self, samples: list[dict[str, Any]], pin_memory: bool = False) -> dict[str, torch.Tensor]:
        """Left-pad prompts to one length (generation appends on the right) and stack all tiles (`pin_memory`: into
        page-locked memory, for an asynchronous copy to a GPU)."""
        length = max(len(s["input_ids"]) for s in samples)
        input_ids = torch.full((len(samples), length), self.pad_token_id, dtype=torch.long)  # [B, T]
        attention_mask = torch.zeros((len(samples), length), dtype=torch.long)  # [B, T]
        for i, s in enumerate(samples):
            n = len(s["input_ids"])
            input_ids[i, length - n :] = torch.tensor(s["input_ids"], dtype=torch.long)
            attention_mask[i, length - n :] = 1
        tiles = [s["pixel_values"] for s in samples]
        pixel_values = torch.empty((sum(len(t) for t in tiles), *tiles[0].shape[1:]), dtype=tiles[0].dtype,
                                   pin_memory=pin_memory)
        torch.cat(tiles, out=pixel_values)  # [sum of tiles, 3, S, S]
        return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values}

    def __call__(
        self, images: list[Image.Image | str | Path], question: str = DEFAULT_QUESTION, max_tiles: int | None = None
    ) -> dict[str, torch.Tensor]:
        return self.collate([self.prepare(image, question, max_tiles) for image in images])

    def decode(self, ids: list[int] | torch.Tensor) -> str:
        """The answer as model.chat() returns it: up to the stop token, special tokens dropped, stripped; byte pieces
        decoded as the original's SentencePiece decodes them, spaces cleaned up as it does (`decode_ids`)."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        if self.stop_token_id in ids:
            ids = ids[: ids.index(self.stop_token_id)]
        text = decode_ids(self.tokenizer, ids, skip_special_tokens=True)
        return text.split(self.template.stop)[0].strip()


# ------------------------------------------------------------------------------ decoding byte pieces as SentencePiece
#
# SentencePiece (the original slow tokenizers: InternLM2's, Llama's for Phi-3) decodes a run of consecutive byte
# pieces `<0x00>`..`<0xFF>` as UTF-8 one character at a time: where a well-formed character starts it is decoded
# (its 1 to 4 bytes), otherwise that one byte becomes U+FFFD and decoding goes on at the next byte (DecodeUTF8 and
# the byte-piece handling of sentencepiece_processor.cc). tokenizers' `ByteFallback` decoder instead turns a whole run
# into one U+FFFD per byte as soon as the run is not valid UTF-8: `<0x0B><0xD6>` is "\x0b\ufffd" for the original,
# "\ufffd\ufffd" for it. The decoder captune builds for InternLM2 (`internvl.tokenizer`) already splits runs at ASCII
# and never-valid bytes, but a run mixing whole multi-byte characters with invalid bytes (an emoji, then one cut short
# by the end of generation) is beyond what a tokenizers decoder can express; `decode_ids` cuts such runs into
# SentencePiece's characters before the tokenizer's own decoder sees them.

# a token that tokenizers' ByteFallback reads as a byte (it parses the two characters after "<0x" in base 16)
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2}|\+[0-9A-Fa-f])>")


def decode_ids(tokenizer: Any, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
    """The text the original (transformers 4.37) decoding gives: `tokenizer.decode(ids, skip_special_tokens=...)`,
    with runs of byte-fallback pieces decoded as SentencePiece decodes them (see above), and tokenization spaces
    cleaned up (transformers' `clean_up_tokenization`: " ." -> ".", " 's" -> "'s", ...) when the tokenizer's
    `clean_up_tokenization_spaces` is on, as 4.37 does for any tokenizer (transformers 5's `decode` skips it for BPE
    ones, e.g. Llama 3's). InternLM2's original tokenizer cleans up always, so captune builds it with the flag on
    (`internvl.tokenizer`)."""
    ids = [int(i) for i in ids]
    text = _decode_bytes_as_sentencepiece(tokenizer, ids, skip_special_tokens)
    return tokenizer.clean_up_tokenization(text) if getattr(tokenizer, "clean_up_tokenization_spaces", False) else text


def _decode_bytes_as_sentencepiece(tokenizer: Any, ids: list[int], skip_special_tokens: bool) -> str:
    """`tokenizer.decode` without clean-up, except that runs of byte pieces decode as SentencePiece decodes them,
    whatever the ids. Tokenizers without a `ByteFallback` decoder (byte-level BPE, slow tokenizers) decode as they
    are."""
    text = tokenizer.decode(ids, skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False)
    if "\ufffd" not in text:  # ByteFallback decodes a run differently only when it gives U+FFFD
        return text
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None)
    if decoder is None or b'"ByteFallback"' not in decoder.__getstate__():
        return text
    # the tokens tokenizers' Tokenizer.decode gives its decoder: unknown ids and (by content) special tokens dropped
    special = {t.content for t in backend.get_added_tokens_decoder().values() if t.special} if skip_special_tokens else ()
    tokens = [t for i in ids if (t := backend.id_to_token(i)) is not None and t not in special]
    cut = _cut_byte_runs(tokens)
    if len(cut) == len(tokens):
        return text
    plain, exact = decoder.decode(tokens), decoder.decode(cut)
    return exact if text == plain else text  # else decoded some other way: leave it


def _cut_byte_runs(tokens: list[str]) -> list[str]:
    """`tokens` with an empty token (which every decoder step passes through as nothing) between the characters of
    each run of byte tokens, so that ByteFallback decodes each SentencePiece character (or invalid byte) alone."""
    out: list[str] = []
    run: list[int] = []
    for token in [*tokens, None]:
        m = _BYTE_TOKEN.fullmatch(token) if token is not None else None
        if m:
            run.append(len(out))
            out.append(token)
            continue
        if len(run) > 1:
            data = bytes(int(out[k][3:5], 16) for k in run)
            at, pieces = 0, []
            while at < len(data):
                n = _char_length(data, at)
                pieces.append(out[run[at] : run[at] + n])
                at += n
            del out[run[0] :]
            for piece in pieces:
                out += [*piece, ""]
            out.pop()
        run = []
        if token is not None:
            out.append(token)
    return out


def _char_length(data: bytes, at: int) -> int:
    """The length of the well-formed UTF-8 character starting at `data[at]`, or 1 where none does (SentencePiece's
    DecodeUTF8: no overlong forms, surrogates or code points past U+10FFFF; a truncated character is invalid)."""
    lead = data[at]
    n = 1 if lead < 0x80 else 2 if lead < 0xE0 else 3 if lead < 0xF0 else 4
    if n == 1:
        return 1
    try:
        data[at : at + n].decode("utf-8")  # fails on a truncated character too: fewer than n bytes are left
    except UnicodeDecodeError:
        return 1
    return n
