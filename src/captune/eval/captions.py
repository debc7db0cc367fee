"""The captioning of an evaluation: images decoded and tiled in DataLoader workers, ordered by tile count, captioned
in batches, and every caption appended to `captions.jsonl` (skipped images to `skipped.jsonl`) as soon as it exists,
so that an interrupted run continues where it stopped."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from torch.utils.data import DataLoader, Dataset, Sampler

from captune.data.evalsets import EvalImage
from captune.errors import CaptuneError, ignore_interrupts_in_worker
from captune.eval.generate import Captioner, GenerationSettings
from captune.fileio import write_text_atomic
from captune.inputs.processor import DEFAULT_QUESTION, Processor
from captune.inputs.tiling import load_image


@dataclass(frozen=True)
class EvalSettings:
    """What makes two runs' captions comparable; a resumed run must have the same."""

    model: str
    test_json: str
    question: str = DEFAULT_QUESTION
    max_tiles: int = 6
    max_new_tokens: int = 30
    min_new_tokens: int = 8
    dtype: str = "bf16"


class CaptionDataset(Dataset):
    """Decodes and tiles one image per item (in DataLoader workers); an unreadable image becomes an error item.
    Every item carries its `index`, which places it in its batch."""

    def __init__(self, images: list[EvalImage], processor: Processor, question: str, max_tiles: int):
        self.images, self.processor, self.question, self.max_tiles = images, processor, question, max_tiles

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        item = self.images[i]
        where = {"index": i, "image_id": item.image_id, "image": str(item.path)}
        try:
            sample = self.processor.prepare(load_image(item.path), self.question, self.max_tiles)
        except CaptuneError as e:
            return {**where, "error": str(e)}
        return {**sample, **where}


class ChunkSampler(Sampler[list[int]]):
    """Each batch of `batch_size` consecutive items cut into `chunks` near-equal chunks, one per worker: a batch is
    ready after one chunk's decoding, not a whole batch's by one worker (the first batch of 64 7-tile images took
    ~3 s with 12 workers idle but one, while the GPU waited)."""

    def __init__(self, n: int, batch_size: int, chunks: int):
        self.n, self.batch_size, self.chunks = n, batch_size, max(chunks, 1)

    def __iter__(self) -> Iterator[list[int]]:
        for start in range(0, self.n, self.batch_size):
            size = min(self.batch_size, self.n - start)
            k = min(self.chunks, size)
            for c in range(k):
                yield list(range(start + c * size // k, start + (c + 1) * size // k))

    def __len__(self) -> int:
        full, rest = divmod(self.n, self.batch_size)
        return full * min(self.chunks, self.batch_size) + (min(self.chunks, rest) if rest else 0)


def _as_list(samples: list[dict]) -> list[dict]:
    return samples


def assemble(chunks: Iterable[list[dict]], n: int, batch_size: int, processor: Processor,
             pin_memory: bool) -> Iterator[dict]:
    """The batches of a `caption_loader`'s chunks over `n` items, in order, each given out as soon as its last chunk
    arrives: {"batch": the collated good samples (None if none), "items": their image ids and paths, "errors": the
    unreadable ones}."""

    def batch(samples: list[dict]) -> dict:
        good = [s for s in samples if "error" not in s]
        return {
            "batch": processor.collate(good, pin_memory=pin_memory) if good else None,
            "items": [{"image_id": s["image_id"], "image": s["image"]} for s in good],
            "errors": [s for s in samples if "error" in s],
        }

    samples: list[dict] = []
    for chunk in chunks:
        samples += chunk
        first = samples[0]["index"]
        if chunk[-1]["index"] // batch_size != first // batch_size:
            raise ValueError("a chunk crosses a batch's end")
        if len(samples) == min(batch_size, n - first):  # the batch is complete
            yield batch(samples)
            samples = []
    if samples:
        raise ValueError(f"the loader ended inside a batch ({len(samples)} items of it)")


def order_by_tiles(images: list[EvalImage], processor: Processor, max_tiles: int) -> list[EvalImage]:
    """Largest tile counts first (an out-of-memory shows at once), equal counts together (no padding).

    Only the image headers are read; an image whose header cannot be read goes last and is reported later.
    """

    def tiles(item: EvalImage) -> int:
        try:
            return processor.num_tiles(item.path, max_tiles)
        except Exception:
            return -1

    return sorted(images, key=lambda item: -tiles(item))


def read_jsonl(path: Path) -> list[dict]:
    """The complete lines of a JSON-lines file; a line cut off by a killed process is dropped."""
    rows = []
    if not path.exists():
        return rows
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return rows


class CaptionLog:
    """captions.jsonl (one per rank under torchrun): appended and flushed after every batch."""

    def __init__(self, out: Path, rank: int, distributed_run: bool):
        suffix = f".rank{rank}" if distributed_run else ""
        self.captions_path = out / f"captions{suffix}.jsonl"
        self.skipped_path = out / f"skipped{suffix}.jsonl"
        # Rewrite what survived an interruption so that appending continues after a complete line.
        for path in (self.captions_path, self.skipped_path):
            rows = read_jsonl(path)
            if path.exists():
                path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        self._captions = open(self.captions_path, "a", encoding="utf-8")
        self._skipped = open(self.skipped_path, "a", encoding="utf-8")

    def add(self, captions: list[dict], skipped: list[dict]) -> None:
        for f, rows in ((self._captions, captions), (self._skipped, skipped)):
            if rows:
                f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
                f.flush()
                os.fsync(f.fileno())

    def close(self) -> None:
        self._captions.close()
        self._skipped.close()


def done_captions(out: Path) -> dict[int, dict]:
    """Every caption already written to OUT, by any rank of any earlier run."""
    done: dict[int, dict] = {}
    for path in sorted(out.glob("captions*.jsonl")):
        for row in read_jsonl(path):
            done[int(row["image_id"])] = row
    return done


def skipped_images(out: Path, done: dict[int, dict]) -> dict[int, dict]:
    skipped: dict[int, dict] = {}
    for path in sorted(out.glob("skipped*.jsonl")):
        for row in read_jsonl(path):
            if int(row["image_id"]) not in done:
                skipped[int(row["image_id"])] = row
    return skipped


def write_skipped(out: Path, skipped: dict[int, dict]) -> None:
    """skipped.jsonl: the images still skipped (a rerun retries them), every rank's in one file; none: no file."""
    for path in out.glob("skipped*.jsonl"):
        if path.name != "skipped.jsonl":
            path.unlink()
    if skipped:
        write_text_atomic(out / "skipped.jsonl",
                          "".join(json.dumps(skipped[i], ensure_ascii=False) + "\n" for i in sorted(skipped)))
    else:
        (out / "skipped.jsonl").unlink(missing_ok=True)


AHEAD = 4  # batches decoded ahead of the model


def caption_loader(dataset: CaptionDataset, batch_size: int, num_workers: int) -> DataLoader:
    """Chunks of each batch in order (`ChunkSampler`), decoded and tiled in `num_workers` workers, `AHEAD` batches
    or a little more ahead of the model: a batch of 64 7-tile images is 270 MB, so DataLoader's usual depth (2 or 4
    chunks per worker) is not taken as it is. Collated by `assemble`, in the main process."""
    chunks = max(min(num_workers, batch_size), 1)
    return DataLoader(
        dataset,
        batch_sampler=ChunkSampler(len(dataset), batch_size, chunks),
        num_workers=num_workers,
        collate_fn=_as_list,
        prefetch_factor=-(-AHEAD * chunks // num_workers) if num_workers > 0 else None,
        persistent_workers=False,
        worker_init_fn=ignore_interrupts_in_worker,  # Ctrl-C is the main process's to handle, in one line
    )


def generate_captions(
    model,
    processor: Processor,
    images: list[EvalImage],
    log: CaptionLog,
    settings: EvalSettings,
    batch_size: int,
    num_workers: int,
    progress: bool = True,
    engine: str = "static",
    compile: bool = False,
) -> tuple[int, int]:
    """Caption `images` in batches, logging each batch as soon as it is done (while the GPU works on the next);
    return (captioned, skipped). `engine`, `compile`: see `Captioner`."""
    from tqdm import tqdm

    ordered = order_by_tiles(images, processor, settings.max_tiles)
    loader = caption_loader(CaptionDataset(ordered, processor, settings.question, settings.max_tiles), batch_size,
                            num_workers)
    batches = assemble(loader, len(ordered), batch_size, processor, pin_memory=model.device.type == "cuda")
    gen = GenerationSettings(max_new_tokens=settings.max_new_tokens, min_new_tokens=settings.min_new_tokens)
    captioned = skipped = 0
    bar = tqdm(total=len(ordered), desc="captioning", unit="img", disable=not progress, dynamic_ncols=True)
    captioner = Captioner(model, processor, gen, engine, compile)
    try:
        for chunk, captions in captioner.overlapped(batches, lambda c: c["batch"]):
            rows = [{**item, "caption": caption} for item, caption in zip(chunk["items"], captions)]
            for err in chunk["errors"]:
                tqdm.write(f"captune: skipped {err['error']}")
            log.add(rows, [{"image_id": e["image_id"], "image": e["image"], "reason": e["error"]}
                           for e in chunk["errors"]])
            captioned += len(rows)
            skipped += len(chunk["errors"])
            bar.update(len(rows) + len(chunk["errors"]))
    finally:
        captioner.close()
        bar.close()
    return captioned, skipped
