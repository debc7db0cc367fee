"""Training checkpoints: a PEFT adapter plus everything needed to continue exactly where the run stopped.

    OUT/checkpoint-000200/adapter_config.json         PEFT's format, base_model_name_or_path = the base model
    OUT/checkpoint-000200/adapter_model.safetensors
    OUT/checkpoint-000200/captune.yaml                the run's configuration (template, tiling, ...)
    OUT/checkpoint-000200/trainer_state.pt            optimizer, scheduler, RNG of every process, step

A checkpoint is written into `.checkpoint-000200.tmp` and renamed when complete, so a process killed while
saving leaves the previous checkpoints intact; a folder is a checkpoint only once it has its final name.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

TRAINER_STATE = "trainer_state.pt"
_NAME = re.compile(r"checkpoint-(\d+)\Z")


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step:06d}"


def list_checkpoints(out: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first."""
    found = []
    if out.is_dir():
        for p in out.iterdir():
            m = _NAME.match(p.name)
            if m and p.is_dir() and (p / TRAINER_STATE).is_file():
                found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(out: Path) -> Path | None:
    found = list_checkpoints(out)
    return found[-1][1] if found else None


def write_checkpoint(out: Path, name: str, write_adapter, state: dict[str, Any], run_config: Path | None) -> Path:
    """`write_adapter(folder)` saves the PEFT adapter; `state` is pickled beside it; then the rename."""
    final = out / name
    tmp = out / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_adapter(tmp)
    torch.save(state, tmp / TRAINER_STATE)
    if run_config is not None and run_config.is_file():
        shutil.copy2(run_config, tmp / run_config.name)
    if final.exists():
        old = out / f".{name}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    return final


def prune_checkpoints(out: Path, keep: int) -> None:
    for _, path in list_checkpoints(out)[:-keep] if keep > 0 else []:
        shutil.rmtree(path, ignore_errors=True)


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
