"""Greedy captioning, batched, with the generation settings of InternVL's caption evaluation."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch

from captune.inputs.processor import Processor
from captune.inputs.tiling import normalize
from captune.internvl.plan import COMPILE_FROM_IMAGES  # measured with the plan's other evaluation figures


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
_END = object()


def compile_choice(setting: str, images: int, device: torch.device) -> bool:
    """--compile on/off/auto for `images` images on `device` (auto: on a GPU from `COMPILE_FROM_IMAGES`)."""
    if setting not in ("auto", "on", "off"):
        raise ValueError(f"compile must be auto, on or off, not {setting!r}")
    if setting == "auto":
        return device.type == "cuda" and images >= COMPILE_FROM_IMAGES
    return setting == "on"


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
    on one GPU, a CUDA-graphed step; `compile`: the prompt's repeated blocks compiled), or "generate", transformers'
    `generate` (the same tokens; used for attention implementations other than SDPA, whose masks the static decoder
    does not build). Holds the decoder's buffers until `close` (or the end of a `with` block)."""

    def __init__(self, model, processor: Processor, settings: GenerationSettings, engine: str = "static",
                 compile: bool = False):
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, not {engine!r}")
        attn = getattr(model.config.get_text_config(), "_attn_implementation", "sdpa")
        if settings.num_beams != 1 or attn != "sdpa":
            engine = "generate"
        self.model, self.processor, self.settings, self.engine = model, processor, settings, engine
        self.decoder = None
        self.pending = None  # the new ids of a batch `start`ed with transformers' generate
        if engine == "static":
            from captune.eval.greedy import GreedyDecoder

            self.decoder = GreedyDecoder(model, processor.stop_token_id, processor.pad_token_id,
                                         settings.max_new_tokens, settings.min_new_tokens, compile=compile)

    def start(self, batch: dict[str, torch.Tensor]) -> None:
        """Queue a collated batch on the GPU (with `generate`: caption it)."""
        if self.decoder is None:
            self.pending = generate_ids(self.model, self.processor, batch, self.settings).cpu()
            return
        padded = not bool(batch["attention_mask"].all())  # asked of the host copy: no wait for the GPU
        self.decoder.start(**model_inputs(self.model, batch), padded=padded)

    def finish(self) -> torch.Tensor:
        """The new token ids `[B, <= max_new_tokens]` of the batch `start`ed, on the CPU."""
        if self.decoder is None:
            ids, self.pending = self.pending, None
            return ids
        return self.decoder.finish().to("cpu", copy=True)  # a copy also on the CPU: the next batch reuses the buffer

    def ids(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The new token ids `[B, <= max_new_tokens]` of a collated batch, on the CPU."""
        self.start(batch)
        return self.finish()

    def texts(self, ids: torch.Tensor) -> list[str]:
        return [self.processor.decode(row) for row in ids]

    def __call__(self, batch: dict[str, torch.Tensor]) -> list[str]:
        return self.texts(self.ids(batch))

    def overlapped(self, items: Iterable, batch_of: Callable) -> Iterator[tuple[object, list[str]]]:
        """(item, captions) for each item of `items`, in order, where `batch_of(item)` is its collated batch (None:
        no captions). Each batch is started on the GPU before the previous batch's captions are decoded and given
        out, so that the caller's work on them (writing, progress) overlaps the GPU's on the next batch."""
        # record_function: the loop's parts by name in a torch.profiler timeline (benchmarks/eval_timeline.py)
        from torch.profiler import record_function

        ready: list[tuple[object, torch.Tensor | None]] = []  # done on the GPU, not yet given out
        items = iter(items)

        def fetch():
            with record_function("captune.next_batch"):
                return next(items, _END)

        item = fetch()
        while item is not _END:
            try:
                batch = batch_of(item)
                if batch is not None:
                    with record_function("captune.start"):
                        self.start(batch)
            except BaseException:  # out of memory, Ctrl-C, ...: what is done is given out first
                yield from self._given_out(ready)
                raise
            if batch is None:
                ready.append((item, None))
                item = fetch()
                continue
            yield from self._given_out(ready)
            following = fetch()  # fetched (a DataLoader's next batch) while the GPU works
            with record_function("captune.finish"):
                ready = [(item, self.finish())]
            item = following
        yield from self._given_out(ready)

    def _given_out(self, ready: list[tuple[object, torch.Tensor | None]]) -> Iterator[tuple[object, list[str]]]:
        from torch.profiler import record_function

        for item, ids in ready:
            with record_function("captune.give_out"):
                texts = [] if ids is None else self.texts(ids)
            yield item, texts

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
    compile: bool = False,
) -> list[str]:
    """Caption images (PIL images or paths); one string per image, in order (`engine`, `compile`: see
    `Captioner`)."""
    from captune.inputs.processor import DEFAULT_QUESTION

    question = question or DEFAULT_QUESTION
    captions: list[str] = []
    chunks = [images[start : start + batch_size] for start in range(0, len(images), batch_size)]
    with Captioner(model, processor, settings, engine, compile) as captioner:
        for _, texts in captioner.overlapped(chunks, lambda c: processor(c, question=question, max_tiles=max_tiles)):
            captions += texts
    return captions
