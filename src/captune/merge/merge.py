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
A model whose float32 copy does not fit the check's device (InternVL2-76B: 305 GB) is checked without ever being
held whole: 1 and 3 on a depth-reduced model (the vision tower, the projector and the LLM's first 2 layers), 2 for
every weight, shard by shard. What rounding to bf16 (fp16) then changes in the logits is reported, as information, beside what one rounding to
that dtype changes in the base model's logits: rounding is not an error, and `--dtype fp32` avoids it. Adapters
with features this merge does not implement (DoRA, LoRA biases, trained modules other than the projector, ...) are
refused rather than merged wrongly.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import torch

from captune.devices import DTYPES, dtype_name
from captune.errors import CaptuneError
from captune.fileio import atomic_dir, check_output_dir, write_json_atomic
from captune.internvl.convert import (
    ShardWriter,
    copy_release_files,
    lm_head_in,
    output_shard_name,
    write_native_config,
    write_tokenizer_files,
)
from captune.internvl.folder import (
    Checkpoint,
    shard_metadata,
)
from captune.internvl.keys import (
    KeyMap,
    iter_model_tensors,
    model_tensor_names,
    original_from_native,
)
from captune.merge.adapter import (
    Adapter,
    base_tokenizer,
    open_base,
    original_config,
    read_adapter,
)
from captune.merge.verify import check_merge, verify_merge

FORMATS = ("hf", "internvl", "both")
# The check runs in float32 whatever the output dtype. It compares the same function computed two ways in float32:
# the float32 merge (in memory, not rounded) against the adapter applied by PEFT, unmerged; and each output folder,
# loaded afresh, against its own weights in memory. Neither depends on the output dtype (the rounding to bf16 is
# checked bit for bit on the weights instead); both refuse above a relative error of the probe logits of
# max(TOLERANCE, NOISE_MARGIN x what float32's own rounding of the merged weights does to them): large LoRA changes
# make a model more sensitive to float32's arithmetic too, and a wrong merge is many orders of magnitude above that.

# --------------------------------------------------------------------------------------------- streaming the base


def base_native_keys(ckpt: Checkpoint, keymap: KeyMap) -> set[str]:
    """The native names of every base weight, read from the shard headers only."""
    return {name for shard in ckpt.shards for name in model_tensor_names(ckpt, shard, keymap)}


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


def with_dtype(internvl_cfg: dict, dtype: torch.dtype) -> dict:
    """The original config, saying the merged weights' dtype wherever it said the base's."""
    cfg = copy.deepcopy(internvl_cfg)
    cfg["torch_dtype"] = dtype_name(dtype)
    for sub in ("llm_config", "vision_config"):
        if isinstance(cfg.get(sub), dict) and "torch_dtype" in cfg[sub]:
            cfg[sub]["torch_dtype"] = dtype_name(dtype)
    return cfg


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
        from captune.internvl.tokenizer import image_token_ids

        image_token_id = image_token_ids(tokenizer)["<IMG_CONTEXT>"]
    write_native_config(out, cfg, image_token_id, not lm_head_in(ckpt), dtype_name(dtype))
    if tokenizer is not None:
        write_tokenizer_files(out, tokenizer, cfg)


def write_internvl_files(ckpt: Checkpoint, out: Path, dtype: torch.dtype) -> None:
    """The release's config.json (dtype updated), *.py remote code, tokenizer files and generation_config."""
    write_json_atomic(out / "config.json", with_dtype(original_config(ckpt), dtype))
    copy_release_files(ckpt.path, out, python=True)


# --------------------------------------------------------------------------------------------- the command


def output_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if dtype not in DTYPES:
        raise CaptuneError(f"--dtype must be one of bf16, fp16, fp32, not {dtype!r}")
    return DTYPES[dtype]


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
