"""`captune train` on several nodes, simulated by two torchrun launches on this machine (one CPU process each, gloo,
rendezvous on 127.0.0.1): the same losses and adapter as one process with the same global batch, checkpoints and
logs written once (by global rank 0), DDP resuming from the shared folder, FSDP2 from step 0 through the Slurm
example; nodes that see different files (a run folder that is not shared, other data) stopped on every node with
one line, and Slurm tasks without torchrun refused."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from helpers.multinode import slurm_job, succeeded, two_nodes
from helpers.tiny_captions import write_tiny_captions
from safetensors.torch import load_file

from captune.errors import CaptuneError
from captune.train import config as cfg
from captune.train.runlog import read_log

STEPS = 3


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return write_tiny_captions(tmp_path_factory.mktemp("data"))


def options(root: Path, model: Path) -> dict[str, str]:
    """3 steps of 12 captions (three images, one per micro-batch), without dropout: every way of splitting them over
    processes gives the same result, to rounding; a checkpoint after every step, all kept."""
    return {"model": str(model), "data": str(root / "train.jsonl"), "max_steps": str(STEPS), "save_every": "1",
            "keep_checkpoints": "0", "global_batch_size": "12", "token_budget": "64", "lora_dropout": "0",
            "log_every": "1"}


def command_line(values: dict[str, str]) -> list[str]:
    """`captune train` with `values` as options (`max_steps` as --max-steps)."""
    return ["train", "--recipe", "tiny_cpu_lora", *[a for k, v in values.items()
                                                    for a in (f"--{k.replace('_', '-')}", v)]]


@pytest.fixture(scope="module")
def one_process(tiny_data, tmp_path_factory) -> Path:
    """The reference: the same run in one plain process (no torchrun)."""
    from captune.train.loop import train

    root, model, _ = tiny_data
    out = tmp_path_factory.mktemp("one") / "run"
    train(cfg.resolve("tiny_cpu_lora", {**options(root, model), "out": str(out)}))
    return out


def assert_same_run(two: Path, one: Path) -> None:
    """Same losses, gradient norms and final adapter as the one-process run, each step logged once."""
    for key in ("loss", "grad_norm"):
        got, want = [r[key] for r in read_log(two)], [r[key] for r in read_log(one)]
        assert len(got) == STEPS, f"{len(got)} log rows for {STEPS} steps: written by more than one process?"
        assert got == pytest.approx(want, rel=1e-5), key
    a = load_file(two / f"checkpoint-{STEPS:06d}" / "adapter_model.safetensors")
    b = load_file(one / f"checkpoint-{STEPS:06d}" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6), k


def assert_written_once(out: Path, runs, log_before: str = "") -> list[int]:
    """Every step's checkpoint and nothing half-written beside them; one process printed and wrote the log
    (`log_before`: what train.log held before this run)."""
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == [
        f"checkpoint-{step:06d}" for step in range(1, STEPS + 1)]
    log = (out / "train.log").read_text()
    assert log.startswith(log_before) and log[len(log_before):].count("done: adapter in") == 1
    printed = [r.stdout.count("captune: training ") for r in runs]
    assert sorted(printed) == [0, 1], printed
    return printed


@pytest.mark.slow
def test_ddp_on_two_nodes_resumes_from_the_shared_folder_as_one_process(tiny_data, one_process, tmp_path):
    """`torchrun --nnodes 2 --node-rank R --rdzv-endpoint HOST:PORT` with DDP, in a run folder whose run stopped
    after step 1: every node reads checkpoint-000001 from the shared folder, steps 2 and 3 give the losses and the
    adapter of the one-process run, and their checkpoints are written once."""
    root, model, _ = tiny_data
    out = tmp_path / "run"
    shutil.copytree(one_process, out)
    for step in range(2, STEPS + 1):
        shutil.rmtree(out / f"checkpoint-{step:06d}")
    log_before = (out / "train.log").read_text()
    nodes = (tmp_path / "node0", tmp_path / "node1")
    for node in nodes:
        node.mkdir()
    runs = succeeded(two_nodes(command_line({**options(root, model), "out": str(out)}), nodes))
    assert "resumed from" in (out / "train.log").read_text()[len(log_before):]
    assert "(2 processes)" in (out / "train.log").read_text()[len(log_before):]
    assert assert_written_once(out, runs, log_before) == [1, 0]  # --node-rank 0 holds global rank 0
    assert_same_run(out, one_process)


@pytest.mark.slow
def test_fsdp2_on_two_nodes_through_the_slurm_example_matches_one_process(tiny_data, one_process, tmp_path):
    """examples/slurm/captune.sbatch (srun starts torchrun once per node, a c10d rendezvous at the first node
    assigns the ranks) with FSDP2 sharded over the two nodes, from step 0: the result of one process."""
    root, model, _ = tiny_data
    out = tmp_path / "run"
    runs = succeeded(slurm_job(command_line({**options(root, model), "out": str(out), "fsdp": "true"}), tmp_path))
    assert "(2 processes)" in (out / "train.log").read_text()
    assert_written_once(out, runs)
    assert_same_run(out, one_process)


@pytest.mark.slow
def test_a_run_folder_that_is_not_shared_is_refused_on_every_node(tiny_data, one_process, tmp_path):
    """--out relative to each node's own folder: node 0 finds a run to resume, node 1 none. Each process would take
    its own decision (one resuming at step 3, the other training from step 0, waiting for it forever); instead every
    node stops at the start with the same one-line error, and nothing is written."""
    root, model, _ = tiny_data
    nodes = (tmp_path / "node0", tmp_path / "node1")
    shutil.copytree(one_process, nodes[0] / "run")
    nodes[1].mkdir()
    log_before = (nodes[0] / "run" / "train.log").read_text()
    runs = two_nodes(command_line({**options(root, model), "out": "run"}), nodes)
    for run in runs:
        assert run.returncode != 0, run.stderr[-3000:]  # torchrun's 1 for its worker's 2
        assert "captune: error: the processes see different files (rank 0: resumes from checkpoint-000003; " \
               "rank 1: starts a new run)" in run.stderr
    assert (nodes[0] / "run" / "train.log").read_text() == log_before
    assert list(nodes[1].iterdir()) == []


@pytest.mark.slow
def test_nodes_that_see_different_training_data_are_refused_on_every_node(tiny_data, tmp_path):
    """--data relative to each node's own copy, and node 1's copy lacks an image's captions: rank 0 would measure
    samples that rank 1 does not hold. Every node stops with the same one-line error, and the run folder that the
    start made is removed again."""
    root, model, _ = tiny_data
    nodes = (tmp_path / "node0", tmp_path / "node1")
    for node in nodes:
        shutil.copytree(root, node / "data", ignore=shutil.ignore_patterns("base"))
    lines = (nodes[1] / "data" / "train.jsonl").read_text().splitlines(keepends=True)
    (nodes[1] / "data" / "train.jsonl").write_text("".join(lines[:-4]))
    out = tmp_path / "run"
    runs = two_nodes(command_line({**options(root, model), "data": "data/train.jsonl", "out": str(out)}), nodes)
    for run in runs:
        assert run.returncode != 0, run.stderr[-3000:]
        assert "captune: error: data/train.jsonl: the processes read different training data (rank 0: 32 usable " \
               "samples; rank 1: 28 usable samples)" in run.stderr
    assert not out.exists()


def test_slurm_tasks_without_torchrun_are_refused(monkeypatch):
    """`srun -N 2 captune train ...`: two whole runs writing one folder; refused before anything is done."""
    from captune import distributed

    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "2")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(CaptuneError, match="started as 2 Slurm tasks without torchrun"):
        distributed.init("cpu")
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "1")  # one task: a plain run
    assert not distributed.init("cpu").distributed
