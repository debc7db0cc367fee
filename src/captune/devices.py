"""Devices and dtypes by name, the same in every command: `--device auto|cpu|cuda[:N]` (checked up front by
`check_device`), `--dtype auto|bf16|fp16|fp32`."""

from __future__ import annotations

import torch

from captune.errors import CaptuneError

DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
}
SHORT_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def resolve_dtype(dtype: str | torch.dtype | None, device: str | torch.device) -> torch.dtype:
    """None or "auto": bf16 on a GPU (as the original evaluation), float32 on the CPU (as the reference outputs)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise CaptuneError(f"unknown dtype {dtype!r}; use one of bf16, fp16, fp32")
    return DTYPES[dtype]


def check_device(name: str | None, option: str = "--device") -> str:
    """A device name checked before any work starts: auto, cpu, cuda or cuda:N, and the GPU there (one line of
    CaptuneError naming `option` otherwise). Returns the name."""
    if name is None or name == "auto":
        return "auto"
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise CaptuneError(f"{option} must be auto, cpu, cuda or cuda:N, not {name!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CaptuneError(f"{option} {name}: no CUDA GPU is available (use {option} cpu or auto)")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise CaptuneError(f"{option} {name}: this machine has {count} GPU(s), cuda:0 to cuda:{count - 1}")
    return name


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise CaptuneError(f"--device must be auto, cpu, cuda or cuda:N, not {device!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CaptuneError("--device cuda was asked for, but no CUDA GPU is available")
    return device


def dtype_name(dtype: torch.dtype) -> str:
    """"bfloat16", "float32": the name in messages."""
    return str(dtype).removeprefix("torch.")


def short_dtype_name(dtype: torch.dtype) -> str:
    """"bf16", "fp32": the name of the command-line option."""
    return SHORT_NAMES[dtype]
