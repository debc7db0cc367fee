"""The training data: samples read and checked once, grouped by image, measured, and one dataset serving the groups.

With `share_prefix`, a group is an image and question with all of its captions (COCO: five), encoded once as a
shared prompt and one branch per caption (`collate.collate_shared`); without, every caption is a group of its own.
A group's length in tokens comes from `data.lengths.measure`, the same count the collation produces, so the
schedule's micro-batches are exactly the packed rows.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset

from captune import distributed
from captune.data.lengths import Lengths, measure
from captune.data.table import SampleTable
from captune.errors import CaptuneError, ignore_interrupts_in_worker
from captune.inputs.templates import encode_conversation
from captune.inputs.tiling import blank_image, load_image

# What the image check found, kept in the run folder so that a resume does not open every image again.
IMAGE_CACHE = "image_check.json"
# How often (in micro-batches) the trainer and its data-loader workers give free C heap pages back (`iter_batches`).
# On the tutorial-sized synthetic set the process tree grew by 10.6-13.2% over an epoch without, 8.4-10.0% with
# (docs/benchmarks.md, eleventh session); a call costs ~0.1 ms.
RELEASE_EVERY = 100


@dataclass(frozen=True)
class Groups:
    """Samples grouped by image and question, in order of first appearance: group g is
    `members[offsets[g]:offsets[g + 1]]`."""

    members: np.ndarray  # [N] int32 sample indices
    offsets: np.ndarray  # [G + 1] int64

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, g: int) -> np.ndarray:
        return self.members[self.offsets[g] : self.offsets[g + 1]]

    @property
    def sizes(self) -> np.ndarray:
        """[G] captions of each group."""
        return np.diff(self.offsets)


def group_samples(table: SampleTable, share: bool) -> Groups:
    """With `share`, the caption samples of one image file and question form a group; any other conversation (a
    system turn, several turns) trains as a group of its own."""
    n = len(table)
    if not share:
        return Groups(np.arange(n, dtype=np.int32), np.arange(n + 1, dtype=np.int64))
    caption = table.question_of >= 0
    keys = np.where(caption, table.image_of.astype(np.int64) * (len(table.questions) + 1) + table.question_of,
                    -1 - np.arange(n, dtype=np.int64))
    _, first, group_of = np.unique(keys, return_index=True, return_inverse=True)
    rank = np.empty(len(first), np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))  # groups in order of first appearance
    group_of = rank[group_of.ravel()]
    members = np.argsort(group_of, kind="stable").astype(np.int32)
    offsets = np.zeros(len(first) + 1, np.int64)
    np.cumsum(np.bincount(group_of, minlength=len(first)), out=offsets[1:])
    return Groups(members, offsets)


def should_share(table: SampleTable, mode: str, grouped: Groups | None = None) -> bool:
    """`auto` shares when captions repeat an image and question (COCO: five per image); `grouped`: the table's
    `group_samples(table, True)`, if already made."""
    if mode in ("on", "off"):
        return mode == "on"
    return len(grouped if grouped is not None else group_samples(table, True)) < len(table)


def unit_lengths(groups: Groups, lengths: Lengths, shared: bool) -> np.ndarray:
    """[G] tokens of each group as collated: packed with a shared prefix, or the one caption's row."""
    if not shared:
        return lengths.total[groups.members]
    branch = np.add.reduceat(lengths.branch[groups.members], groups.offsets[:-1])
    prefix = lengths.prefix[groups.members[groups.offsets[:-1]]]
    return np.where(branch > 0, prefix + branch, 0)


class CaptionDataset(Dataset):
    """One image group per item: the image tiled once, each of its samples encoded; an image that fails to load or a
    sample that fails to encode becomes an error item, never a crash."""

    def __init__(self, table: SampleTable, groups: Groups, processor, max_tiles: int, max_seq_length: int):
        self.table, self.groups, self.processor = table, groups, processor
        self.max_tiles, self.max_seq_length = max_tiles, max_seq_length

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, g: int) -> dict:
        members = self.groups[g]
        try:
            return self._item(g, load_image(self.table.image(members[0])))
        except CaptuneError as e:
            return {"error": str(e), "index": g, "captions": len(members)}

    def stand_in(self) -> dict:
        """The first group with a blank one-tile image: trained with weight zero where a whole micro-batch failed to
        load, so that every process still runs the same collectives."""
        return self._item(0, blank_image(self.processor.tile_size))

    def _item(self, g: int, image) -> dict:
        members = self.groups[g]
        pixel_values = self.processor.tile_uint8(image, self.max_tiles)  # [tiles, 3, S, S], normalized on the device
        n_image_tokens = pixel_values.shape[0] * self.processor.tokens_per_tile
        path = self.table.image(members[0])
        try:
            encodings = [encode_conversation(self.processor.tokenizer, list(self.table.conversations(i)),
                                             n_image_tokens, self.processor.template, max_length=self.max_seq_length)
                         for i in members.tolist()]
        except CaptuneError as e:
            raise CaptuneError(str(e), path) from None
        return {"pixel_values": pixel_values, "encodings": encodings, "index": g, "image": str(path)}


def iter_batches(dataset: CaptionDataset, micro_batches: list[list[int]], collate, num_workers: int):
    """The collated micro-batches, in order, loaded by `num_workers` forked worker processes, which leave Ctrl-C to
    the main process (the training loop stops in order; a worker's KeyboardInterrupt would print a traceback).

    With workers, this process and each worker give the free pages of their C heaps back every `RELEASE_EVERY`
    micro-batches: the workers share this process's heap, and pages either side touches and frees again would
    otherwise stay resident (a page copied on write once is private for good).

    The batches are not pinned: on an H200 a pinned epoch (`benchmarks/train_memory.py`) held 0.34 GB more host memory
    and ran 8% slower, its pinning thread copying every batch in this process; a 2B micro-batch's uint8 tiles (30 MB)
    take ~3 ms to copy unpinned, against an estimated ~0.5 s of forward and backward (docs/benchmarks.md)."""
    forked = {}
    if num_workers > 0:
        run = InHelperThread()
        dataset, collate = _ItemsIn(run, dataset), _CollatedIn(run, collate)
        # Forked, wherever fork is the safe default (Linux): what follows relies on the workers sharing this
        # process's memory, and a pickled tokenizer would lose its bounded cache (Python 3.14 defaults to forkserver).
        forked = {"prefetch_factor": 4, "worker_init_fn": ignore_interrupts_in_worker,
                  "multiprocessing_context": "fork" if sys.platform == "linux" else None}
    loader = DataLoader(dataset, batch_sampler=micro_batches, num_workers=num_workers, collate_fn=collate,
                        **forked)
    # The workers are forks of this process: objects that exist now are left alone by the garbage collector from
    # here on (`train` unfreezes them at the end), so it does not touch, and so copy, their memory in every worker.
    gc.collect()
    gc.freeze()
    if num_workers > 0:
        _release_free_heap()
        return _Releasing(iter(loader))
    return iter(loader)


class InHelperThread:
    """Calls a function in one helper thread of the calling process, made on first use (in a data-loader worker:
    after the fork).

    A forked worker's main thread allocates from the C heap it inherited from the trainer, whose free holes (~90-120 MB
    after loading the tokenizer and the data) it would fill a page at a time, each page copied on write. glibc serves
    any other thread from another arena (a new one, or one a trainer thread left, trimmed before the fork): on a 10%
    subset of the tutorial's data the growth of the process tree over an epoch went from +10% to +4% with it
    (docs/benchmarks.md)."""

    def __init__(self):
        self._pool, self._pid = None, None

    def __call__(self, fn, *args):
        if self._pid != os.getpid():
            self._pool, self._pid = ThreadPoolExecutor(1, thread_name_prefix="captune-data"), os.getpid()
        return self._pool.submit(fn, *args).result()


class _HeapRelease:
    """Counts micro-batches and gives this process's free heap pages back at every `RELEASE_EVERY`-th."""

    def __init__(self):
        self.count = 0

    def tick(self) -> None:
        self.count += 1
        if self.count % RELEASE_EVERY == 0:
            _release_free_heap()


class _Releasing:
    """`batches`, giving this process's free heap pages back every `RELEASE_EVERY` micro-batches drawn."""

    def __init__(self, batches):
        self.batches, self.release = batches, _HeapRelease()

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self.batches)
        self.release.tick()
        return batch


class _CollatedIn:
    """`collate` called by `run`, in a worker, which gives its free heap pages back every `RELEASE_EVERY` calls."""

    def __init__(self, run: InHelperThread, collate):
        self.run, self.collate, self.release = run, collate, _HeapRelease()

    def __call__(self, items: list[dict]):
        batch = self.run(self.collate, items)
        self.release.tick()
        return batch


class _ItemsIn(Dataset):
    """`dataset`'s items, made by `run` (a micro-batch's items in one call)."""

    def __init__(self, run: InHelperThread, dataset: Dataset):
        self.run, self.dataset = run, dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        return self.run(self.dataset.__getitem__, i)

    def __getitems__(self, indices: list[int]) -> list[dict]:
        return self.run(lambda: [self.dataset[i] for i in indices])


def _release_free_heap() -> None:
    """Give the free pages of this process's C heap back to the system (glibc only; Python does not expose
    `malloc_trim`): before the workers fork, the ~90-120 MB that loading the tokenizer and the data leaves, mapped by
    every worker; through the epoch, the pages that the trainer or a worker touched and freed again."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


@dataclass
class TrainingData:
    table: SampleTable
    groups: Groups
    lengths: np.ndarray  # [G] tokens of each group as collated
    shared: bool


def load_training_data(config, processor, log, ctx: distributed.Context | None = None) -> TrainingData:
    """Read the data; check every image header once (cached in the run folder) and every sample's length; drop the
    bad samples (counted in the log); hold the rest compactly, grouped and measured.

    Under torchrun the main process (global rank 0) checks the images first and the others then find its results in
    the cache (they only `stat` the files; they never write it), and it alone measures the lengths, which the others
    receive."""
    from captune.data.check import check_lengths, check_samples, tile_counts
    from captune.data.problems import Problems, format_problems
    from captune.data.samples import read_training_data

    several = ctx is not None and ctx.distributed
    report = read_training_data(config.data, config.image_root or None)
    if several and not ctx.is_main:
        distributed.barrier(ctx)  # wait for the main process's image check
    checked = check_samples(report.samples, decode_images=False, progress=log.enabled,
                            cache=Path(config.out) / IMAGE_CACHE, update_cache=not several or ctx.is_main)
    if several and ctx.is_main:
        distributed.barrier(ctx)
    del report.samples
    table = SampleTable.of(checked.samples)
    del checked.samples
    gc.collect()  # 566k Sample objects: give their memory back before the data-loader workers are forked
    # The main process measures the samples it kept for all: the others must have kept the same ones.
    differ = distributed.disagreement(ctx, f"{len(table):,} usable samples") if several else None
    if differ:
        raise CaptuneError(f"the processes read different training data ({differ}): on several nodes every node "
                           "must see the same files", config.data)
    lengths = None
    if not several or ctx.is_main:
        tiles = tile_counts(table, checked.sizes, processor, config.max_tiles)
        lengths = measure(table, tiles, processor, progress=log.enabled)
    if several:
        box = [lengths]
        dist.broadcast_object_list(box, src=0)
        lengths = box[0]
    if not lengths.exact:
        log.info("note: the fast length count disagreed with real encodings; every sample was encoded instead")
    too_long = Problems()
    keep = check_lengths(table, lengths, config.max_seq_length, too_long)
    for note in report.notes:
        log.info(note)
    for problems in (report.problems, checked.problems, too_long):
        if problems.total:
            log.info(f"skipping bad training samples: {format_problems(problems)}")
    if not len(keep):
        raise CaptuneError("no usable training samples", config.data)
    if len(keep) < len(table):
        table = SampleTable.of([table[i] for i in keep.tolist()])
        lengths = Lengths(lengths.total[keep], lengths.prefix[keep], lengths.branch[keep], {}, lengths.exact)
    grouped = group_samples(table, True)
    shared = should_share(table, config.share_prefix, grouped)
    groups = grouped if shared else group_samples(table, False)
    return TrainingData(table, groups, unit_lengths(groups, lengths, shared), shared)
