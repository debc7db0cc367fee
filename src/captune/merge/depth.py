"""Which models the merge check holds whole in float32, and the depth-reduced model it checks otherwise: the vision
tower, the projector and the LLM's first layers, every width real (each LLM layer is merged by the same rule)."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import torch

from captune.merge.weights import CHECK_DTYPE

CHECK_LAYERS = 2  # LLM layers of the depth-reduced check of a model larger than memory
MEMORY_MARGIN = 1.2  # the float32 model and what the check makes beside it

_LLM_LAYER = re.compile(r"(?:^|\.)model\.language_model\.layers\.(\d+)\.")


def first_layers(n: int) -> Callable[[str], bool]:
    """Whether a native weight name belongs to a model of only the LLM's first `n` layers."""
    return lambda key: (m := _LLM_LAYER.search(key)) is None or int(m[1]) < n


def free_bytes(device: torch.device) -> int | None:
    """Memory free on `device` (on the CPU: what Linux says is available), None when unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_depth(config: dict, device: torch.device) -> tuple[int | None, str]:
    """None when the float32 model of an original `config` fits `device` (the check then runs on it whole), else
    CHECK_LAYERS and why not."""
    from captune.internvl.plan import GB, model_shape, parameter_counts

    s = model_shape(config)
    need, free = parameter_counts(s)["total"] * CHECK_DTYPE.itemsize * MEMORY_MARGIN, free_bytes(device)
    if free is None or need <= free or s.layers <= CHECK_LAYERS:
        return None, ""
    return CHECK_LAYERS, (f"the model in float32 ({need / GB:.0f} GB with the check's own) does not fit {device} "
                          f"({free / GB:.0f} GB free): its logits are checked with the vision tower, the projector and "
                          f"the first {CHECK_LAYERS} of its {s.layers} LLM layers, and every weight written is still "
                          "compared, shard by shard")
