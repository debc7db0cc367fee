"""Greedy captioning, batched, with the generation settings of InternVL's caption evaluation."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from captune.inputs.processor import Processor
from captune.inputs.tiling import normalize


@dataclass(frozen=True)
class GenerationSettings:
    """InternVL's `evaluate_caption.py`: greedy, 8 to 30 new tokens."""

    max_new_tokens: int = 30
    min_new_tokens: int = 8
    num_beams: int = 1


def generation_config(processor: Processor, settings: GenerationSettings):
    from transformers import GenerationConfig

    return GenerationConfig(
        do_sample=False,
        num_beams=settings.num_beams,
        max_new_tokens=settings.max_new_tokens,
        min_new_tokens=settings.min_new_tokens,
        eos_token_id=processor.stop_token_id,
        pad_token_id=processor.pad_token_id,
    )


ENGINES = ("static", "generate")


def model_inputs(model, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A collated batch on the model's (input) device, tiles normalised there in the model's dtype."""
    device = model.device
    return {
        "input_ids": batch["input_ids"].to(device, non_blocking=True),
        "attention_mask": batch["attention_mask"].to(device, non_blocking=True),
        "pixel_values": normalize(batch["pixel_values"].to(device, non_blocking=True)).to(model.dtype),
    }


@torch.inference_mode()
def generate_ids(model, processor: Processor, batch: dict[str, torch.Tensor], settings: GenerationSettings) -> torch.Tensor:
    """The new token ids `[B, <= max_new_tokens]` of a collated (left-padded) batch, by transformers' `generate`."""
    inputs = model_inputs(model, batch)
    out = model.generate(**inputs, generation_config=generation_config(processor, settings))
    return out[:, inputs["input_ids"].shape[1] :]


class Captioner:
    """Collated batches to captions. `engine`: "static", captune's decoder (`eval/greedy.py`: a static cache and,
    on one GPU, a CUDA-graphed step), or "generate", transformers' `generate` (the same tokens; used for attention
    implementations other than SDPA, whose masks the static decoder does not build). Holds the decoder's buffers
    until `close` (or the end of a `with` block)."""

    def __init__(self, model, processor: Processor, settings: GenerationSettings, engine: str = "static"):
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, not {engine!r}")
        attn = getattr(model.config.get_text_config(), "_attn_implementation", "sdpa")
        if settings.num_beams != 1 or attn != "sdpa":
            engine = "generate"
        self.model, self.processor, self.settings, self.engine = model, processor, settings, engine
        self.decoder = None
        if engine == "static":
            from captune.eval.greedy import GreedyDecoder

            self.decoder = GreedyDecoder(model, processor.stop_token_id, processor.pad_token_id,
                                         settings.max_new_tokens, settings.min_new_tokens)

    def ids(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The new token ids `[B, <= max_new_tokens]` of a collated batch, on the CPU."""
        if self.decoder is None:
            return generate_ids(self.model, self.processor, batch, self.settings).cpu()
        return self.decoder(**model_inputs(self.model, batch)).cpu()

    def __call__(self, batch: dict[str, torch.Tensor]) -> list[str]:
        return [self.processor.decode(row) for row in self.ids(batch)]

    def close(self) -> None:
        if self.decoder is not None:
            self.decoder.close()

    def __enter__(self) -> Captioner:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# A backslash, and what would break a caption over several lines (where `str.splitlines` splits), as Python writes them.
_ONE_LINE = str.maketrans({c: repr(c)[1:-1] for c in "\\\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"})


def one_line(caption: str) -> str:
    """A caption as one line of output: a newline becomes the two characters `\\n`, a backslash `\\\\` (and any other
    line break its Python escape: `\\r`, `\\x85`, `\\u2028`, ...), so that one image is always one line."""
    return caption.translate(_ONE_LINE)


def caption_images(
    model,
    processor: Processor,
    images: list,
    question: str | None = None,
    max_tiles: int = 6,
    batch_size: int = 8,
    settings: GenerationSettings = GenerationSettings(),
    engine: str = "static",
) -> list[str]:
    """Caption images (PIL images or paths); one string per image, in order (`engine`: see `Captioner`)."""
    from captune.inputs.processor import DEFAULT_QUESTION

    question = question or DEFAULT_QUESTION
    captions: list[str] = []
    with Captioner(model, processor, settings, engine) as captioner:
        for start in range(0, len(images), batch_size):
            captions += captioner(processor(images[start : start + batch_size], question=question, max_tiles=max_tiles))
    return captions
