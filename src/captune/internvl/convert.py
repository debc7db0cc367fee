"""`captune convert`: write a release in the other layout (original InternVL2 <-> transformers' native), shard by shard.

The original releases ship remote code (`InternVLChatModel`) that breaks with new transformers releases;
transformers' `InternVLForConditionalGeneration` computes the same function once the config is mapped
(`internvl/config.py`) and the weights renamed and their fused projections split (`internvl/keys.py`). The native
folder loads with plain transformers; converting it back gives the original tensors bit for bit."""

from __future__ import annotations

import shutil
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from captune.errors import CaptuneError
from captune.fileio import atomic_dir, save_safetensors, write_json_atomic
from captune.internvl.config import (
    check_supported,
    internvl_config_from_native,
    native_config,
)
from captune.internvl.folder import (
    INTERNVL_CONFIG_NAME,
    Checkpoint,
    has_tokenizer,
    open_checkpoint,
    shard_metadata,
)
from captune.internvl.keys import KeyMap, iter_native_tensors, iter_original_tensors

# --------------------------------------------------------------------------------------------- the command


def _save_shard(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None) -> None:
    save_safetensors(tensors, path, metadata=metadata or {"format": "pt"})


def output_shard_name(shard: Path) -> str:
    """The name an input shard keeps in the output (always safetensors)."""
    return shard.with_suffix(".safetensors").name.replace("pytorch_model", "model")


class ShardWriter:
    """Writes output shards one at a time and, at the end, the index of a sharded checkpoint."""

    def __init__(self, out: Path, indexed: bool = False):
        self.out, self.indexed = out, indexed
        self.weight_map: dict[str, str] = {}
        self.total_size = 0

    def write(self, name: str, tensors: dict[str, torch.Tensor], metadata: dict | None) -> None:
        if tensors:
            _save_shard(tensors, self.out / name, metadata)
        for key, t in tensors.items():
            self.weight_map[key] = name
            self.total_size += t.numel() * t.element_size()

    def finish(self) -> dict[str, str]:
        """Write model.safetensors.index.json when there are several shards (or the input had an index)."""
        if len(set(self.weight_map.values())) > 1 or self.indexed:
            write_json_atomic(
                self.out / "model.safetensors.index.json",
                {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(self.weight_map.items()))},
            )
        return self.weight_map


def _write_shards(
    ckpt: Checkpoint, out: Path, convert_shard: Callable[[Path], Iterable[tuple[str, torch.Tensor]]]
) -> dict[str, str]:
    """Write one output shard per input shard (same names, same sharding); return the weight map."""
    from tqdm import tqdm

    writer = ShardWriter(out, indexed=ckpt.index_name is not None)
    for shard in tqdm(ckpt.shards, desc="converting shards", unit="shard", disable=len(ckpt.shards) < 2):
        tensors = dict(convert_shard(shard))
        writer.write(output_shard_name(shard), tensors, shard_metadata(shard))
        del tensors
    return writer.finish()


def lm_head_in(ckpt: Checkpoint) -> bool:
    from captune.internvl.folder import shard_keys

    return any(k.endswith(("lm_head.weight", "language_model.output.weight")) for s in ckpt.shards for k in shard_keys(s))


def convert_checkpoint(src: str | Path, out: str | Path, to: str = "hf", force: bool = False) -> Path:
    """`captune convert SRC OUT --to hf|internvl`: write the checkpoint in the other layout.

    Tensors are copied bit for bit (same dtype, same sharding); nothing is written to OUT until complete.
    """
    if to not in ("hf", "internvl"):
        raise CaptuneError(f"--to must be 'hf' or 'internvl', not {to!r}")
    ckpt = open_checkpoint(src)
    out = Path(out)
    if ckpt.layout == to:
        raise CaptuneError(f"already in the {to} layout; nothing to convert", ckpt.path)
    with atomic_dir(out, force=force) as tmp:
        if to == "hf":
            _convert_to_hf(ckpt, tmp)
        else:
            _convert_to_internvl(ckpt, tmp)
    return out


def _convert_to_hf(ckpt: Checkpoint, tmp: Path) -> None:
    cfg = ckpt.config
    cfg_path = ckpt.path / "config.json"
    check_supported(cfg, cfg_path)
    keymap = KeyMap(cfg)
    tokenizer = _try_load_tokenizer(ckpt.path)
    image_token_id = None
    if tokenizer is not None:
        from captune.internvl.tokenizer import image_token_ids

        image_token_id = image_token_ids(tokenizer)["<IMG_CONTEXT>"]
    tie = not lm_head_in(ckpt)
    if tie and not cfg["llm_config"].get("tie_word_embeddings", False):
        raise CaptuneError("the checkpoint has no lm_head / output weight and the LLM does not tie embeddings", ckpt.path)

    _write_shards(ckpt, tmp, lambda shard: iter_native_tensors(ckpt, shard, keymap))
    dtype = cfg.get("torch_dtype") or cfg["llm_config"].get("torch_dtype")
    write_native_config(tmp, cfg, image_token_id, tie, dtype)
    if tokenizer is not None:
        write_tokenizer_files(tmp, tokenizer, cfg)


def write_native_config(out: Path, internvl_cfg: dict, image_token_id: int | None, tie: bool, dtype) -> None:
    """config.json of the native class, and the original config kept beside it as internvl_config.json."""
    config = native_config(internvl_cfg, image_token_id, tie_word_embeddings=tie)
    config.dtype = dtype
    config.save_pretrained(out)
    write_json_atomic(out / INTERNVL_CONFIG_NAME, internvl_cfg)


def write_tokenizer_files(out: Path, tokenizer, internvl_cfg: dict) -> None:
    """The tokenizer with the release's chat template, and a generation_config that stops at its stop token."""
    from captune.inputs.templates import chat_template, get_template, stop_token_id

    template = get_template(internvl_cfg.get("template") or "internlm2-chat")
    tokenizer.chat_template = chat_template(template)
    tokenizer.save_pretrained(out)
    _write_generation_config(out, tokenizer, stop_token_id(tokenizer, template))


def _write_generation_config(out: Path, tokenizer, stop_id: int) -> None:
    from transformers import GenerationConfig

    GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=stop_id,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        do_sample=False,
    ).save_pretrained(out)


def _try_load_tokenizer(path: Path):
    from captune.internvl.tokenizer import load_tokenizer

    if not has_tokenizer(path):
        warnings.warn(f"{path}: no tokenizer files; converting weights and config only", stacklevel=3)
        return None
    return load_tokenizer(path)


def _convert_to_internvl(ckpt: Checkpoint, tmp: Path) -> None:
    original_cfg = ckpt.internvl_config or internvl_config_from_native(ckpt.config)
    keymap = KeyMap(original_cfg)
    pending: dict = {}
    _write_shards(ckpt, tmp, lambda shard: iter_original_tensors(shard, keymap, pending))
    if pending:
        raise CaptuneError(f"incomplete fused tensors (missing parts): {', '.join(sorted(pending)[:5])}", ckpt.path)
    write_json_atomic(tmp / "config.json", original_cfg)
    copy_release_files(ckpt.path, tmp)


_TOKENIZER_PREFIXES = ("tokenizer", "special_tokens_map", "added_tokens", "chat_template")


def copy_release_files(src: Path, out: Path, python: bool = True) -> None:
    """Copy the tokenizer files, generation_config.json and (with `python`) the remote code (*.py) as they are."""
    for f in sorted(Path(src).iterdir()):
        wanted = f.name.startswith(_TOKENIZER_PREFIXES) or f.name == "generation_config.json"
        if f.is_file() and (wanted or (python and f.suffix == ".py")):
            shutil.copy2(f, out / f.name)
