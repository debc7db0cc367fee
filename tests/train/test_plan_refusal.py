"""`captune train` refuses, before loading anything, a run that `captune plan` says cannot fit the GPU (saying what
would fit), and a per-size recipe on a model of another size. The GPU is faked (its memory read by
`placement.card_gb`); the models are the releases' config.json alone (tests/internvl/releases), so loading their
weights is impossible: a refusal that came after loading would fail on the missing weights instead."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from captune import distributed
from captune.cli import main
from captune.errors import CaptuneError
from captune.internvl import placement
from captune.train import config as cfg
from captune.train import start

RELEASES = Path(__file__).resolve().parents[1] / "internvl" / "releases"


@pytest.fixture
def fake_gpu(monkeypatch):
    """A CUDA device of `memory` GB as the run's device (nothing runs on it: the checks come first)."""
    import captune.devices
    import captune.internvl.load

    memory = {"gb": 79.2}  # an 80 GB card as torch reports it
    monkeypatch.setattr(captune.devices, "check_device", lambda name, option="--device": name)
    monkeypatch.setattr(distributed, "init", lambda device=None: distributed.Context(device=torch.device("cuda", 0)))
    monkeypatch.setattr(placement, "card_gb", lambda device: memory["gb"])

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before the plan's check")

    monkeypatch.setattr(captune.internvl.load, "load", never)
    return memory


def train(tmp_path: Path, release: str, *options: str) -> list[str]:
    data = tmp_path / "train.jsonl"
    data.write_text('{"image": "a.jpg", "conversations": []}\n')
    return ["train", "--model", str(RELEASES / release), "--data", str(data), "--out", str(tmp_path / "run"),
            "--device", "cuda", *options]


def error(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("captune: error: "), lines
    return lines[0]


def test_76b_on_one_gpu_is_refused_before_loading(tmp_path, fake_gpu, capsys):
    assert main(train(tmp_path, "InternVL2-Llama3-76B", "--recipe", "internvl2_76b_coco_lora")) == 2
    line = error(capsys)
    assert "does not fit this GPU" in line and "71.3 of this GPU's 79.2 GB are usable" in line
    assert re.search(r"use FSDP2 over \d+ GPUs of this size \(torchrun --nproc-per-node \d+", line), line
    assert "captune plan " in line and not (tmp_path / "run").exists()


def test_more_gpus_than_a_node_has_are_proposed_as_nodes(tmp_path, fake_gpu, capsys, monkeypatch):
    """76B on 24 GB cards needs more GPUs than a node of 8 holds: the proposal is torchrun over several nodes."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    fake_gpu["gb"] = 23.6
    assert main(train(tmp_path, "InternVL2-Llama3-76B", "--recipe", "internvl2_76b_coco_lora")) == 2
    line = error(capsys)
    found = re.search(r"use FSDP2 over (\d+) GPUs of this size \(torchrun --nnodes (\d+) --nproc-per-node 8 ", line)
    assert found, line
    assert int(found[1]) > 8 and int(found[2]) == -(-int(found[1]) // 8)


def test_checkpointing_and_token_budget_are_proposed(tmp_path, fake_gpu, capsys):
    """The 2B recipe (16,384-token rows, no checkpointing: ~52 GB) on a 40 GB card."""
    fake_gpu["gb"] = 39.4
    assert main(train(tmp_path, "InternVL2-2B")) == 2
    line = error(capsys)
    assert "gradient checkpointing off, token budget 16,384" in line
    assert "would fit: turn on --gradient-checkpointing (" in line and "; or lower --token-budget to 8192 (" in line


def test_a_run_that_fits_goes_on_to_the_model_checks(tmp_path, fake_gpu, capsys):
    """The 2B recipe fits an 80 GB card: the start goes on to the folder's checks (no weights here), still unloaded."""
    assert main(train(tmp_path, "InternVL2-2B")) == 2
    line = error(capsys)
    assert "does not fit" not in line and "no weights" in line


def test_a_recipe_for_another_size_is_refused(tmp_path, fake_gpu, capsys):
    assert main(train(tmp_path, "InternVL2-8B", "--recipe", "internvl2_2b_coco_lora")) == 2
    assert "use --recipe internvl2_8b_coco_lora" in error(capsys)


def test_without_a_recipe_the_models_size_decides(tmp_path, fake_gpu, capsys):
    """No --recipe on an 8B: its own recipe (not the 2B tutorial's, which would be refused), so the start goes on
    to the folder's checks."""
    assert main(train(tmp_path, "InternVL2-8B")) == 2
    line = error(capsys)
    assert "--recipe" not in line and "no weights" in line


def test_no_memory_refusal_on_the_cpu(tmp_path):
    """The CPU has no fixed memory: the 76B on one CPU process is not refused by the plan (but its recipe is
    checked: the 26B's is refused)."""
    config = cfg.resolve("internvl2_76b_coco_lora", {"model": str(RELEASES / "InternVL2-Llama3-76B"),
                                                      "data": "d", "out": str(tmp_path / "run")})
    start.check_plan(config, distributed.Context())
    config.recipe = "internvl2_26b_coco_lora"
    with pytest.raises(CaptuneError, match="recipe internvl2_26b_coco_lora is for InternVL2-26B"):
        start.check_plan(config, distributed.Context())


def test_fsdp_over_the_processes_is_proposed(fake_gpu):
    """Under torchrun with 8 processes, the 40B (75 GB of bf16 weights) replicated by DDP does not fit; --fsdp does."""
    config = cfg.resolve("internvl2_40b_coco_lora", {"model": str(RELEASES / "InternVL2-40B"), "data": "d",
                                                      "out": "o", "fsdp": "false"})
    ctx = distributed.Context(world_size=8, device=torch.device("cuda", 0))
    with pytest.raises(CaptuneError, match=r"would fit: add --fsdp: FSDP2 over the 8 processes \("):
        start.check_plan(config, ctx)
    config.fsdp = True
    start.check_plan(config, ctx)
