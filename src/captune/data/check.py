"""Checking training data before hours of training: every image opened once (its header, or fully decoded), every
sample's token count against `max_seq_length`; problems counted by kind with examples. `captune data check`."""

from __future__ import annotations

import functools
import json
import multiprocessing
import os
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm import tqdm

from captune.data.samples import (
    MISSING_IMAGE,
    OVER_LONG,
    TRUNCATED_IMAGE,
    UNENCODABLE,
    UNREADABLE_IMAGE,
    Problems,
    Sample,
    read_training_data,
)
from captune.errors import CaptuneError
from captune.fileio import write_json_atomic
from captune.inputs.tiling import count_tiles, load_image


@dataclass
class CheckReport:
    samples: list[Sample]
    problems: Problems


LengthFn = Callable[[Sample, int], int]


def check_samples(
    samples: Sequence[Sample],
    decode_images: bool,
    length_fn: LengthFn | None = None,
    max_seq_length: int = 4096,
    max_tiles: int = 6,
    tile_size: int = 448,
    thumbnail: bool = True,
    min_tiles: int = 1,
    workers: int = 0,
    progress: bool = True,
    cache: Path | None = None,
) -> CheckReport:
    """Keep the samples whose image is readable (and, given `length_fn(sample, num_tiles)`, not over-long).

    The tile geometry (`max_tiles`, `tile_size`, `thumbnail`, `min_tiles`) is the processor's, so that a sample's
    tile count is the one training will use.

    Each distinct image is opened once: fully decoded with `decode_images` (finds truncated files), else only its
    header (fast, for the start of training). `workers` > 0 spreads the images over a process pool. With `cache` (a
    JSON file; training keeps one in its run folder) what was found is kept, keyed by path, size and modification
    time, and a file that has not changed since is not opened again: a resumed run only `stat`s the images. (The
    processes of a fresh torchrun start still each open them: they check at the same time.)
    """
    images = list(dict.fromkeys(s.image for s in samples))
    known = _read_cache(cache, decode_images) if cache is not None else {}
    stats = {image: _stat(image) for image in images} if cache is not None else {}
    todo = [image for image in images
            if cache is None or str(image) not in known or known[str(image)][0] != stats[image]]
    fresh = set(todo)
    results = {image: tuple(known[str(image)][1]) for image in images if image not in fresh}
    results.update(_inspect_images(todo, decode_images, workers, progress))
    if cache is not None and todo:
        _write_cache(cache, decode_images, {str(image): (stats[image], results[image]) for image in images})
    problems = Problems()
    for image in images:
        kind, reason, _ = results[image]
        if kind:
            problems.add(kind, f"{image}: {reason}")
    kept = []
    bar = tqdm(samples, desc="checking lengths", unit="sample", disable=not progress or length_fn is None)
    for sample in bar:
        kind, _, size = results[sample.image]
        if kind:
            continue
        if length_fn is not None and not _short_enough(sample, size, length_fn, max_seq_length,
                                                       (max_tiles, tile_size, thumbnail, min_tiles), problems):
            continue
        kept.append(sample)
    return CheckReport(kept, problems)


def _short_enough(sample: Sample, size: tuple[int, int], length_fn: LengthFn, max_seq_length: int,
                  geometry: tuple[int, int, bool, int], problems: Problems) -> bool:
    max_tiles, tile_size, thumbnail, min_tiles = geometry
    num_tiles = count_tiles(size[0], size[1], max_tiles=max_tiles, tile_size=tile_size, thumbnail=thumbnail,
                            min_tiles=min_tiles)
    try:
        length = length_fn(sample, num_tiles)
    except CaptuneError as e:
        problems.add(UNENCODABLE, f"{sample.image}: {e}")
        return False
    if length > max_seq_length:
        problems.add(OVER_LONG, f"{sample.image}: {length} tokens > max_seq_length {max_seq_length}")
        return False
    return True


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
    inspect = functools.partial(_inspect_image, decode=decode)
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


def _inspect_image(path: Path, decode: bool) -> tuple[str | None, str, tuple[int, int] | None]:
    """(problem kind or None, reason, (width, height)) of one image file."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PIL's EXIF and decompression-bomb warnings, once per image
        if decode:
            try:
                return None, "", load_image(path).size
            except CaptuneError as e:
                reason = str(e).removeprefix(f"{e.path}: ")
                kind = {"image not found": MISSING_IMAGE, "truncated image": TRUNCATED_IMAGE}.get(reason)
                return kind or UNREADABLE_IMAGE, reason, None
        try:
            with Image.open(path) as image:
                return None, "", image.size
        except FileNotFoundError:
            return MISSING_IMAGE, "image not found", None
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            return UNREADABLE_IMAGE, f"cannot read image header: {e}", None


def format_problems(problems: Problems) -> str:
    """One line: "3 malformed lines (e.g. a; b; c), 2 missing images (e.g. ...)"."""
    if not problems.total:
        return "no problems"
    return ", ".join(f"{count} {_plural(kind, count)} (e.g. {'; '.join(problems.examples.get(kind, []))})"
                     for kind, count in problems.counts.items())


def _plural(kind: str, count: int) -> str:
    if count == 1:
        return kind
    return kind[:-1] + "ies" if kind.endswith("y") else kind + "s"


def make_length_fn(tokenizer: Any, template: Any, encode: Callable[..., dict],
                   tokens_per_tile: int) -> LengthFn:
    """length_fn(sample, num_tiles): the sample's token count as InternVL's trainer builds it, via `encode`
    (templates.encode_conversation)."""

    def length(sample: Sample, num_tiles: int) -> int:
        # Encoded with one image token, then counted up: <IMG_CONTEXT> is a special token, one id per occurrence,
        # and tokenizing 1,792 of them for each of 566k captions would be slow.
        ids = encode(tokenizer, list(sample.conversations), 1, template)["input_ids"]
        return len(ids) - 1 + num_tiles * tokens_per_tile

    return length


def data_check_command(data: str | Path, model: str | Path | None = None, max_tiles: int = 6,
                       max_seq_length: int = 4096, workers: int | None = None,
                       image_root: str | Path | None = None) -> int:
    """`captune data check`: read the data, decode every image, check lengths with a model's tokenizer; print a
    summary and return the number of problems."""
    report = read_training_data(data, image_root)
    for note in report.notes:
        print(f"note: {note}")
    print(f"{len(report.samples)} samples read from {data}")
    length_fn = None
    geometry = {"max_tiles": max_tiles}
    if model is not None:  # lengths as the model will see them: its template, tile size and tokens per tile
        from captune.inputs.templates import encode_conversation
        from captune.internvl.folder import open_checkpoint
        from captune.internvl.load import processor_for
        from captune.internvl.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(model)
        processor = processor_for(open_checkpoint(model), tokenizer)
        length_fn = make_length_fn(tokenizer, processor.template, encode_conversation, processor.tokens_per_tile)
        geometry.update(tile_size=processor.tile_size, thumbnail=processor.thumbnail, min_tiles=processor.min_tiles)
    if workers is None:
        workers = min(os.cpu_count() or 1, 32)
    checked = check_samples(report.samples, decode_images=True, length_fn=length_fn, max_seq_length=max_seq_length,
                            workers=workers if workers > 1 else 0, **geometry)
    problems = Problems()
    problems.update(report.problems)
    problems.update(checked.problems)
    if problems.total:
        print(format_problems(problems))
    print(f"{len(checked.samples)} samples OK")
    return problems.total
