"""`captune.load`: any InternVL2 checkpoint as a transformers `InternVLForConditionalGeneration`, no remote code."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from .checkpoint import Checkpoint, has_tokenizer, open_checkpoint
from .convert import KeyMap, _lm_head_in, check_supported, iter_native_tensors, native_config
from .errors import CaptuneError

_DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
}


def resolve_dtype(dtype: str | torch.dtype | None, device: str | torch.device) -> torch.dtype:
    """None or "auto": bf16 on a GPU (as the original evaluation), float32 on the CPU (as the reference outputs)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise CaptuneError(f"unknown dtype {dtype!r}; use one of bf16, fp16, fp32")
    return _DTYPES[dtype]


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CaptuneError("--device cuda was asked for, but no CUDA GPU is available")
    return device


def load(
    path: str | Path,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    attn_implementation: str = "sdpa",
    image_token_id: int | None = None,
    base: str | Path | None = None,
):
    """Load a checkpoint folder; return `(model, processor)`.

    `path` is an original InternVL2 release folder (`InternVLChatModel`, converted on the fly, tensor by tensor)
    or a folder in transformers' native layout. `processor` is None when the folder has no tokenizer.
    `path` may also be a LoRA adapter folder written by `captune train`: its base model is loaded and the adapter
    merged in memory (`base` overrides the base model recorded in the adapter).
    `image_token_id` is only needed for checkpoints without a tokenizer (the id of `<IMG_CONTEXT>`).
    """
    from .lora import is_adapter_folder

    if is_adapter_folder(path):
        return load_adapter(path, base=base, dtype=dtype, device=device, attn_implementation=attn_implementation)
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    ckpt = open_checkpoint(path)
    tokenizer = None
    if has_tokenizer(ckpt.path):
        from .tokenizer import image_token_ids, load_tokenizer

        tokenizer = load_tokenizer(ckpt.path)
        if image_token_id is None:
            image_token_id = image_token_ids(tokenizer)["<IMG_CONTEXT>"]

    if ckpt.layout == "internvl":
        model = _load_original(ckpt, dtype, device, attn_implementation, image_token_id)
    else:
        model = _load_native(ckpt, dtype, device, attn_implementation, image_token_id)
    model.eval()

    if tokenizer is None:
        warnings.warn(f"{ckpt.path}: no tokenizer files; loading the model without a processor", stacklevel=2)
        return model, None
    from .processor import Processor

    processor = Processor.from_checkpoint(ckpt, tokenizer)
    if processor is not None:
        model.generation_config.eos_token_id = processor.stop_token_id
        model.generation_config.pad_token_id = processor.pad_token_id
    return model, processor


def _load_native(ckpt: Checkpoint, dtype, device, attn_implementation, image_token_id):
    from transformers import InternVLForConditionalGeneration

    model = InternVLForConditionalGeneration.from_pretrained(
        ckpt.path, dtype=dtype, attn_implementation=attn_implementation
    ).to(device)
    if image_token_id is not None:
        model.config.image_token_id = image_token_id
    return model


def _load_original(ckpt: Checkpoint, dtype, device, attn_implementation, image_token_id):
    """Build the native model on the meta device and fill it tensor by tensor, converting as we go.

    Peak memory is the model in `dtype` plus one tensor: no state dict of the whole model is ever built.
    """
    from transformers import InternVLForConditionalGeneration

    config_path = ckpt.path / "config.json"
    check_supported(ckpt.config, config_path)
    keymap = KeyMap(ckpt.config)
    tie = not _lm_head_in(ckpt)
    config = native_config(ckpt.config, image_token_id, tie_word_embeddings=tie)
    with torch.device("meta"):
        model = InternVLForConditionalGeneration(config)
    model.set_attn_implementation(attn_implementation)

    params = dict(model.named_parameters())
    loaded: set[str] = set()
    for shard in ckpt.shards:
        for key, tensor in iter_native_tensors(ckpt, shard, keymap):
            target = params.get(key)
            if target is None:
                raise CaptuneError(f"tensor {key!r} has no place in the native model", shard)
            if tensor.shape != target.shape:
                raise CaptuneError(
                    f"tensor {key!r} has shape {tuple(tensor.shape)}, config.json implies {tuple(target.shape)}", shard
                )
            module_name, _, name = key.rpartition(".")
            value = tensor.to(device=device, dtype=dtype)
            model.get_submodule(module_name)._parameters[name] = nn.Parameter(value, requires_grad=target.requires_grad)
            loaded.add(key)
    if tie:
        model.tie_weights()
        loaded |= {k for k, p in model.named_parameters() if not p.is_meta}
    missing = sorted(set(params) - loaded)
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise CaptuneError(f"checkpoint is missing {', '.join(missing[:5])}{more}", ckpt.path)
    _materialize_buffers(model, device)
    return model


def _materialize_buffers(model: nn.Module, device: torch.device) -> None:
    """Recompute buffers left on the meta device (rotary frequencies): they are derived from the config."""
    for name, module in list(model.named_modules()):
        if not any(b.is_meta for b in module.buffers(recurse=False)):
            continue
        if any(True for _ in module.parameters(recurse=False)) or not hasattr(module, "config"):
            raise RuntimeError(f"cannot materialise buffers of {name} ({type(module).__name__})")
        rebuilt = type(module)(config=module.config).to(device)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, rebuilt)


def load_adapter(
    path: str | Path,
    base: str | Path | None = None,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    attn_implementation: str = "sdpa",
):
    """Base model + LoRA adapter, merged in memory: the same function as `captune merge` writes to disk."""
    from peft import PeftModel

    from .lora import adapter_base_path

    base_path = Path(base) if base is not None else adapter_base_path(path)
    model, processor = load(base_path, dtype=dtype, device=device, attn_implementation=attn_implementation)
    try:
        model = PeftModel.from_pretrained(model, str(path)).merge_and_unload()
    except (ValueError, KeyError, RuntimeError) as e:
        raise CaptuneError(f"adapter does not fit its base model {base_path}: {e}", path) from None
    model.eval()
    return model, processor
