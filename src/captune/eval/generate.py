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


@torch.inference_mode()
def generate_ids(model, processor: Processor, batch: dict[str, torch.Tensor], settings: GenerationSettings) -> torch.Tensor:
    """The new token ids `[B, <= max_new_tokens]` for a collated (left-padded) batch."""
    device = model.device
    inputs = {
        "input_ids": batch["input_ids"].to(device, non_blocking=True),
        "attention_mask": batch["attention_mask"].to(device, non_blocking=True),
        "pixel_values": normalize(batch["pixel_values"].to(device, non_blocking=True)).to(model.dtype),
    }
    out = model.generate(**inputs, generation_config=generation_config(processor, settings))
    return out[:, inputs["input_ids"].shape[1] :]


def caption_batch(model, processor: Processor, batch: dict[str, torch.Tensor], settings: GenerationSettings) -> list[str]:
    return [processor.decode(row) for row in generate_ids(model, processor, batch, settings)]


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
) -> list[str]:
    """Caption images (PIL images or paths); one string per image, in order."""
    from captune.inputs.processor import DEFAULT_QUESTION

    question = question or DEFAULT_QUESTION
    captions: list[str] = []
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        batch = processor(chunk, question=question, max_tiles=max_tiles)
        captions += caption_batch(model, processor, batch, settings)
    return captions
