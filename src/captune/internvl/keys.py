"""The weight mapping: original parameter names and fused projections <-> transformers' native InternVL, tensor by
tensor.

    original                                  native
    vision_model.*                            model.vision_tower.*  (InternViT-300M and InternViT-6B)
    mlp1.0 / mlp1.1 / mlp1.3                  model.multi_modal_projector.layer_norm / linear_1 / linear_2
    language_model.model.* (InternLM2)        model.language_model.* (Llama; wqkv split per kv-group)
    language_model.model.* (Qwen2/Phi3/Llama) model.language_model.*
    language_model.output / lm_head           lm_head
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from captune.errors import CaptuneError
from captune.internvl.config import llm_family
from captune.internvl.folder import (
    Checkpoint,
    iter_shard,
    shard_keys,
)

IGNORED_KEYS = re.compile(r".*rotary_emb\.inv_freq$")

# --------------------------------------------------------------------------------------------- weights


def _split_thirds(t: torch.Tensor, _cfg: dict) -> list[torch.Tensor]:
    return list(t.chunk(3, dim=0))


def _fuse_thirds(parts: list[torch.Tensor], _cfg: dict) -> torch.Tensor:
    return torch.cat(parts, dim=0)


def _wqkv_shape(cfg: dict) -> tuple[int, int, int]:
    llm = cfg["llm_config"]
    heads = llm["num_attention_heads"]
    kv_heads = llm.get("num_key_value_heads", heads)
    return kv_heads, heads // kv_heads, llm["hidden_size"] // heads


def _split_wqkv(t: torch.Tensor, cfg: dict) -> list[torch.Tensor]:
    # InternLM2 stores its fused projection per kv-group: [q x (heads/kv_heads), k, v] x head_dim rows.
    kv_heads, group, head_dim = _wqkv_shape(cfg)
    grouped = t.reshape(kv_heads, group + 2, head_dim, *t.shape[1:])  # [kv, g+2, d, (hidden)]
    q = grouped[:, :group].reshape(kv_heads * group * head_dim, *t.shape[1:])
    k = grouped[:, group].reshape(kv_heads * head_dim, *t.shape[1:])
    v = grouped[:, group + 1].reshape(kv_heads * head_dim, *t.shape[1:])
    return [q.contiguous(), k.contiguous(), v.contiguous()]


def _fuse_wqkv(parts: list[torch.Tensor], cfg: dict) -> torch.Tensor:
    kv_heads, group, head_dim = _wqkv_shape(cfg)
    q, k, v = parts
    rest = q.shape[1:]
    grouped = torch.cat(
        [
            q.reshape(kv_heads, group, head_dim, *rest),
            k.reshape(kv_heads, 1, head_dim, *rest),
            v.reshape(kv_heads, 1, head_dim, *rest),
        ],
        dim=1,
    )  # [kv, g+2, d, (hidden)]
    return grouped.reshape(kv_heads * (group + 2) * head_dim, *rest).contiguous()


@dataclass(frozen=True)
class Rule:
    """One original name pattern and its native name(s); several native names mean a fused tensor."""

    original: str
    native: tuple[str, ...]
    split: Callable[[torch.Tensor, dict], list[torch.Tensor]] | None = None
    fuse: Callable[[list[torch.Tensor], dict], torch.Tensor] | None = None


_V = "vision_model.encoder.layers.{n}."
_NV = "model.vision_tower.encoder.layer.{n}."
VISION_RULES = [
    Rule("vision_model.embeddings.class_embedding", ("model.vision_tower.embeddings.cls_token",)),
    Rule("vision_model.embeddings.position_embedding", ("model.vision_tower.embeddings.position_embeddings",)),
    Rule("vision_model.embeddings.patch_embedding.{p}", ("model.vision_tower.embeddings.patch_embeddings.projection.{p}",)),
    Rule(_V + "attn.qkv.{p}", tuple(_NV + f"attention.{x}_proj.{{p}}" for x in "qkv"), _split_thirds, _fuse_thirds),
    Rule(_V + "attn.proj.{p}", (_NV + "attention.projection_layer.{p}",)),
    Rule(_V + "attn.q_norm.{p}", (_NV + "attention.q_norm.{p}",)),
    Rule(_V + "attn.k_norm.{p}", (_NV + "attention.k_norm.{p}",)),
    Rule(_V + "ls1", (_NV + "lambda_1",)),
    Rule(_V + "ls2", (_NV + "lambda_2",)),
    Rule(_V + "norm1.{p}", (_NV + "layernorm_before.{p}",)),
    Rule(_V + "norm2.{p}", (_NV + "layernorm_after.{p}",)),
    Rule(_V + "mlp.fc1.{p}", (_NV + "mlp.fc1.{p}",)),
    Rule(_V + "mlp.fc2.{p}", (_NV + "mlp.fc2.{p}",)),
    Rule("mlp1.0.{p}", ("model.multi_modal_projector.layer_norm.{p}",)),
    Rule("mlp1.1.{p}", ("model.multi_modal_projector.linear_1.{p}",)),
    Rule("mlp1.3.{p}", ("model.multi_modal_projector.linear_2.{p}",)),
]
_L = "language_model.model.layers.{n}."
_NL = "model.language_model.layers.{n}."
INTERNLM2_RULES = [
    Rule("language_model.model.tok_embeddings.weight", ("model.language_model.embed_tokens.weight",)),
    Rule("language_model.model.norm.weight", ("model.language_model.norm.weight",)),
    Rule("language_model.output.weight", ("lm_head.weight",)),
    Rule(_L + "attention.wqkv.{p}", tuple(_NL + f"self_attn.{x}_proj.{{p}}" for x in "qkv"), _split_wqkv, _fuse_wqkv),
    Rule(_L + "attention.wo.{p}", (_NL + "self_attn.o_proj.{p}",)),
    Rule(_L + "feed_forward.w1.{p}", (_NL + "mlp.gate_proj.{p}",)),
    Rule(_L + "feed_forward.w3.{p}", (_NL + "mlp.up_proj.{p}",)),
    Rule(_L + "feed_forward.w2.{p}", (_NL + "mlp.down_proj.{p}",)),
    Rule(_L + "attention_norm.weight", (_NL + "input_layernorm.weight",)),
    Rule(_L + "ffn_norm.weight", (_NL + "post_attention_layernorm.weight",)),
]
# Qwen2, Phi-3 and Llama already use transformers' names inside the language model.
HF_LLM_RULES = [
    Rule("language_model.lm_head.weight", ("lm_head.weight",)),
    Rule("language_model.model.{rest}", ("model.language_model.{rest}",)),
]

_PLACEHOLDERS = {"n": r"(?P<n>\d+)", "p": r"(?P<p>weight|bias)", "rest": r"(?P<rest>.+)"}


def _pattern(template: str) -> re.Pattern:
    out = re.escape(template)
    for name, regex in _PLACEHOLDERS.items():
        out = out.replace(re.escape("{" + name + "}"), regex)
    return re.compile(out + r"\Z")


class KeyMap:
    """The name mapping of one checkpoint family, usable in both directions."""

    def __init__(self, internvl_config: dict):
        self.config = internvl_config
        family = llm_family(internvl_config)
        self.rules = VISION_RULES + (INTERNLM2_RULES if family == "internlm2" else HF_LLM_RULES)
        self._to_native = [(_pattern(r.original), r) for r in self.rules]
        self._to_original = [(_pattern(name), r, i) for r in self.rules for i, name in enumerate(r.native)]

    def to_native(self, key: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        for pattern, rule in self._to_native:
            m = pattern.match(key)
            if m:
                names = [n.format(**m.groupdict()) for n in rule.native]
                tensors = rule.split(tensor, self.config) if rule.split else [tensor]
                return list(zip(names, tensors, strict=True))
        raise KeyError(key)

    def native_names(self, key: str) -> list[str]:
        """The native name(s) of an original key, without reading the tensor (for checks before converting)."""
        for pattern, rule in self._to_native:
            m = pattern.match(key)
            if m:
                return [n.format(**m.groupdict()) for n in rule.native]
        raise KeyError(key)

    def to_original(self, key: str) -> tuple[str, int, Rule]:
        """The original name of a native key, the part it is of a fused tensor, and its rule."""
        for pattern, rule, part in self._to_original:
            m = pattern.match(key)
            if m:
                return rule.original.format(**m.groupdict()), part, rule
        raise KeyError(key)


def iter_native_tensors(ckpt: Checkpoint, shard: Path, keymap: KeyMap,
                        wanted: Callable[[str], bool] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """The native (name, tensor) pairs of one original shard, converted one tensor at a time (`wanted`: of the
    original names it accepts)."""
    for key, tensor in iter_shard(shard, wanted):
        if IGNORED_KEYS.match(key):
            continue
        try:
            yield from keymap.to_native(key, tensor)
        except KeyError:
            raise CaptuneError(f"unexpected tensor {key!r}: not part of an InternVL2 model", shard) from None


_LEGACY_NATIVE_PREFIXES = [
    ("language_model.model.", "model.language_model."),
    ("language_model.lm_head.", "lm_head."),
    ("vision_tower.", "model.vision_tower."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
]


def normalize_native_key(key: str) -> str:
    """transformers' own InternVL-hf checkpoints may use the pre-5.0 names (`language_model.model.*` ...)."""
    for old, new in _LEGACY_NATIVE_PREFIXES:
        if key.startswith(old):
            return new + key[len(old) :]
    return key


def iter_model_tensors(ckpt: Checkpoint, shard: Path, keymap: KeyMap | None,
                       keep: Callable[[str], bool] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """The native (name, tensor) pairs of one shard, whatever the checkpoint's layout; with `keep`, only those whose
    native name it accepts, the others not even read (a fused tensor is read when one of its parts is kept)."""
    if ckpt.layout == "internvl":
        yield from ((k, t) for k, t in iter_native_tensors(ckpt, shard, keymap, _wanted(keymap, keep))
                    if keep is None or keep(k))
        return
    wanted = None if keep is None else (lambda key: keep(normalize_native_key(key)))
    for key, tensor in iter_shard(shard, wanted):
        if not IGNORED_KEYS.match(key):
            yield normalize_native_key(key), tensor


def _wanted(keymap: KeyMap, keep: Callable[[str], bool] | None) -> Callable[[str], bool] | None:
    """`keep` on the native names of an original key."""
    if keep is None:
        return None

    def wanted(key: str) -> bool:
        try:
            return any(keep(name) for name in keymap.native_names(key))
        except KeyError:
            return True  # an unknown tensor: read, to be reported

    return wanted


def model_tensor_names(ckpt: Checkpoint, shard: Path, keymap: KeyMap | None) -> list[str]:
    """The native names of one shard's tensors, read from its header alone."""
    names = []
    for key in shard_keys(shard):
        if IGNORED_KEYS.match(key):
            continue
        if ckpt.layout != "internvl":
            names.append(normalize_native_key(key))
            continue
        try:
            names += keymap.native_names(key)
        except KeyError:
            raise CaptuneError(f"unexpected tensor {key!r}: not part of an InternVL2 model", shard) from None
    return names


def iter_original_tensors(shard: Path, keymap: KeyMap, pending: dict) -> Iterator[tuple[str, torch.Tensor]]:
    """The original (name, tensor) pairs of one native shard; fused tensors are emitted once all parts arrived.

    `pending` carries parts of fused tensors across shards (at most one layer's worth in practice).
    """
    yield from original_from_native(iter_shard(shard), keymap, pending, shard)


def original_from_native(
    pairs: Iterable[tuple[str, torch.Tensor]], keymap: KeyMap, pending: dict, source: Path | str
) -> Iterator[tuple[str, torch.Tensor]]:
    """`iter_original_tensors` for any stream of native (name, tensor) pairs; `source` names them in errors."""
    for key, tensor in pairs:
        key = normalize_native_key(key)
        if IGNORED_KEYS.match(key):
            continue
        try:
            original, part, rule = keymap.to_original(key)
        except KeyError:
            raise CaptuneError(f"unexpected tensor {key!r}: not part of an InternVL2 model", source) from None
        if len(rule.native) == 1:
            yield original, tensor
            continue
        parts = pending.setdefault(original, [None] * len(rule.native))
        parts[part] = tensor
        if all(p is not None for p in parts):
            del pending[original]
            yield original, rule.fuse(parts, keymap.config)
