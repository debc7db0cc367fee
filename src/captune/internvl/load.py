"""`captune.load`: any InternVL2 checkpoint as a transformers `InternVLForConditionalGeneration`, no remote code."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import torch
from torch import nn

from captune.devices import resolve_device, resolve_dtype
from captune.errors import CaptuneError
from captune.inputs.processor import Processor
from captune.inputs.templates import get_template
from captune.internvl.config import check_supported, native_config
from captune.internvl.convert import lm_head_in
from captune.internvl.folder import Checkpoint, has_tokenizer, open_checkpoint
from captune.internvl.keys import KeyMap


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
    `device="meta"` gives the model without weights (for FSDP, which shards it first; see `fill_weights`).
    """
    from captune.internvl.lora import is_adapter_folder

    if is_adapter_folder(path):
        return load_adapter(path, base=base, dtype=dtype, device=device, attn_implementation=attn_implementation)
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    ckpt = open_checkpoint(path)
    tokenizer = None
    if has_tokenizer(ckpt.path):
        from captune.internvl.tokenizer import image_token_ids, load_tokenizer

        tokenizer = load_tokenizer(ckpt.path)
        if image_token_id is None:
            image_token_id = image_token_ids(tokenizer)["<IMG_CONTEXT>"]

    if device.type == "meta":  # shapes only, for FSDP: see `empty_model`
        model = empty_model(ckpt, attn_implementation, image_token_id).to(dtype)
    elif ckpt.layout == "internvl":
        model = load_original(ckpt, dtype, device, attn_implementation, image_token_id)
    else:
        model = load_native(ckpt, dtype, device, attn_implementation, image_token_id)
    model.eval()

    if tokenizer is None:
        warnings.warn(f"{ckpt.path}: no tokenizer files; loading the model without a processor", stacklevel=2)
        return model, None
    processor = processor_for(ckpt, tokenizer)
    if processor is not None:
        model.generation_config.eos_token_id = processor.stop_token_id
        model.generation_config.pad_token_id = processor.pad_token_id
    return model, processor


def load_native(ckpt: Checkpoint, dtype, device, attn_implementation, image_token_id):
    from transformers import InternVLForConditionalGeneration

    model = InternVLForConditionalGeneration.from_pretrained(
        ckpt.path, dtype=dtype, attn_implementation=attn_implementation
    ).to(device)
    if image_token_id is not None:
        model.config.image_token_id = image_token_id
    return model


def load_original(ckpt: Checkpoint, dtype, device, attn_implementation, image_token_id):
    """Build the native model on the meta device and fill it tensor by tensor, converting as we go.

    Peak memory is the model in `dtype` plus one tensor: no state dict of the whole model is ever built.
    """
    model = empty_model(ckpt, attn_implementation, image_token_id)

    def assign(name: str, param: nn.Parameter, tensor: torch.Tensor) -> None:
        module_name, _, attr = name.rpartition(".")
        value = tensor.to(device=device, dtype=dtype)
        model.get_submodule(module_name)._parameters[attr] = nn.Parameter(value, requires_grad=param.requires_grad)

    fill_weights(model, ckpt, assign)
    if not lm_head_in(ckpt):
        model.tie_weights()
    rebuild_buffers(model, device, only_meta=True)
    return model


def empty_model(ckpt: Checkpoint, attn_implementation: str = "sdpa", image_token_id: int | None = None):
    """The native model of a checkpoint folder (either layout) on the meta device: shapes, no memory.

    FSDP shards this before any weight exists, then `fill_weights` loads each rank's part.
    """
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    if ckpt.layout == "internvl":
        check_supported(ckpt.config, ckpt.path / "config.json")
        config = native_config(ckpt.config, image_token_id, tie_word_embeddings=not lm_head_in(ckpt))
    else:
        config = InternVLConfig.from_pretrained(ckpt.path)
        if image_token_id is not None:
            config.image_token_id = image_token_id
    with torch.device("meta"):
        model = InternVLForConditionalGeneration(config)
    model.set_attn_implementation(attn_implementation)
    return model


# PEFT wraps a layer without renaming its weights' place in the base model; these segments undo the wrapping.
_WRAPPER_SEGMENTS = re.compile(r"^base_model\.model\.|\.base_layer(?=\.)|\.original_module(?=\.)|\.modules_to_save\.[^.]+(?=\.)")


def fill_weights(model: nn.Module, ckpt: Checkpoint, put) -> None:
    """Stream a checkpoint's tensors, in native names, into the parameters of `model` (plain or PEFT-wrapped).

    `put(name, param, tensor)` places one full tensor; every name, shape and missing weight is checked.
    """
    from captune.internvl.keys import iter_model_tensors

    targets: dict[str, list[tuple[str, nn.Parameter]]] = {}
    for name, param in model.named_parameters():
        if ".lora_" not in name:
            targets.setdefault(_WRAPPER_SEGMENTS.sub("", name), []).append((name, param))
    keymap = KeyMap(ckpt.config) if ckpt.layout == "internvl" else None
    net = model.base_model.model if hasattr(model, "peft_config") else model
    head = net.get_output_embeddings()
    head = getattr(head, "base_layer", head)  # a LoRA-wrapped head
    tied = head.weight is net.get_input_embeddings().weight  # as the model itself was built, not as one flag says
    loaded: set[str] = set()
    for shard in ckpt.shards:
        for key, tensor in iter_model_tensors(ckpt, shard, keymap):
            places = targets.get(key)
            if places is None:
                if key == "lm_head.weight" and tied:
                    continue
                raise CaptuneError(f"tensor {key!r} has no place in the native model", shard)
            for name, param in places:
                if tuple(tensor.shape) != tuple(param.shape):
                    raise CaptuneError(f"tensor {key!r} has shape {tuple(tensor.shape)}, config.json implies "
                                       f"{tuple(param.shape)}", shard)
                put(name, param, tensor)
            loaded.add(key)
    missing = sorted(set(targets) - loaded - ({"lm_head.weight"} if tied else set()))
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise CaptuneError(f"checkpoint is missing {', '.join(missing[:5])}{more}", ckpt.path)


def rebuild_buffers(model: nn.Module, device: torch.device, only_meta: bool = False) -> None:
    """Recompute the buffers of parameter-free modules (rotary frequencies): they are derived from the config.

    Needed after meta-device loading (`only_meta`) and after FSDP's `to_empty`, which leaves them uninitialised.
    """
    for name, module in list(model.named_modules()):
        buffers = list(module.buffers(recurse=False))
        if not buffers or (only_meta and not any(b.is_meta for b in buffers)):
            continue
        if any(True for _ in module.parameters(recurse=False)) or not hasattr(module, "config"):
            if only_meta:
                raise RuntimeError(f"cannot materialise buffers of {name} ({type(module).__name__})")
            continue
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

    from captune.internvl.lora import adapter_base_path

    base_path = Path(base) if base is not None else adapter_base_path(path)
    model, processor = load(base_path, dtype=dtype, device=device, attn_implementation=attn_implementation)
    try:
        model = PeftModel.from_pretrained(model, str(path)).merge_and_unload()
    except (ValueError, KeyError, RuntimeError) as e:
        raise CaptuneError(f"adapter does not fit its base model {base_path}: {e}", path) from None
    model.eval()
    return model, processor


def processor_for(ckpt: Checkpoint, tokenizer) -> Processor:
    """The processor of a release: its template, tile size, tile limits, thumbnail and image tokens per tile."""
    from captune.internvl.config import (
        internvl_config_from_native,
        num_image_tokens_per_tile,
    )

    cfg = ckpt.internvl_config
    if cfg is None:
        cfg = internvl_config_from_native(ckpt.config)
    name = cfg.get("template")
    if not name:
        name = "internvl2_5"
        warnings.warn(f"{ckpt.path}: no InternVL template recorded; assuming {name!r}", stacklevel=2)
    vision = cfg["vision_config"]
    return Processor(
        tokenizer=tokenizer,
        template=get_template(name),
        tile_size=cfg.get("force_image_size") or vision.get("image_size", 448),
        max_tiles=cfg.get("max_dynamic_patch", 12),
        min_tiles=cfg.get("min_dynamic_patch", 1),
        thumbnail=cfg.get("use_thumbnail", True),
        dynamic=cfg.get("dynamic_image_size", True),
        tokens_per_tile=num_image_tokens_per_tile(cfg),
    )
