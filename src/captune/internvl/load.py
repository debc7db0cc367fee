"""`captune.load`: any InternVL2 checkpoint as a transformers `InternVLForConditionalGeneration`, no remote code."""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Mapping
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
    device_map: Mapping[str, int | str | torch.device] | None = None,
):
    """Load a checkpoint folder; return `(model, processor)`.

    `path` is an original InternVL2 release folder (`InternVLChatModel`, converted on the fly, tensor by tensor)
    or a folder in transformers' native layout. `processor` is None when the folder has no tokenizer.
    `path` may also be a LoRA adapter folder written by `captune train`: its base model is loaded and the adapter
    merged in memory (`base` overrides the base model recorded in the adapter).
    `image_token_id` is only needed for checkpoints without a tokenizer (the id of `<IMG_CONTEXT>`).
    `device="meta"` gives the model without weights (for FSDP, which shards it first; see `fill_weights`).
    `device_map` (module name -> device, as `captune.internvl.placement.Placement.device_map` makes) spreads the model
    over several devices instead of `device`: see `load_placed`.
    """
    from captune.internvl.lora import is_adapter_folder

    if is_adapter_folder(path):
        return load_adapter(path, base=base, dtype=dtype, device=device, attn_implementation=attn_implementation,
                            device_map=device_map)
    if device_map is not None:
        device_map = {name: resolve_device(torch.device("cuda", d) if isinstance(d, int) else d)
                      for name, d in device_map.items()}
        device = next(iter(device_map.values()))  # for the dtype ("auto": bf16 on GPUs); checked in load_placed
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    ckpt = open_checkpoint(path)
    tokenizer = None
    if has_tokenizer(ckpt.path):
        from captune.internvl.tokenizer import image_token_ids, load_tokenizer

        tokenizer = load_tokenizer(ckpt.path)
        if image_token_id is None:
            image_token_id = image_token_ids(tokenizer)["<IMG_CONTEXT>"]

    if device_map is not None:
        model = load_placed(ckpt, dtype, device_map, attn_implementation, image_token_id)
    elif device.type == "meta":  # shapes only, for FSDP: see `empty_model`
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
    stream_weights(model, ckpt, dtype, lambda name: device)
    return model


def stream_weights(model: nn.Module, ckpt: Checkpoint, dtype, device_of: Callable[[str], torch.device],
                   keep: Callable[[str], bool] | None = None) -> None:
    """Fill a meta-device model tensor by tensor, each straight onto `device_of(its name)` in `dtype`, then tie the
    head if the checkpoint has none and rebuild the derived buffers there (`keep`: see `fill_weights`)."""

    def assign(name: str, param: nn.Parameter, tensor: torch.Tensor) -> None:
        module_name, _, attr = name.rpartition(".")
        value = tensor.to(device=device_of(name), dtype=dtype)
        model.get_submodule(module_name)._parameters[attr] = nn.Parameter(value, requires_grad=param.requires_grad)

    fill_weights(model, ckpt, assign, keep)
    if not lm_head_in(ckpt):
        model.tie_weights()
    rebuild_buffers(model, device_of, only_meta=True)


def load_placed(ckpt: Checkpoint, dtype, device_map: dict[str, torch.device], attn_implementation, image_token_id):
    """The model spread over the devices of `device_map` (module name -> device; every module placed, none split).

    Either layout: the model is built on the meta device and each tensor streamed from its shard straight to its
    module's device, so no device (nor the CPU) ever holds more than its part. accelerate's `dispatch_model` then
    hooks every placed module to move its inputs to its device (hidden states hop from GPU to GPU; a cache's layers
    live on their layers' devices) and the model's outputs back to the inputs' device, which stays `model.device`
    (the vision tower's).
    """
    from accelerate import dispatch_model

    model = empty_model(ckpt, attn_implementation, image_token_id)
    check_device_map(model, device_map)
    stream_weights(model, ckpt, dtype, lambda name: placed_device(name, device_map))
    if ckpt.layout == "hf" and (ckpt.path / "generation_config.json").is_file():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(ckpt.path)
    main = placed_device("model.vision_tower", device_map)
    return dispatch_model(model, device_map=device_map, main_device=main, force_hooks=True,
                          skip_keys=model._skip_keys_device_placement)


def placed_device(name: str, device_map: Mapping[str, torch.device]) -> torch.device:
    """The device of a module or tensor: its own entry in `device_map`, else its closest enclosing module's."""
    key = name
    while key not in device_map:
        if not key:
            raise CaptuneError(f"device map places no module holding {name}")
        key = key.rpartition(".")[0]
    return device_map[key]


def check_device_map(model: nn.Module, device_map: Mapping[str, torch.device]) -> None:
    """Every entry names a module of the model, and every parameter and buffer is placed exactly once."""
    modules = dict(model.named_modules())
    unknown = [name for name in device_map if name not in modules]
    if unknown:
        raise CaptuneError(f"device map names modules the model does not have: {', '.join(unknown[:5])}")
    nested = [a for a in device_map for b in device_map if a != b and a.startswith(b + ".")]
    if nested:
        raise CaptuneError(f"device map places {nested[0]} inside another placed module")
    names = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]
    unplaced = [n for n in names if not any(n.startswith(m + ".") for m in device_map) and "" not in device_map]
    if unplaced:
        raise CaptuneError(f"device map places no module holding {', '.join(unplaced[:5])}")


def empty_model(ckpt: Checkpoint, attn_implementation: str = "sdpa", image_token_id: int | None = None,
                text_layers: int | None = None):
    """The native model of a checkpoint folder (either layout) on the meta device: shapes, no memory.

    FSDP shards this before any weight exists, then `fill_weights` loads each rank's part. `text_layers`: only the
    LLM's first layers (a depth-reduced model, every width real: the merge check of a model larger than memory).
    """
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    if ckpt.layout == "internvl":
        check_supported(ckpt.config, ckpt.path / "config.json")
        config = native_config(ckpt.config, image_token_id, tie_word_embeddings=not lm_head_in(ckpt))
    else:
        config = InternVLConfig.from_pretrained(ckpt.path)
        if image_token_id is not None:
            config.image_token_id = image_token_id
    if text_layers is not None:
        text = config.text_config
        text.num_hidden_layers = text_layers
        if getattr(text, "layer_types", None):
            text.layer_types = text.layer_types[:text_layers]
    with torch.device("meta"):
        model = InternVLForConditionalGeneration(config)
    model.set_attn_implementation(attn_implementation)
    return model


# PEFT wraps a layer without renaming its weights' place in the base model; these segments undo the wrapping.
_WRAPPER_SEGMENTS = re.compile(r"^base_model\.model\.|\.base_layer(?=\.)|\.original_module(?=\.)|\.modules_to_save\.[^.]+(?=\.)")


def fill_weights(model: nn.Module, ckpt: Checkpoint, put, keep: Callable[[str], bool] | None = None) -> None:
    """Stream a checkpoint's tensors, in native names, into the parameters of `model` (plain or PEFT-wrapped).

    `put(name, param, tensor)` places one full tensor; every name, shape and missing weight is checked. `keep(name)`
    False passes a tensor over on purpose (the layers a depth-reduced model leaves out).
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
        for key, tensor in iter_model_tensors(ckpt, shard, keymap, keep):  # the others not even read
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


def rebuild_buffers(model: nn.Module, device: torch.device | Callable[[str], torch.device],
                    only_meta: bool = False) -> None:
    """Recompute the buffers of parameter-free modules (rotary frequencies): they are derived from the config.

    Needed after meta-device loading (`only_meta`) and after FSDP's `to_empty`, which leaves them uninitialised.
    `device` may be a function of the module's name (a model spread over devices).
    """
    for name, module in list(model.named_modules()):
        buffers = list(module.buffers(recurse=False))
        if not buffers or (only_meta and not any(b.is_meta for b in buffers)):
            continue
        if any(True for _ in module.parameters(recurse=False)) or not hasattr(module, "config"):
            if only_meta:
                raise RuntimeError(f"cannot materialise buffers of {name} ({type(module).__name__})")
            continue
        rebuilt = type(module)(config=module.config).to(device(name) if callable(device) else device)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, rebuilt)


def load_adapter(
    path: str | Path,
    base: str | Path | None = None,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    attn_implementation: str = "sdpa",
    device_map: Mapping[str, int | str | torch.device] | None = None,
):
    """Base model + LoRA adapter, merged in memory: the same function as `captune merge` writes to disk."""
    from peft import PeftModel

    from captune.internvl.lora import adapter_base_path

    base_path = Path(base) if base is not None else adapter_base_path(path)
    model, processor = load(base_path, dtype=dtype, device=device, attn_implementation=attn_implementation,
                            device_map=device_map)
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
