"""Checking training data before hours of training: every image opened once (its header, or fully decoded), every
sample's token count against `max_seq_length`; problems counted by kind with examples. `captune data check`."""

from __future__ import annotations

import functools
import json
import multiprocessing
import os
import warnings
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from captune.data.images import inspect_image
from captune.data.lengths import Lengths, caption_tokens, measure
from captune.data.problems import (
    OVER_LONG,
    UNENCODABLE,
    Problems,
    format_problems,
)
from captune.data.samples import Sample, read_training_data
from captune.data.table import SampleTable
from captune.fileio import write_json_atomic


@dataclass
class CheckReport:
    samples: list[Sample]
    problems: Problems
    sizes: dict[Path, tuple[int, int]]  # (width, height) of every readable image


def check_samples(
    samples: Sequence[Sample],
    decode_images: bool,
    workers: int = 0,
    progress: bool = True,
    cache: Path | None = None,
    update_cache: bool = True,
) -> CheckReport:
    """Keep the samples whose image is readable, and say how large each image is.

    Each distinct image is opened once: fully decoded with `decode_images` (finds truncated files), else only its
    header (fast, for the start of training). `workers` > 0 spreads the images over a process pool. With `cache` (a
    JSON file; training keeps one in its run folder) what was found is kept, keyed by path, size and modification
    time, and a file that has not changed since is not opened again: a resumed run only `stat`s the images.
    `update_cache=False` only reads it: under torchrun the main process alone writes the run folder (the others
    find its results there; on another node with its own copy of the data, other modification times make them
    check again, and they must not overwrite its cache with theirs).
    """
    images = list(dict.fromkeys(s.image for s in samples))
    known = _read_cache(cache, decode_images) if cache is not None else {}
    stats = {image: _stat(image) for image in images} if cache is not None else {}
    todo = [image for image in images
            if cache is None or str(image) not in known or known[str(image)][0] != stats[image]]
    fresh = set(todo)
    results = {image: tuple(known[str(image)][1]) for image in images if image not in fresh}
    results.update(_inspect_images(todo, decode_images, workers, progress))
    if cache is not None and todo and update_cache:
        _write_cache(cache, decode_images, {str(image): (stats[image], results[image]) for image in images})
    problems = Problems()
    sizes = {}
    for image in images:
        kind, reason, size = results[image]
        if kind:
            problems.add(kind, f"{image}: {reason}")
        else:
            sizes[image] = tuple(size)
    return CheckReport([s for s in samples if s.image in sizes], problems, sizes)


def tile_counts(table: SampleTable, sizes: dict[Path, tuple[int, int]], processor, max_tiles: int) -> np.ndarray:
    """[N] the tile count of each sample's image (the processor's geometry: tile size, thumbnail, minimum); 0 for
    an image without a size (unreadable)."""
    by_path = {str(path): size for path, size in sizes.items()}
    by_size: dict[tuple[int, int], int] = {}
    per_image = np.zeros(len(table.images), np.int64)
    for j, path in enumerate(table.images):
        size = by_path.get(path)
        if size is None:
            continue
        if size not in by_size:
            by_size[size] = processor.tiles_for_size(*size, max_tiles=max_tiles)
        per_image[j] = by_size[size]
    return per_image[table.image_of]


def check_lengths(table: SampleTable, lengths: Lengths, max_seq_length: int, problems: Problems,
                  among: np.ndarray | None = None) -> np.ndarray:
    """Indices of the samples (`among` these, else all) that can be encoded and fit in `max_seq_length`; the
    others counted in `problems`."""
    bad = np.ones(len(table), bool)
    bad[np.arange(len(table)) if among is None else among] = False
    for i, reason in lengths.unencodable.items():
        if not bad[i]:
            problems.add(UNENCODABLE, f"{table.image(i)}: {reason}")
            bad[i] = True
    for i in np.flatnonzero(~bad & (lengths.total > max_seq_length)).tolist():
        problems.add(OVER_LONG, f"{table.image(i)}: {lengths.total[i]} tokens > max_seq_length {max_seq_length}")
        bad[i] = True
    return np.flatnonzero(~bad)


def _stat(path: Path) -> list[int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def _read_cache(cache: Path, decode: bool) -> dict[str, list]:
    """{path: [[size, mtime_ns], [kind, reason, size]]}; results of a header-only check do not stand for decoding."""
    try:
        data = json.loads(cache.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or not isinstance(data.get("images"), dict) or (decode and not data.get("decoded")):
        return {}
    return data["images"]


def _write_cache(cache: Path, decode: bool, entries: dict[str, tuple]) -> None:
    write_json_atomic(cache, {"decoded": decode, "images": entries}, indent=None)


def _inspect_images(images: list[Path], decode: bool, workers: int, progress: bool) -> dict[Path, tuple]:
    inspect = functools.partial(inspect_image, decode=decode)
    bar = functools.partial(tqdm, total=len(images), desc="checking images", unit="image", disable=not progress)
    if workers > 0 and len(images) > 1:
        chunksize = max(1, min(256, len(images) // (workers * 8)))
        # spawn: never fork a process that may hold threads (tokenizers, torch) or a CUDA context. Unlike
        # multiprocessing.Pool, the executor fails instead of hanging when its workers cannot start (a script read
        # from stdin, say); then the images are checked here.
        try:
            with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
                return dict(zip(images, bar(pool.map(inspect, images, chunksize=chunksize)), strict=True))
        except BrokenProcessPool:
            warnings.warn("image-checking workers failed to start; checking in this process", stacklevel=3)
    return dict(zip(images, bar(map(inspect, images)), strict=True))


def data_check_command(data: str | Path, model: str | Path | None = None, max_tiles: int = 6,
                       max_seq_length: int = 4096, num_workers: int | None = None,
                       image_root: str | Path | None = None) -> int:
    """`captune data check`: read the data, decode every image, check lengths with a model's tokenizer; print a
    summary and return the number of problems."""
    report = read_training_data(data, image_root)
    for note in report.notes:
        print(f"note: {note}")
    print(f"{len(report.samples)} samples read from {data}")
    workers = min(os.cpu_count() or 1, 32) if num_workers is None else num_workers
    processor = table = counted = None
    with ThreadPoolExecutor(1) as background:
        images = background.submit(check_samples, report.samples, decode_images=True,
                                   workers=workers if workers > 1 else 0)
        if model is not None:  # meanwhile, the captions' tokens with the model's tokenizer (no image needed)
            from captune.internvl.folder import open_checkpoint
            from captune.internvl.load import processor_for
            from captune.internvl.tokenizer import load_tokenizer

            processor = processor_for(open_checkpoint(model), load_tokenizer(model))
            table = SampleTable.of(report.samples)
            counted = caption_tokens(table, processor)
        checked = images.result()
    problems = Problems()
    problems.update(report.problems)
    problems.update(checked.problems)
    kept = len(checked.samples)
    if model is not None:  # lengths as the model will see them: its template, tile size and tokens per tile
        tiles = tile_counts(table, checked.sizes, processor, max_tiles)
        lengths = measure(table, np.maximum(tiles, 1), processor, counted=counted)
        kept = len(check_lengths(table, lengths, max_seq_length, problems, among=np.flatnonzero(tiles)))
    if problems.total:
        print(format_problems(problems))
    if model is None:
        print(f"note: lengths not checked against --max-seq-length {max_seq_length}: --model MODEL counts the tokens "
              "with its tokenizer")
    print(f"{kept} samples OK")
    return problems.total
