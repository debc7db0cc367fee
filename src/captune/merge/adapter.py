"""A LoRA adapter folder written by PEFT (`captune train`), read for merging: its settings, its A/B matrices in native
weight names, the base release it belongs to. Features this merge does not implement are refused, not ignored."""

from __future__ import annotations

import math
import re
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from captune.errors import CaptuneError
from captune.fileio import read_json
from captune.internvl.config import internvl_config_from_native
from captune.internvl.folder import (
    Checkpoint,
    has_tokenizer,
    open_checkpoint,
)
from captune.internvl.lora import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    PROJECTOR,
    adapter_base_path,
    is_adapter_folder,
)

_PEFT_PREFIX = "base_model.model."
_LORA_SUFFIX = re.compile(r"\.lora_(?P<part>A|B)\.weight\Z")
# adapter_config.json settings that change what a LoRA layer computes, and that this merge does not implement.
_UNSUPPORTED_SETTINGS = {
    "use_dora": "DoRA (weight-decomposed LoRA)",
    "lora_bias": "LoRA biases (lora_bias)",
    "alpha_pattern": "per-layer alphas (alpha_pattern)",
    "fan_in_fan_out": "fan_in_fan_out (Conv1D layers)",
    "layer_replication": "layer replication",
    "trainable_token_indices": "trainable token embeddings (trainable_token_indices)",
    "target_parameters": "LoRA on parameters (target_parameters)",
    "use_qalora": "QA-LoRA",
    "use_bdlora": "BD-LoRA",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "arrow_config": "Arrow routing (arrow_config)",
}


# --------------------------------------------------------------------------------------------- the adapter


@dataclass
class Adapter:
    """A LoRA adapter folder, read whole (adapters are small): deltas by the native weight they change."""

    path: Path
    config: dict
    lora: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # weight -> (A [r,in], B [out,r])
    replaced: dict[str, torch.Tensor] = field(default_factory=dict)  # weight -> the adapter's copy (modules_to_save)

    @property
    def num_parameters(self) -> int:
        """The adapter's trainable parameters: the LoRA matrices and any trained copy (the projector)."""
        lora = sum(a.numel() + b.numel() for a, b in self.lora.values())
        return lora + sum(t.numel() for t in self.replaced.values())

    def scale(self, a: torch.Tensor) -> float:
        rank = a.shape[0]  # the layer's rank (rank_pattern included)
        alpha = self.config.get("lora_alpha", 8)
        return alpha / math.sqrt(rank) if self.config.get("use_rslora") else alpha / rank

    def merged(self, key: str, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The merged value of base weight `key`, in `dtype`."""
        if key in self.replaced:
            new = self.replaced[key]
            _check_shape(key, new, tensor, self.path)
            return new.to(dtype)
        if key in self.lora:
            a, b = self.lora[key]
            _check_shape(key, torch.empty(b.shape[0], a.shape[1], device="meta"), tensor, self.path)
            delta = self.scale(a) * (b.float() @ a.float())  # [out, in]
            return (tensor.float() + delta).to(dtype)
        return tensor.to(dtype) if tensor.is_floating_point() else tensor

    @property
    def targets(self) -> set[str]:
        return set(self.lora) | set(self.replaced)


def _check_shape(key: str, new: torch.Tensor, base: torch.Tensor, path: Path) -> None:
    if tuple(new.shape) != tuple(base.shape):
        raise CaptuneError(f"adapter does not fit its base model: {key} is {tuple(new.shape)} in the adapter, "
                           f"{tuple(base.shape)} in the base", path)


def read_adapter(path: str | Path) -> Adapter:
    """Validate an adapter folder written by `captune train` (PEFT's format) and load its weights."""
    path = Path(path)
    _refuse_non_adapter(path)
    config = read_json(path / ADAPTER_CONFIG)
    _check_adapter_config(config, path / ADAPTER_CONFIG)
    adapter = Adapter(path=path, config=config)
    _parse_weights(adapter, _load_adapter_weights(path))
    return adapter


def _refuse_non_adapter(path: Path) -> None:
    if not path.exists():
        raise CaptuneError("no such folder", path)
    if is_adapter_folder(path):
        return
    if (path / "config.json").is_file():
        raise CaptuneError("is a model folder, not a LoRA adapter (already merged?): pass a checkpoint folder "
                           f"written by `captune train`, with {ADAPTER_CONFIG}", path)
    raise CaptuneError(f"not a LoRA adapter folder: no {ADAPTER_CONFIG}", path)


def _check_adapter_config(config: dict, path: Path) -> None:
    if not isinstance(config, dict) or config.get("peft_type", "LORA") != "LORA":
        kind = config.get("peft_type") if isinstance(config, dict) else None
        raise CaptuneError(f"not a LoRA adapter (peft_type {kind!r}); only LoRA adapters can be merged", path)
    for key, what in _UNSUPPORTED_SETTINGS.items():
        if config.get(key):
            raise CaptuneError(f"{what} is not supported by captune merge; merge it with PEFT's merge_and_unload", path)
    if config.get("bias", "none") != "none":
        raise CaptuneError(f"bias {config['bias']!r} is not supported by captune merge (only 'none')", path)
    for name in config.get("modules_to_save") or []:
        if not (PROJECTOR == name or PROJECTOR.endswith("." + name)):
            raise CaptuneError(f"modules_to_save {name!r} is not supported: only the projector ({PROJECTOR}) "
                               "can be trained whole and merged", path)


def _load_adapter_weights(path: Path) -> dict[str, torch.Tensor]:
    if (path / ADAPTER_WEIGHTS).is_file():
        from safetensors.torch import load_file

        try:
            return load_file(path / ADAPTER_WEIGHTS)
        except Exception as e:
            raise CaptuneError(f"cannot read the adapter weights: {e}", path / ADAPTER_WEIGHTS) from None
    if (path / "adapter_model.bin").is_file():
        return torch.load(path / "adapter_model.bin", map_location="cpu", weights_only=True)
    raise CaptuneError(f"no adapter weights ({ADAPTER_WEIGHTS})", path)


def _parse_weights(adapter: Adapter, state: dict[str, torch.Tensor]) -> None:
    """Sort PEFT's state dict into LoRA pairs and whole copies; refuse anything else (DoRA magnitudes, ...)."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    projector = bool(adapter.config.get("modules_to_save"))
    for key, tensor in state.items():
        name = key.removeprefix(_PEFT_PREFIX)
        m = _LORA_SUFFIX.search(name)
        if key.startswith(_PEFT_PREFIX) and m and tensor.ndim == 2:
            parts.setdefault(name[: m.start()] + ".weight", {})[m["part"]] = tensor
        elif key.startswith(_PEFT_PREFIX) and projector and name.startswith(PROJECTOR + "."):
            adapter.replaced[name] = tensor
        else:
            raise CaptuneError(f"unsupported adapter tensor {key!r}: captune merge handles LoRA on linear layers "
                               "and a trained projector only", adapter.path)
    for weight, pair in sorted(parts.items()):
        if set(pair) != {"A", "B"} or pair["B"].shape[1] != pair["A"].shape[0]:
            raise CaptuneError(f"incomplete or inconsistent LoRA pair for {weight}", adapter.path)
        adapter.lora[weight] = (pair["A"], pair["B"])
    if not adapter.lora and not adapter.replaced:
        raise CaptuneError("the adapter has no weights", adapter.path)


def adapter_subset(adapter: Adapter, keep: Callable[[str], bool], folder: Path) -> Adapter:
    """The part of `adapter` that changes the weights `keep` names; also written to `folder` as a PEFT adapter of its
    own, for PEFT to apply to a depth-reduced model (which lacks the other layers)."""
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in _load_adapter_weights(adapter.path).items()
             if keep(k.removeprefix(_PEFT_PREFIX))}
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(adapter.path / ADAPTER_CONFIG, folder / ADAPTER_CONFIG)
    save_file(state, folder / ADAPTER_WEIGHTS)
    return Adapter(adapter.path, adapter.config, {k: v for k, v in adapter.lora.items() if keep(k)},
                   {k: v for k, v in adapter.replaced.items() if keep(k)})


def open_base(adapter: Adapter, base: str | Path | None = None) -> Checkpoint:
    """The base model of an adapter (recorded in adapter_config.json, or `base`); never itself an adapter."""
    path = Path(base) if base is not None else adapter_base_path(adapter.path)
    if is_adapter_folder(path):
        raise CaptuneError("the base model is itself a LoRA adapter: merge that one first and pass --base", path)
    if not path.exists():
        raise CaptuneError("base model not found (moved since training? pass --base)", path)
    return open_checkpoint(path)



def original_config(ckpt: Checkpoint) -> dict:
    return ckpt.internvl_config or internvl_config_from_native(ckpt.config)


def base_tokenizer(ckpt: Checkpoint, warn: bool = True):
    """The base's tokenizer (loaded once: InternLM2's takes seconds), or None when it has none."""
    if not has_tokenizer(ckpt.path):
        if warn:
            warnings.warn(f"{ckpt.path}: no tokenizer files; merging weights and config only", stacklevel=3)
        return None
    from captune.internvl.tokenizer import load_tokenizer

    return load_tokenizer(ckpt.path)
