"""README's "Which GPUs for which size" table: `captune plan` for the seven InternVL2 releases on 1 and 8 GPUs of 80 GB.

    python scripts/plan_table.py

Prints the markdown table (and its footnote) that README.md holds; tests/internvl/test_plan_table.py checks that the
two are the same, so a change to the plan or to a recipe that moves a figure fails until README.md is regenerated.
Each release is its config.json alone (tests/internvl/releases/), planned with its own recipe
(internvl2_<size>_coco_lora), exactly as `captune plan RELEASE --gpus N --gpu-memory 80` plans it.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

from captune.internvl.plan import plan

RELEASES = Path(__file__).resolve().parents[1] / "tests" / "internvl" / "releases"
SIZES = ("1B", "2B", "4B", "8B", "26B", "40B", "76B")
MACHINES = (1, 8)  # GPUs of 80 GB
GPU_GB = 80.0
MARKS = "†‡§¶"  # one per distinct note of the plan (a recipe's global batch too small for 8 processes)


def folder(size: str) -> Path:
    return RELEASES / ("InternVL2-Llama3-76B" if size == "76B" else f"InternVL2-{size}")


def eval_cell(e: dict, gpus: int) -> str:
    if not e["fits"]:
        return f"no: needs {e['gpus_per_model']} GPUs per model"
    k = e["gpus_per_model"]
    layout = "" if gpus == 1 else f"{e['replicas']} x {k} GPU{'s' if k > 1 else ''}, "
    compiled = ", compiled" if e["compiled"] else ""
    return f"{layout}batch {e['batch']}{compiled}, {e['memory_gb']['total']:.0f} GB: {e['minutes']:.1f} min"


def train_cell(t: dict, gpus: int, notes: dict[str, str]) -> str:
    if not t["fits"]:
        return f"no: FSDP2 over {t['gpus_needed']} GPUs would" if t.get("gpus_needed") else "no"
    strategy = "" if gpus == 1 else f"{t['strategy']}, "
    cell = (f"{strategy}checkpointing {'on' if t['gradient_checkpointing'] else 'off'}, {t['token_budget']:,} tokens, "
            f"{t['memory_gb']['total']:.0f} GB: {t['hours_per_epoch']:.1f} h")
    if t.get("note"):
        cell += notes.setdefault(t["note"], MARKS[len(notes)])
    return cell


def table() -> str:
    """The markdown table, one row per release, and the footnote."""
    header = ["InternVL2 release", "parameters, bf16 weights"]
    for gpus in MACHINES:
        header += [f"evaluation, {gpus} x {GPU_GB:g} GB", f"LoRA training, {gpus} x {GPU_GB:g} GB"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    notes: dict[str, str] = {}
    for size in SIZES:
        row = []
        for gpus in MACHINES:
            with contextlib.redirect_stdout(io.StringIO()):  # plan prints its own table; the dict is what counts
                r = plan(folder(size), gpus=gpus, gpu_memory=GPU_GB, json=True)
            row += [eval_cell(r["eval"], gpus), train_cell(r["train"], gpus, notes)]
        lines.append(f"| {r['model']['release']} | {r['parameters']['total'] / 1e9:.2f} B, {r['weights_gb']:.1f} GB | "
                     + " | ".join(row) + " |")
    lines.append("")
    lines.append("Per GPU: evaluation of the 5,000 COCO test images (7 tiles, 30 new tokens) as replicas x GPUs per "
                 "model, batch (compiled: the prompt's repeated blocks, as `--compile auto` does for a model on one GPU "
                 "with 4,000 images or more), GB per GPU and minutes; LoRA training with the size's recipe "
                 "(`internvl2_<size>_coco_lora`) as `captune train` runs it (the recipe's strategy and checkpointing, "
                 "at the largest token budget that fits), as strategy, checkpointing, token budget, GB per GPU and "
                 "hours per COCO epoch. "
                 "Times are the plan's estimates for H100/H200-class GPUs."
                 + "".join(f" {mark} {note[0].upper()}{note[1:]}." for note, mark in notes.items()))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(table(), end="")
