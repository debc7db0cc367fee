"""LoRA adapters (PEFT) on the native InternVL model, as the tutorial's `wrap_llm_lora` does on the original.

The original puts LoRA on InternLM2's fused `wqkv`; the native model has separate q/k/v projections, so the
same rank adds a little more: 138,412,032 trainable parameters for InternVL2-2B at rank 128 instead of the
tutorial's 125,829,120 (q, k and v each get their own A matrix).
"""

from __future__ import annotations

import math
import re
import warnings
from pathlib import Path

import torch
from torch import nn

from captune.errors import CaptuneError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
LLM_PREFIX = "model.language_model."
VISION_PREFIX = "model.vision_tower."
PROJECTOR = "model.multi_modal_projector"

# PEFT reads `model.is_gradient_checkpointing` whenever it wraps a model, which recent transformers deprecates with a
# FutureWarning on every adapter captune trains, loads or checks: nothing its user can act on.
warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)


def linear_layer_names(model: nn.Module, prefix: str) -> list[str]:
    """Every nn.Linear under `prefix` (the LLM's attention and MLP projections; the vision tower's)."""
    return [name for name, m in model.named_modules() if name.startswith(prefix) and isinstance(m, nn.Linear)]


def add_lora(model: nn.Module, rank: int, alpha: int, dropout: float, vision: bool = False,
             train_projector: bool = False):
    """Freeze everything, then wrap with PEFT LoRA on every linear layer of the LLM (and the vision tower)."""
    from peft import LoraConfig, get_peft_model

    for p in model.parameters():
        p.requires_grad_(False)
    patterns = [layer_pattern(linear_layer_names(model, LLM_PREFIX), LLM_PREFIX + "layers.")]
    if vision:
        patterns.append(layer_pattern(linear_layer_names(model, VISION_PREFIX), VISION_PREFIX + "encoder.layer."))
    # PEFT matches a string target_modules against module names with re.fullmatch.
    pattern = "|".join(p for p in patterns if p)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=pattern,
        modules_to_save=[PROJECTOR] if train_projector else None,
        bias="none",
    )
    peft_model = get_peft_model(model, config)
    # PEFT casts each layer's input to the adapter weights' dtype: with float32 master weights under bf16 autocast
    # that is a float32 copy (and a dropout in float32) of every activation, a third of a training step on an
    # H100. Autocast already runs the adapter's matmuls in bf16, so the input stays as it is.
    for module in peft_model.modules():
        if hasattr(module, "cast_input_dtype_enabled"):
            module.cast_input_dtype_enabled = False
    return peft_model


def init_lora_weights(model: nn.Module, seed: int, place=None) -> None:
    """LoRA's starting point as PEFT draws it (A: Kaiming-uniform, B: zero), from `seed` alone.

    The values do not depend on the device, the number of processes or how FSDP shards them, so a sharded run
    starts where a single process does. `place(param, full)` writes one full tensor (default: a plain copy).
    """
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if ".lora_A." in name:
            full = torch.empty(param.shape)
            nn.init.kaiming_uniform_(full, a=math.sqrt(5), generator=generator)
        elif ".lora_B." in name:
            full = torch.zeros(param.shape)
        else:
            continue
        with torch.no_grad():
            if place is None:
                param.copy_(full)
            else:
                place(param, full)


def layer_pattern(names: list[str], layers_prefix: str) -> str:
    """A compact regex for per-layer module names: `prefix\\.\\d+\\.(self_attn\\.q_proj|...)`."""
    suffixes = sorted({n[len(layers_prefix):].split(".", 1)[1] for n in names if n.startswith(layers_prefix)})
    if not suffixes:
        return ""
    return re.escape(layers_prefix) + r"\d+\.(" + "|".join(re.escape(s) for s in suffixes) + ")"


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def is_adapter_folder(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def model_folder(model: str | Path) -> Path:
    """The folder of a model's config and weights: the model folder itself, or an adapter folder's base model."""
    return adapter_base_path(model) if is_adapter_folder(model) else Path(model)


def adapter_base_path(path: str | Path) -> Path:
    """The base model an adapter was trained on (recorded by `captune train` in adapter_config.json)."""
    from captune.fileio import read_json

    config = read_json(Path(path) / ADAPTER_CONFIG)
    base = config.get("base_model_name_or_path")
    if not base:
        raise CaptuneError("adapter_config.json does not name its base model (base_model_name_or_path); pass --base",
                           path)
    return Path(base)
