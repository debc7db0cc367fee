"""`captune merge`: fold a LoRA adapter into its base model and write a plain model folder, checked.

    captune merge runs/coco-lora/checkpoint-000200 out/InternVL2-2B-coco                   # transformers' layout
    captune merge runs/coco-lora/checkpoint-000200 out/InternVL2-2B-coco --format internvl # InternVL's own layout
    captune verify-merge runs/coco-lora/checkpoint-000200 out/InternVL2-2B-coco

Why not `PeftModel.merge_and_unload()` + `save_pretrained` (the tutorial's merge script)? That holds the whole
model in memory, twice while saving, and InternVL2-76B is 143 GB. Here the merge streams the base release shard
by shard: each weight a LoRA layer targets gets `W + scale * B @ A` (computed in float32, then cast to the output
dtype; scale = lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA), everything else is only cast, and each
output shard is written before the next is read. The output keeps the base's sharding.

Formats: `hf` is transformers' native InternVL (loads with `AutoModelForImageTextToText`, no remote code, with
the release's tokenizer, chat template and stop token); `internvl` is the original layout (fused q/k/v, the
release's config.json and *.py files carried over, as the tutorial's "Wrapping into AutoModel" step does by hand)
for InternVL's own tools; `both` writes OUT/hf and OUT/internvl in one pass.

Safety: the result is written into a temporary folder beside OUT and renamed only when complete and checked. The
check is exact, so that it tells a wrong merge from the rounding every bf16 merge has (see `check_merge`):
1. the merge itself, in float32: the base model with W + scale * B @ A folded in, in memory, must give the logits of
   the base with the adapter applied by PEFT (not merged) on a probe (a synthetic image and the caption prompt),
   within 1e-5, or 10x what float32's own rounding does to them when that is more (large LoRA changes);
2. every weight written must be that float32 merge rounded to the output dtype, bit for bit, read back through the
   output's own layout (names, fused q/k/v): this catches what the writer gets wrong, however small;
3. the output folder, loaded afresh, must compute what those rounded weights compute in memory (its config).
What rounding to bf16 (fp16) then changes in the logits is reported, as information, beside what one rounding to
that dtype changes in the base model's logits: rounding is not an error, and `--dtype fp32` avoids it. Adapters
with features this merge does not implement (DoRA, LoRA biases, trained modules other than the projector, ...) are
refused rather than merged wrongly.
"""

from __future__ import annotations

import copy
import gc
import math
import re
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .tiling import normalize
from .checkpoint import Checkpoint, has_tokenizer, iter_shard, open_checkpoint, shard_keys, shard_metadata
from .convert import (
    _IGNORED_KEYS,
    KeyMap,
    ShardWriter,
    _lm_head_in,
    copy_release_files,
    internvl_config_from_native,
    iter_model_tensors,
    normalize_native_key,
    original_from_native,
    output_shard_name,
    write_native_config,
    write_tokenizer_files,
)
from .errors import CaptuneError
from .fileio import atomic_dir, check_output_dir, read_json, write_json_atomic
from .lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PROJECTOR, adapter_base_path, is_adapter_folder

FORMATS = ("hf", "internvl", "both")
OUTPUT_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
                 "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32}
# The check runs in float32 whatever the output dtype. It compares the same function computed two ways in float32:
# the float32 merge (in memory, not rounded) against the adapter applied by PEFT, unmerged; and each output folder,
# loaded afresh, against its own weights in memory. Neither depends on the output dtype (the rounding to bf16 is
# checked bit for bit on the weights instead); both refuse above a relative error of the probe logits of
# max(TOLERANCE, NOISE_MARGIN x what float32's own rounding of the merged weights does to them): large LoRA changes
# make a model more sensitive to float32's arithmetic too, and a wrong merge is many orders of magnitude above that.
CHECK_DTYPE = torch.float32
PROBE_POSITIONS = 32
TOLERANCE = 1e-5
NOISE_MARGIN = 10.0
# The rounding of a bf16/fp16 output is reported, not refused; a note suggests --dtype fp32 when it moves the logits
# more than ROUNDING_NOTE x what one rounding of the base's weights moves them, plus ROUNDING_NOTE_FLOOR.
ROUNDING_NOTE = 3.0
ROUNDING_NOTE_FLOOR = 1e-4

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


def open_base(adapter: Adapter, base: str | Path | None = None) -> Checkpoint:
    """The base model of an adapter (recorded in adapter_config.json, or `base`); never itself an adapter."""
    path = Path(base) if base is not None else adapter_base_path(adapter.path)
    if is_adapter_folder(path):
        raise CaptuneError("the base model is itself a LoRA adapter: merge that one first and pass --base", path)
    if not path.exists():
        raise CaptuneError("base model not found (moved since training? pass --base)", path)
    return open_checkpoint(path)


# --------------------------------------------------------------------------------------------- streaming the base


def base_native_keys(ckpt: Checkpoint, keymap: KeyMap) -> set[str]:
    """The native names of every base weight, read from the shard headers only."""
    names: set[str] = set()
    for shard in ckpt.shards:
        for key in shard_keys(shard):
            if _IGNORED_KEYS.match(key):
                continue
            if ckpt.layout == "hf":
                names.add(normalize_native_key(key))
                continue
            try:
                names.update(keymap.native_names(key))
            except KeyError:
                raise CaptuneError(f"unexpected tensor {key!r}: not part of an InternVL2 model", shard) from None
    return names


def check_fits(adapter: Adapter, ckpt: Checkpoint, keymap: KeyMap) -> None:
    """Fail before hours of merging if the adapter changes weights the base does not have."""
    missing = sorted(adapter.targets - base_native_keys(ckpt, keymap))
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise CaptuneError(f"adapter does not fit the base model {ckpt.path}: the base has no {', '.join(missing[:3])}"
                           f"{more}", adapter.path)


def merged_shard(ckpt: Checkpoint, shard: Path, keymap: KeyMap, adapter: Adapter,
                 dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """One base shard with the adapter merged in, native names, in `dtype`."""
    return {key: adapter.merged(key, t, dtype) for key, t in iter_model_tensors(ckpt, shard, keymap)}


def write_merged_weights(ckpt: Checkpoint, keymap: KeyMap, adapter: Adapter, outs: dict[str, Path],
                         dtype: torch.dtype) -> None:
    """Stream the base shard by shard; write each merged shard to every output (`hf` and/or `internvl`)."""
    from tqdm import tqdm

    writers = {fmt: ShardWriter(out, indexed=ckpt.index_name is not None) for fmt, out in outs.items()}
    pending: dict = {}
    for shard in tqdm(ckpt.shards, desc="merging shards", unit="shard", disable=len(ckpt.shards) < 2):
        native = merged_shard(ckpt, shard, keymap, adapter, dtype)
        name, metadata = output_shard_name(shard), shard_metadata(shard)
        if "hf" in writers:
            writers["hf"].write(name, native, metadata)
        if "internvl" in writers:
            writers["internvl"].write(name, dict(original_from_native(native.items(), keymap, pending, shard)),
                                      metadata)
        del native
    if pending:
        raise CaptuneError(f"incomplete fused tensors (missing parts): {', '.join(sorted(pending)[:5])}", ckpt.path)
    for writer in writers.values():
        writer.finish()


# --------------------------------------------------------------------------------------------- configs and tokenizer


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def with_dtype(internvl_cfg: dict, dtype: torch.dtype) -> dict:
    """The original config, saying the merged weights' dtype wherever it said the base's."""
    cfg = copy.deepcopy(internvl_cfg)
    cfg["torch_dtype"] = dtype_name(dtype)
    for sub in ("llm_config", "vision_config"):
        if isinstance(cfg.get(sub), dict) and "torch_dtype" in cfg[sub]:
            cfg[sub]["torch_dtype"] = dtype_name(dtype)
    return cfg


def original_config(ckpt: Checkpoint) -> dict:
    return ckpt.internvl_config or internvl_config_from_native(ckpt.config)


def base_tokenizer(ckpt: Checkpoint, warn: bool = True):
    """The base's tokenizer (loaded once: InternLM2's takes seconds), or None when it has none."""
    if not has_tokenizer(ckpt.path):
        if warn:
            warnings.warn(f"{ckpt.path}: no tokenizer files; merging weights and config only", stacklevel=3)
        return None
    from .tokenizer import load_tokenizer

    return load_tokenizer(ckpt.path)


def write_hf_files(ckpt: Checkpoint, out: Path, dtype: torch.dtype, tokenizer) -> None:
    """config.json (native), internvl_config.json, tokenizer with the chat template, generation_config."""
    cfg = with_dtype(original_config(ckpt), dtype)
    if ckpt.layout == "hf":
        from transformers import InternVLConfig

        config = InternVLConfig.from_pretrained(ckpt.path)
        config.dtype = dtype_name(dtype)
        config.save_pretrained(out)
        write_json_atomic(out / "internvl_config.json", cfg)
        copy_release_files(ckpt.path, out, python=False)  # a native base already has its template
        return
    image_token_id = None
    if tokenizer is not None:
        from .tokenizer import image_token_ids

        image_token_id = image_token_ids(tokenizer)["<IMG_CONTEXT>"]
    write_native_config(out, cfg, image_token_id, not _lm_head_in(ckpt), dtype_name(dtype))
    if tokenizer is not None:
        write_tokenizer_files(out, tokenizer, cfg)


def write_internvl_files(ckpt: Checkpoint, out: Path, dtype: torch.dtype) -> None:
    """The release's config.json (dtype updated), *.py remote code, tokenizer files and generation_config."""
    write_json_atomic(out / "config.json", with_dtype(original_config(ckpt), dtype))
    copy_release_files(ckpt.path, out, python=True)


# --------------------------------------------------------------------------------------------- the command


def output_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in OUTPUT_DTYPES.values():
        return dtype
    if dtype not in OUTPUT_DTYPES:
        raise CaptuneError(f"--dtype must be one of bf16, fp16, fp32, not {dtype!r}")
    return OUTPUT_DTYPES[dtype]


def _check_format(format: str) -> None:
    if format not in FORMATS:
        raise CaptuneError(f"--format must be one of {', '.join(FORMATS)}, not {format!r}")


def output_folders(tmp: Path, format: str) -> dict[str, Path]:
    """Where each layout goes inside the temporary folder: itself, or hf/ and internvl/ for `both`."""
    _check_format(format)
    if format != "both":
        return {format: tmp}
    outs = {"hf": tmp / "hf", "internvl": tmp / "internvl"}
    for folder in outs.values():
        folder.mkdir()
    return outs


def _refuse_overwriting_inputs(out: Path, *inputs: Path) -> None:
    target = out.resolve()
    for path in inputs:
        if target == path.resolve() or target in path.resolve().parents:
            raise CaptuneError(f"the output would replace the input {path}; choose another folder", out)


def merge(adapter: str | Path, out: str | Path, format: str = "hf", dtype: str | torch.dtype = "bf16",
          force: bool = False, base: str | Path | None = None, *, verify: bool = True, device: str = "auto",
          log: Callable[[str], None] | None = None) -> Path:
    """Merge a LoRA adapter into its base model and write OUT (`hf`, `internvl` or `both`: OUT/hf, OUT/internvl).

    With `verify` (default) the merge is checked exactly (`check_merge`: the float32 merge against the adapter applied
    by PEFT, every written weight against that merge rounded to `dtype`, the folder as loaded against those weights);
    a failed check raises CaptuneError and OUT is not created. The rounding to bf16/fp16 is reported, not refused.
    `log` receives the progress lines.
    """
    say = log or (lambda _msg: None)
    out, torch_dtype = Path(out), output_dtype(dtype)
    _check_format(format)
    lora = read_adapter(adapter)
    ckpt = open_base(lora, base)
    _refuse_overwriting_inputs(out, lora.path, ckpt.path)
    check_output_dir(out, force)
    say(f"Loading base model {ckpt.path} ({ckpt.layout} layout, {len(ckpt.shards)} shard(s)) and adapter {lora.path}")
    keymap = KeyMap(original_config(ckpt))
    check_fits(lora, ckpt, keymap)
    say(_describe(lora))
    tokenizer = base_tokenizer(ckpt)
    with atomic_dir(out, force=force) as tmp:
        outs = output_folders(tmp, format)
        say(f"Saving merged model ({', '.join(outs)} layout, {dtype_name(torch_dtype)}) to {out}")
        write_merged_weights(ckpt, keymap, lora, outs, torch_dtype)
        for fmt, folder in outs.items():
            if fmt == "hf":
                write_hf_files(ckpt, folder, torch_dtype, tokenizer)
            else:
                write_internvl_files(ckpt, folder, torch_dtype)
        if verify:
            say("Checking the merge against the adapter (float32 logits on a probe image, every weight written)")
            check_merge(lora, ckpt, tokenizer, outs, torch_dtype, device, say)
    say("Done!")
    return out


def _describe(adapter: Adapter) -> str:
    cfg = adapter.config
    text = (f"trainable params: {adapter.num_parameters:,} (LoRA rank {cfg.get('r')}, alpha {cfg.get('lora_alpha')}"
            f"{', rsLoRA' if cfg.get('use_rslora') else ''}, on {len(adapter.lora)} layers")
    vision = sum(1 for k in adapter.lora if k.startswith("model.vision_tower."))
    if vision:
        text += f", {vision} of them in the vision tower"
    return text + (", and the projector)" if adapter.replaced else ")")


# --------------------------------------------------------------------------------------------- the check


def relative_error(reference: torch.Tensor, other: torch.Tensor) -> float:
    return ((other.double() - reference.double()).norm() / reference.double().norm().clamp_min(1e-30)).item()


@dataclass
class Probe:
    """One input for both sides of the check: the caption prompt and a synthetic 448px tile."""

    input_ids: torch.Tensor  # [1, T]
    pixel_values: torch.Tensor  # [1, 3, S, S] float32
    image_token_id: int


def _probe_image():
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:448, 0:448]
    pixels = np.stack([x * 255 // 447, y * 255 // 447, (x + y) * 255 // 894], axis=-1)
    pixels = (pixels + rng.integers(-24, 25, pixels.shape)).clip(0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


def make_probe(ckpt: Checkpoint, tokenizer) -> Probe:
    """With a tokenizer, the processor's caption prompt; without, image tokens (id: the last of the vocabulary,
    as `<IMG_CONTEXT>` is unknown) and a few text ids."""
    from .convert import num_image_tokens_per_tile
    from .processor import DEFAULT_QUESTION, Processor
    from .tiling import tile_image

    image = _probe_image()
    if tokenizer is not None:
        from .tokenizer import image_token_ids

        sample = Processor.from_checkpoint(ckpt, tokenizer).prepare(image, DEFAULT_QUESTION, max_tiles=1)
        return Probe(torch.tensor([sample["input_ids"]]), sample["pixel_values"],
                     image_token_ids(tokenizer)["<IMG_CONTEXT>"])
    cfg = original_config(ckpt)
    image_id = int(cfg["llm_config"]["vocab_size"]) - 1
    size = cfg.get("force_image_size") or cfg["vision_config"].get("image_size", 448)
    ids = [1] + [image_id] * num_image_tokens_per_tile(cfg) + list(range(3, 19))
    return Probe(torch.tensor([ids]), tile_image(image, max_tiles=1, tile_size=size, thumbnail=False), image_id)


def load_model(path: Path, image_token_id: int, device) -> torch.nn.Module:
    """A checkpoint (either layout) in float32, without its tokenizer (the probe brings its own ids)."""
    from .model import _load_native, _load_original

    ckpt = open_checkpoint(path)
    load = _load_original if ckpt.layout == "internvl" else _load_native
    return load(ckpt, CHECK_DTYPE, device, "sdpa", image_token_id).eval()


@torch.no_grad()
def probe_logits(model: torch.nn.Module, probe: Probe) -> torch.Tensor:
    device = next(model.parameters()).device
    # The last positions see the whole prompt, image included: every merged layer shows in their logits.
    logits = model(input_ids=probe.input_ids.to(device), pixel_values=normalize(probe.pixel_values.to(device)).to(CHECK_DTYPE),
                   logits_to_keep=PROBE_POSITIONS).logits  # [1, PROBE_POSITIONS, V]
    return logits.float().cpu()


def merged_logits(path: Path, probe: Probe, device) -> torch.Tensor:
    """The probe logits of a model folder, loaded afresh in float32."""
    return probe_logits(load_model(path, probe.image_token_id, device), probe)


def adapter_logits(model: torch.nn.Module, adapter: Adapter, probe: Probe) -> tuple[torch.Tensor, torch.nn.Module]:
    """The reference: `model` (the base, float32) with the adapter applied by PEFT, unmerged; and `model` back
    without it (PEFT only wraps the base's layers: their weights are left as they were)."""
    from peft import PeftModel

    try:
        peft = PeftModel.from_pretrained(model, str(adapter.path))
    except (ValueError, KeyError, RuntimeError) as e:
        raise CaptuneError(f"adapter does not fit its base model: {e}", adapter.path) from None
    reference = probe_logits(peft.eval(), probe)
    return reference, peft.unload()


@torch.no_grad()
def merge_in_memory(model: torch.nn.Module, adapter: Adapter) -> None:
    """Fold the adapter into `model` (the base, float32, plain): each targeted weight becomes its float32 merge,
    `Adapter.merged` as the writer computes it before rounding to the output dtype."""
    params = dict(model.named_parameters())
    for key in sorted(adapter.targets):
        if key not in params:
            raise CaptuneError(f"adapter does not fit its base model: the model has no {key}", adapter.path)
        param = params[key]
        param.copy_(adapter.merged(key, param.detach().cpu(), param.dtype))


def dtype_step(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The step between consecutive `dtype` numbers at each value of `x` (float32): its last bit's worth."""
    info = torch.finfo(dtype)
    exponent = torch.frexp(x)[1]  # x = m * 2**exponent, 0.5 <= |m| < 1: the step there is eps * 2**(exponent - 1)
    return torch.ldexp(torch.full_like(x, info.eps), exponent - 1).clamp_min(info.eps * info.tiny)


def rounding_noise(weight: torch.Tensor, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    """A rounding error of `dtype` for every element of `weight` (float32): uniform within half the step between
    `dtype` numbers at that value, as rounding a more precise value makes; none where the weight is 0.

    Simulated rather than done: a bf16 release's weights are bf16 numbers already, and rounding them changes nothing.
    """
    uniform = torch.rand(weight.shape, generator=generator, device=weight.device, dtype=weight.dtype)
    return torch.where(weight == 0, torch.zeros_like(weight), dtype_step(weight, dtype) * (uniform - 0.5))


@contextmanager
def _computing_with(model: torch.nn.Module, change: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Every module computes with `change(weight)` in place of each of its own weights: made just before the
    module's forward, dropped after it. The weights stay as they are; one module's changed copies exist at a time."""
    kept: dict[torch.nn.Module, dict[str, torch.nn.Parameter]] = {}

    def before(module, _args):
        kept[module] = {n: p for n, p in module._parameters.items() if p is not None and p.is_floating_point()}
        for n, p in kept[module].items():
            module._parameters[n] = torch.nn.Parameter(change(p.detach()), requires_grad=False)

    def after(module, _args, _output):
        module._parameters.update(kept.pop(module))

    handles = []
    for module in model.modules():
        if any(p.is_floating_point() for p in module.parameters(recurse=False)):
            handles += [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for module, params in kept.items():  # a forward that raised
            module._parameters.update(params)


@torch.no_grad()
def rounding_effect(model: torch.nn.Module, probe: Probe, dtype: torch.dtype,
                    plain: torch.Tensor | None = None) -> float:
    """How much one rounding to `dtype` of all of `model`'s weights moves its probe logits (`plain`, when known):
    their relative error, the weights computed with a simulated rounding error (`rounding_noise`), left as they are."""
    plain = probe_logits(model, probe) if plain is None else plain
    generators: dict[torch.device, torch.Generator] = {}

    def rounded(weight: torch.Tensor) -> torch.Tensor:
        if weight.device not in generators:
            generators[weight.device] = torch.Generator(weight.device).manual_seed(0)
        return weight + rounding_noise(weight, dtype, generators[weight.device])

    with _computing_with(model, rounded):
        return relative_error(plain, probe_logits(model, probe))


def compare_weights(model: torch.nn.Module, folder: Path, dtype: torch.dtype, fmt: str, suffix: str = "",
                    where: Path | None = None) -> int:
    """Every weight of an output folder, read back through its own layout (names, fused q/k/v), must be `model`'s
    (the float32 merge) rounded to `dtype`, bit for bit. Returns how many weights were compared; errors name `where`
    (default: the folder)."""
    from .model import fill_weights

    compared: list[str] = []
    differ: list[str] = []
    overflow: list[str] = []
    steps = [0.0]  # the largest difference of a differing weight, in steps of `dtype`

    def compare(name: str, param: torch.nn.Parameter, tensor: torch.Tensor) -> None:
        compared.append(name)
        expected = param.detach().to(dtype).cpu() if param.is_floating_point() else param.detach().cpu()
        if param.is_floating_point() and not bool(expected.isfinite().all()):
            overflow.append(name)
        if tensor.dtype == expected.dtype and torch.equal(tensor, expected):
            return
        differ.append(name)
        if tensor.shape == expected.shape and tensor.is_floating_point() and expected.is_floating_point():
            diff = (tensor.float() - expected.float()).abs() / dtype_step(expected.float(), dtype)
            steps[0] = max(steps[0], diff.max().item())

    try:
        fill_weights(model, open_checkpoint(folder), compare)
    except CaptuneError as e:
        raise CaptuneError(f"the merged model ({fmt}) does not hold the base model's weights: {e}{suffix}",
                           where or folder) from None
    if overflow:
        raise CaptuneError(f"the merge does not fit {dtype_name(dtype)}: {len(overflow)} merged weights exceed its "
                           f"range ({_some(overflow)}); merge with --dtype bf16 or fp32{suffix}", where or folder)
    if differ:
        rounded = "" if dtype == CHECK_DTYPE else f" rounded to {dtype_name(dtype)}"
        by = f" by up to {steps[0]:.3g} steps of {dtype_name(dtype)}" if steps[0] else ""
        raise CaptuneError(f"the merged model ({fmt}) is not the float32 merge{rounded}: {len(differ)} of "
                           f"{len(compared)} weights differ{by} ({_some(differ)}); a wrong merge, not rounding "
                           f"(captune merge rounds the float32 merge once){suffix}", where or folder)
    return len(compared)


def _some(names: list[str], n: int = 3) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


@dataclass
class MergeCheck:
    """What `check_merge` measured: relative errors of float32 probe logits."""

    dtype: torch.dtype  # the outputs' dtype
    merge_error: float  # the float32 merge, in memory, against the adapter applied by PEFT, unmerged
    float32_noise: float = math.nan  # one float32 rounding of the merged weights, on the merge's logits
    tolerance: float = TOLERANCE  # of merge_error and load_error: max(TOLERANCE, NOISE_MARGIN * float32_noise)
    weights: int = 0  # weights compared bit for bit in each output
    load_error: dict[str, float] = field(default_factory=dict)  # each output, loaded, vs. its weights in memory
    error: dict[str, float] = field(default_factory=dict)  # each output, loaded, vs. the adapter: the rounding's effect
    base_rounding: float | None = None  # one rounding of the base's weights to `dtype`, on the base's logits
    adapter_effect: float | None = None  # the adapter's own effect: base + adapter against the base

    @property
    def max_error(self) -> float:
        return max(self.error.values())


def check_merge(adapter: Adapter, ckpt: Checkpoint, tokenizer, outs: dict[str, Path], dtype: torch.dtype, device,
                say: Callable[[str], None], written: bool = True) -> MergeCheck:
    """Check the outputs `outs` ({format: folder}, weights in `dtype`) of merging `adapter` into `ckpt`, exactly.

    1. The merge itself, in float32: the base with the adapter folded in, in memory, against the base with the
       adapter applied by PEFT (unmerged): probe logits within max(TOLERANCE, NOISE_MARGIN x what one float32
       rounding of the merged weights does to them). Catches a wrong scale, transposed or misplaced deltas, a missing
       layer: what `Adapter.merged` could get wrong.
    2. Every weight of every output, read back through its layout, is that float32 merge rounded to `dtype`, bit for
       bit: what the writer could get wrong (a skipped delta, a wrong name, a wrong q/k/v fusion), however small.
    3. Every output, loaded afresh, computes what those rounded weights compute in memory (same tolerance): its
       config.json and the loader.
    Then the information: each output's logits against the adapter's (for bf16/fp16, the rounding's effect, which is
    no error), beside what one rounding of the base's weights to `dtype` does to the base's logits.
    One float32 model in memory at a time; CaptuneError (ending in "nothing was written" when `written`) if off.
    """
    from .model import resolve_device

    suffix = "; nothing was written" if written else ""
    device = resolve_device(device)
    probe = make_probe(ckpt, tokenizer)
    model = load_model(ckpt.path, probe.image_token_id, device)
    check = MergeCheck(dtype=dtype, merge_error=math.nan)
    plain = probe_logits(model, probe) if dtype != CHECK_DTYPE else None
    if plain is not None:
        check.base_rounding = rounding_effect(model, probe, dtype, plain)
    reference, model = adapter_logits(model, adapter, probe)
    if plain is not None:
        check.adapter_effect = relative_error(plain, reference)
    merge_in_memory(model, adapter)
    merged = probe_logits(model, probe)
    check.float32_noise = rounding_effect(model, probe, CHECK_DTYPE, merged)
    check.tolerance = tol = max(TOLERANCE, NOISE_MARGIN * check.float32_noise)
    check.merge_error = err = relative_error(reference, merged)
    say(f"Checked the merge in float32: relative error of its logits against the adapter's (PEFT, unmerged) "
        f"{err:.2e} (tolerance {tol:.1e}; float32's own rounding moves them by {check.float32_noise:.1e})")
    if not err <= tol:
        raise CaptuneError(f"the merge differs from the adapter: relative error of the float32-merged logits {err:.3g} "
                           f"is above the tolerance {tol:.2g} (a wrong merge, not rounding){suffix}", adapter.path)
    for fmt, folder in outs.items():  # errors name the adapter when the folder is a temporary one, gone with them
        check.weights = compare_weights(model, folder, dtype, fmt, suffix, adapter.path if written else None)
    with torch.no_grad():
        for param in model.parameters():
            if param.is_floating_point():
                param.copy_(param.to(dtype))  # the output's weights, in float32
    rounded = merged if dtype == CHECK_DTYPE else probe_logits(model, probe)
    del model  # one model in memory at a time
    gc.collect()
    what = "the float32 merge" + ("" if dtype == CHECK_DTYPE else f" rounded to {dtype_name(dtype)}")
    for fmt, folder in outs.items():
        logits = merged_logits(folder, probe, device)
        check.load_error[fmt] = load_err = relative_error(rounded, logits)
        if not load_err <= tol:
            raise CaptuneError(f"the merged model ({fmt}) does not load as the merge: its logits are {load_err:.3g} "
                               f"off those of its own weights in memory (tolerance {tol:.2g}); its config.json?"
                               f"{suffix}", adapter.path if written else folder)
        check.error[fmt] = err = relative_error(reference, logits)
        text = (f"Checked the {fmt} output: its {check.weights} weights are {what}, bit for bit, and it loads as that "
                "model")
        if check.base_rounding is None:
            say(f"{text} (relative error of its logits against the adapter's {err:.2e})")
        else:
            say(text)
            say(_rounding_note(fmt, err, check))
    return check


def _rounding_note(fmt: str, err: float, check: MergeCheck) -> str:
    """The rounding's effect, beside the base's own and the adapter's; a hint at fp32 when it is well above the base's
    (a LoRA change much smaller than a bf16 step is rounded away, a much larger one rounded coarser)."""
    name, base, effect = dtype_name(check.dtype), check.base_rounding, check.adapter_effect
    text = (f"{name} rounding (information, not an error): the {fmt} output's logits are {err:.2e} off the adapter's; "
            f"rounding the base model to {name} moves its logits {base:.2e}, the adapter moves them {effect:.2e}")
    if err > ROUNDING_NOTE * base + ROUNDING_NOTE_FLOOR:
        text += (f"; the merge loses {err / max(base, 1e-30):.1f}x as much to rounding as the base: --dtype fp32 keeps "
                 "the adapter's logits")
    return text


def stored_dtype(ckpt: Checkpoint) -> torch.dtype:
    """The dtype of a checkpoint's floating-point weights (from the first shard)."""
    for _key, tensor in iter_shard(ckpt.shards[0]):
        if tensor.is_floating_point():
            return tensor.dtype
    raise CaptuneError("no floating-point weights", ckpt.shards[0])


def _merged_folders(merged: Path) -> list[Path]:
    """MERGED itself, or its hf/ and internvl/ folders (a `--format both` output)."""
    if not (merged / "config.json").is_file():
        both = [merged / fmt for fmt in ("hf", "internvl") if (merged / fmt / "config.json").is_file()]
        if both:
            return both
    if is_adapter_folder(merged):
        raise CaptuneError("is a LoRA adapter, not a merged model", merged)
    return [merged]


def verify_merge(adapter: str | Path, merged: str | Path, base: str | Path | None = None,
                 device: str = "auto", log: Callable[[str], None] | None = None) -> float:
    """Check MERGED as `captune merge` checks its output (`check_merge`), whatever wrote it: CaptuneError if it is not
    ADAPTER merged into its base (rounded to MERGED's dtype). `log` receives the lines `check_merge` says.

    Returns the relative error of MERGED's logits against ADAPTER's (applied to its base by PEFT, unmerged), float32:
    ~1e-7 for a float32 merge, the rounding's effect for bf16 (no error). A `--format both` output is checked in both
    layouts and the larger error returned.
    """
    lora = read_adapter(adapter)
    ckpt = open_base(lora, base)
    outs = {open_checkpoint(folder).layout: folder for folder in _merged_folders(Path(merged))}
    dtypes = {stored_dtype(open_checkpoint(folder)) for folder in outs.values()}
    if len(dtypes) > 1:
        raise CaptuneError(f"its folders hold different dtypes ({', '.join(sorted(map(dtype_name, dtypes)))})", merged)
    check = check_merge(lora, ckpt, base_tokenizer(ckpt, warn=False), outs, dtypes.pop(), device,
                        log or (lambda _msg: None), written=False)
    return check.max_error


# --------------------------------------------------------------------------------------------- CLI-facing


def _say(message: str) -> None:
    print(message, flush=True)


def merge_command(adapter: str, out: str, format: str = "hf", dtype: str = "bf16", force: bool = False,
                  base: str | None = None, verify: bool = True, device: str = "auto") -> Path:
    """`captune merge ADAPTER OUT [--format hf|internvl|both] [--dtype bf16] [--force] [--base PATH]`."""
    return merge(adapter, out, format=format, dtype=dtype, force=force, base=base, verify=verify, device=device,
                 log=_say)


def verify_merge_command(adapter: str, merged: str, base: str | None = None, device: str = "auto") -> float:
    """`captune verify-merge ADAPTER MERGED`: `captune merge`'s checks, printed; CaptuneError (exit 2) if one fails."""
    err = verify_merge(adapter, merged, base=base, device=device, log=_say)
    _say(f"{merged} is the adapter merged exactly: relative error of the merged logits against the adapter's {err:.3e}")
    return err
