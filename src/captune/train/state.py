"""Training checkpoints: a PEFT adapter plus everything needed to continue exactly where the run stopped.

    OUT/checkpoint-000200/adapter_config.json         PEFT's format, base_model_name_or_path = the base model
    OUT/checkpoint-000200/adapter_model.safetensors
    OUT/checkpoint-000200/captune.yaml                the run's configuration (template, tiling, ...)
    OUT/checkpoint-000200/trainer_state.pt            optimizer, scheduler, RNG of every process, step

A checkpoint is written with `fileio.write_dir`: into `.checkpoint-000200.tmp-PID`, renamed when complete, so a
process killed while saving leaves the previous checkpoints intact; a folder is a checkpoint only once it has its
final name. Replacing one (`best/`, or a rerun writing the same step) sets the old one aside as `.NAME.old-PID`
first, and pruning renames a checkpoint `.NAME.deleting-PID` before deleting it; `recover_checkpoints` (run before
listing or saving) tidies what a kill left, putting a set-aside `.NAME.old-PID` back when NAME is missing.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import torch

from captune.fileio import delete_dir, recover_dirs, write_dir

TRAINER_STATE = "trainer_state.pt"
BEST = "best"  # the checkpoint of the best in-training evaluation, kept apart from the step checkpoints
_NAME = re.compile(r"checkpoint-(\d+)\Z")


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step:06d}"


def recover_checkpoints(out: Path) -> None:
    """Tidy what a save or prune killed by a signal (kill -9: no cleanup runs) left in `out` (`fileio.recover_dirs`).

    Every leftover is stale here, whatever process wrote it: a run's checkpoints are written by one process (rank 0),
    and this runs only while it is not writing: at start-up (via `latest_checkpoint`, on every process of the run)
    and in it before each save. So the processes of a run that recover at once all take the same decisions (a PID
    check could not promise that: after a restart, a dead writer's PID may be a live process of the new run), and
    it is idempotent and safe when they do it at once.
    """
    recover_dirs(out, writers_gone=True)


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


def checkpoint_step(path: Path) -> int | None:
    """The step of a checkpoint folder, from its name (None for `best/`)."""
    m = _NAME.match(Path(path).name)
    return int(m.group(1)) if m else None


def checkpoint_folders(out: Path) -> list[Path]:
    """Every checkpoint folder in `out`, complete or not, and `best/` (after `recover_checkpoints`): what a run
    that starts again from step 0 must not mix with its own."""
    recover_checkpoints(out)
    if not out.is_dir():
        return []
    return sorted(p for p in out.iterdir() if p.is_dir() and (_NAME.match(p.name) or p.name == BEST))


def write_checkpoint(out: Path, name: str, write_adapter, state: dict[str, Any], run_config: Path | None) -> Path:
    """`write_adapter(folder)` saves the PEFT adapter; `state` is pickled beside it; then the rename."""
    recover_checkpoints(out)  # before write_dir may delete a `.NAME.old-*` that is the only copy of NAME
    with write_dir(out / name) as tmp:
        write_adapter(tmp)
        torch.save(state, tmp / TRAINER_STATE)
        if run_config is not None and run_config.is_file():
            shutil.copy2(run_config, tmp / run_config.name)
    return out / name


def prune_checkpoints(out: Path, keep: int, upto: int | None = None) -> None:
    """Keep the newest `keep` step checkpoints (0: all). With `upto` (the step just saved) only those up to it count:
    a newer one is no part of this run (`captune train` refuses to start again beside one), and never outnumbers
    the checkpoint just written."""
    found = [(step, path) for step, path in list_checkpoints(out) if upto is None or step <= upto]
    for _, path in found[:-keep] if keep > 0 else []:
        delete_dir(path)  # renamed first: a kill half-way leaves no half-deleted folder under a checkpoint name


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
