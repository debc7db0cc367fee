"""captune.train.dataset: the micro-batches forked data-loader workers make are those of the main process."""

from __future__ import annotations

import dataclasses
import gc
import itertools
import os
import threading

import pytest
import torch
from helpers.packed_setup import build_setup

from captune.data.table import SampleTable
from captune.train import dataset as dataset_module
from captune.train.collate import Collate
from captune.train.dataset import (
    CaptionDataset,
    InHelperThread,
    group_samples,
    iter_batches,
)

MICRO_BATCHES = [[0, 2], [1], [2, 0, 1], [1, 0]]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return build_setup(tmp_path_factory.mktemp("dataset"))


def _batches(setup, num_workers: int) -> list:
    """Each micro-batch's (TrainBatch, errors) and the name of the thread that collated it."""
    samples, processor, _ = setup
    table = SampleTable.of(samples)
    dataset = CaptionDataset(table, group_samples(table, share=True), processor, 6, 4096)
    collate = Collate(processor.pad_token_id, shared=True, token_budget=10_000, static=False)

    def collate_where(items):
        return collate(items), threading.current_thread().name

    try:
        batches = iter_batches(dataset, MICRO_BATCHES, collate_where, num_workers)
        return list(itertools.islice(batches, len(MICRO_BATCHES)))
    finally:
        gc.unfreeze()  # iter_batches freezes the objects it forks with; `train` unfreezes them at its end


def _fields(value) -> dict:
    return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}


def _same(x, y) -> bool:
    return torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y


def test_workers_make_the_main_process_batches(setup):
    here, forked = _batches(setup, 0), _batches(setup, 2)
    assert len(here) == len(forked) == len(MICRO_BATCHES)
    assert {thread for _, thread in here} == {"MainThread"}
    # in a worker, away from the heap it shares with the trainer (InHelperThread's docstring)
    assert all(thread.startswith("captune-data") for _, thread in forked)
    for ((a, errors_a), _), ((b, errors_b), _) in zip(here, forked):
        assert errors_a == errors_b == []
        for name, x in _fields(a).items():
            y = getattr(b, name)
            if dataclasses.is_dataclass(x):  # the shared-prefix mask: token ids and whether rows are padded
                assert all(_same(x_, y_) for x_, y_ in zip(_fields(x).values(), _fields(y).values())), name
            else:
                assert _same(x, y), name


def _where() -> tuple[int, bool]:
    return os.getpid(), threading.current_thread() is threading.main_thread()


def test_helper_thread_is_made_in_each_process():
    run = InHelperThread()
    pid = os.fork()  # before the first call: a process with threads should not fork
    if pid == 0:
        code = 1
        try:
            code = 0 if run(_where) == (os.getpid(), False) else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert run(_where) == (os.getpid(), False)
    with pytest.raises(ZeroDivisionError):  # errors reach the caller
        run(lambda: 1 / 0)


def test_trainer_and_workers_give_free_heap_back_every_release_every_micro_batches(setup, monkeypatch, tmp_path):
    calls = tmp_path / "calls"
    monkeypatch.setattr(dataset_module, "RELEASE_EVERY", 2)
    # the workers are forks: they inherit the patch, and report through the file
    monkeypatch.setattr(dataset_module, "_release_free_heap", lambda: calls.open("a").write(f"{os.getpid()}\n"))
    _batches(setup, 2)  # 4 micro-batches drawn; each worker collates 2
    pids = calls.read_text().split()
    here = str(os.getpid())
    assert pids.count(here) == 1 + 2  # before the fork, then after micro-batches 2 and 4
    assert sorted(pids.count(p) for p in set(pids) - {here}) == [1, 1]
