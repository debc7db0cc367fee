"""Training checkpoints: a PEFT adapter plus everything needed to continue exactly where the run stopped.

    OUT/checkpoint-000200/adapter_config.json         PEFT's format, base_model_name_or_path = the base model
    OUT/checkpoint-000200/adapter_model.safetensors
    OUT/checkpoint-000200/captune.yaml                the run's configuration (template, tiling, ...)
    OUT/checkpoint-000200/trainer_state.pt            optimizer, scheduler, RNG of every process, step

A checkpoint is written into `.checkpoint-000200.tmp` and renamed when complete, so a process killed while
saving leaves the previous checkpoints intact; a folder is a checkpoint only once it has its final name.
Replacing one (`best/`, or a rerun writing the same step) sets the old one aside as `.NAME.old` first; a process
killed between those two renames leaves no NAME, and `recover_checkpoints` (run before listing or saving) puts
`.NAME.old` back.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

TRAINER_STATE = "trainer_state.pt"
_NAME = re.compile(r"checkpoint-(\d+)\Z")
_LEFTOVER = re.compile(r"\.(.+)\.(tmp|old|deleting)\Z")  # write_checkpoint's and prune_checkpoints' own folders


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step:06d}"


def recover_checkpoints(out: Path) -> None:
    """Tidy what a save or prune killed by a signal (kill -9: no cleanup runs) left in `out`.

    `.NAME.old` is a complete checkpoint set aside to be replaced: renamed back to NAME when NAME is missing
    (killed between the two renames), deleted when NAME exists (killed after them). `.NAME.tmp` (half-written or
    never renamed) and `.NAME.deleting` (half-pruned) are deleted. Runs at start-up (via `latest_checkpoint`) and
    before each save, when no process is writing checkpoints into `out`; idempotent, and safe when several
    processes of one run do it at once.
    """
    if not out.is_dir():
        return
    for p in sorted(out.iterdir()):
        m = _LEFTOVER.match(p.name)
        if not m or not p.is_dir():
            continue
        final = out / m.group(1)
        if m.group(2) == "old" and not final.exists():
            with contextlib.suppress(FileNotFoundError):  # another process of the run put it back first
                os.replace(p, final)
        else:
            shutil.rmtree(p, ignore_errors=True)


def list_checkpoints(out: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first (after `recover_checkpoints`)."""
    recover_checkpoints(out)
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
    recover_checkpoints(out)  # before anything below may delete a `.NAME.old` that is the only copy of NAME
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
        # renamed first: a kill half-way through rmtree must not leave a half-deleted folder under a checkpoint name
        trash = out / f".{path.name}.deleting"
        os.replace(path, trash)
        shutil.rmtree(trash, ignore_errors=True)


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
