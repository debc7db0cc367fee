"""Converting InternVL2 checkpoints between the original layout and transformers' native InternVL class.

The original releases ship remote code (`InternVLChatModel`) that breaks with new transformers releases.
transformers' `InternVLForConditionalGeneration` computes the same function once the weights are renamed and
the fused projections split; this module is that mapping, in both directions, tensor by tensor:

    original                                  native
    vision_model.*                            model.vision_tower.*  (InternViT-300M and InternViT-6B)
    mlp1.0 / mlp1.1 / mlp1.3                  model.multi_modal_projector.layer_norm / linear_1 / linear_2
    language_model.model.* (InternLM2)        model.language_model.* (Llama)
    language_model.model.* (Qwen2/Phi3/Llama) model.language_model.*
    language_model.output / lm_head           lm_head
"""

from __future__ import annotations

import re
import shutil
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import (
    INTERNVL_CONFIG_NAME,
    ORIGINAL_ARCHITECTURE,
    Checkpoint,
    has_tokenizer,
    iter_shard,
    open_checkpoint,
    shard_metadata,
)
from .errors import CaptuneError
from .fileio import atomic_dir, write_json_atomic

# The LLM families of the seven InternVL2 releases, and what each becomes in transformers.
LLM_FAMILIES = {
    "InternLM2ForCausalLM": "internlm2",  # 2B, 8B, 26B (and 76B's template); becomes Llama
    "Qwen2ForCausalLM": "qwen2",  # 1B
    "Phi3ForCausalLM": "phi3",  # 4B
    "LlamaForCausalLM": "llama",  # 40B (Yi-34B), 76B (Hermes-2-Theta-Llama-3-70B)
}
NATIVE_TEXT_MODEL_TYPE = {"internlm2": "llama", "qwen2": "qwen2", "phi3": "phi3", "llama": "llama"}
FAMILY_ARCHITECTURE = {v: k for k, v in LLM_FAMILIES.items()}

# Weights that are recomputed at load time and never need converting.
_IGNORED_KEYS = re.compile(r".*rotary_emb\.inv_freq$")


def llm_family(internvl_config: dict, config_path: Path | str = "config.json") -> str:
    llm = internvl_config.get("llm_config") or {}
    architectures = llm.get("architectures") or []
    for arch in architectures:
        if arch in LLM_FAMILIES:
            return LLM_FAMILIES[arch]
    raise CaptuneError(
        f"llm_config architecture {', '.join(architectures) or '(none)'} is not supported; "
        f"supported: {', '.join(LLM_FAMILIES)}",
        config_path,
    )


def check_supported(internvl_config: dict, config_path: Path | str = "config.json") -> None:
    """Refuse settings that the native class computes differently, rather than give silently different output."""
    ps_version = internvl_config.get("ps_version", "v1")
    if ps_version != "v2":
        raise CaptuneError(
            f"ps_version {ps_version!r} is not supported: only 'v2' pixel shuffle (all InternVL2 releases) matches "
            "transformers' InternVL class; 'v1' (InternVL-Chat-V1.5) would give different output",
            config_path,
        )
    for key in ("vision_config", "llm_config"):
        if not isinstance(internvl_config.get(key), dict):
            raise CaptuneError(f"config has no {key}", config_path)
    llm_family(internvl_config, config_path)


# --------------------------------------------------------------------------------------------- config


def _rope_parameters(llm: dict) -> dict:
    params = {"rope_type": "default", "rope_theta": float(llm.get("rope_theta", 10000.0))}
    scaling = llm.get("rope_scaling")
    if scaling:
        scaling = dict(scaling)
        kind = scaling.pop("rope_type", None) or scaling.pop("type", None) or "default"
        scaling.pop("type", None)
        # Phi-3's remote code calls LongRoPE "su" (later "longrope"); transformers knows only "longrope".
        params["rope_type"] = {"su": "longrope"}.get(kind, kind)
        params.update(scaling)
    return params


def _config_fields(config_class) -> set[str]:
    return set(getattr(config_class, "__dataclass_fields__", {})) - {"architectures", "transformers_version", "dtype"}


def native_text_config(internvl_config: dict) -> dict:
    """The native text config (a dict for `InternVLConfig(text_config=...)`) of the original llm_config."""
    from transformers import AutoConfig

    llm = internvl_config["llm_config"]
    family = llm_family(internvl_config)
    model_type = NATIVE_TEXT_MODEL_TYPE[family]
    if family == "internlm2":
        text = {
            "vocab_size": llm["vocab_size"],
            "hidden_size": llm["hidden_size"],
            "intermediate_size": llm["intermediate_size"],
            "num_hidden_layers": llm["num_hidden_layers"],
            "num_attention_heads": llm["num_attention_heads"],
            "num_key_value_heads": llm.get("num_key_value_heads", llm["num_attention_heads"]),
            "hidden_act": llm.get("hidden_act", "silu"),
            "max_position_embeddings": llm.get("max_position_embeddings", 2048),
            "rms_norm_eps": llm.get("rms_norm_eps", 1e-6),
            "initializer_range": llm.get("initializer_range", 0.02),
            "attention_bias": bool(llm.get("bias", False)),
            "mlp_bias": False,
            "bos_token_id": llm.get("bos_token_id"),
            "eos_token_id": llm.get("eos_token_id"),
            "pad_token_id": llm.get("pad_token_id"),
            "head_dim": llm["hidden_size"] // llm["num_attention_heads"],
        }
    else:
        config_class = type(AutoConfig.for_model(model_type))
        text = {k: v for k, v in llm.items() if k in _config_fields(config_class) and k != "model_type"}
        text.pop("rope_scaling", None)
        text.pop("rope_theta", None)
    text["rope_parameters"] = _rope_parameters(llm)
    text["tie_word_embeddings"] = False
    text["model_type"] = model_type
    return text


def native_vision_config(internvl_config: dict) -> dict:
    vision = internvl_config["vision_config"]
    image_size = internvl_config.get("force_image_size") or vision.get("image_size", 448)
    return {
        "model_type": "internvl_vision",
        "hidden_size": vision["hidden_size"],
        "intermediate_size": vision["intermediate_size"],
        "num_hidden_layers": vision["num_hidden_layers"],
        "num_attention_heads": vision["num_attention_heads"],
        "num_channels": vision.get("num_channels", 3),
        "image_size": image_size,
        "patch_size": vision.get("patch_size", 14),
        "hidden_act": vision.get("hidden_act", "gelu"),
        "layer_norm_eps": vision.get("layer_norm_eps", 1e-6),
        "norm_type": vision.get("norm_type", "rms_norm"),
        "attention_bias": bool(vision.get("qkv_bias", False)),
        "use_qk_norm": bool(vision.get("qk_normalization", False)),
        "layer_scale_init_value": vision.get("initializer_factor", 0.1),
        "use_mean_pooling": True,  # no final norm after the encoder, as InternViT
        "attention_dropout": 0.0,
        "hidden_dropout_prob": 0.0,
        "projection_dropout": 0.0,
    }


def num_image_tokens_per_tile(internvl_config: dict) -> int:
    vision = internvl_config["vision_config"]
    image_size = internvl_config.get("force_image_size") or vision.get("image_size", 448)
    patches = image_size // vision.get("patch_size", 14)
    return int(patches * patches * internvl_config.get("downsample_ratio", 0.5) ** 2)


def native_config(internvl_config: dict, image_token_id: int | None, tie_word_embeddings: bool = False):
    """The `transformers.InternVLConfig` that computes what the original InternVLChatModel computes."""
    from transformers import InternVLConfig

    config = InternVLConfig(
        vision_config=native_vision_config(internvl_config),
        text_config=native_text_config(internvl_config),
        # Without a tokenizer the id of <IMG_CONTEXT> is unknown; -1 matches no token, so images fail loudly.
        image_token_id=image_token_id if image_token_id is not None else -1,
        image_seq_length=num_image_tokens_per_tile(internvl_config),
        downsample_ratio=internvl_config.get("downsample_ratio", 0.5),
        projector_hidden_act="gelu",
        vision_feature_layer=internvl_config.get("select_layer", -1),
        vision_feature_select_strategy="default",  # drop the CLS token, as extract_feature does
        # The native default (True) would overwrite the input embeddings with lm_head: InternVL2 never ties.
        tie_word_embeddings=tie_word_embeddings,
    )
    config.architectures = ["InternVLForConditionalGeneration"]
    config.text_config.tie_word_embeddings = tie_word_embeddings
    return config


def internvl_config_from_native(native: dict) -> dict:
    """An original-layout config.json for a native folder that was never an original release.

    Only the fields the original InternVLChatModel reads; a folder converted from a release keeps the exact
    original in internvl_config.json instead.
    """
    text, vision = native["text_config"], native["vision_config"]
    model_type = text.get("model_type")
    family = {"qwen2": "qwen2", "phi3": "phi3", "llama": "llama"}.get(model_type)
    if family is None:
        raise CaptuneError(f"text model_type {model_type!r} has no InternVL2 original layout")
    rope = dict(text.get("rope_parameters") or {"rope_type": "default", "rope_theta": 10000.0})
    rope_theta = rope.pop("rope_theta", 10000.0)
    rope_type = rope.pop("rope_type", "default")
    llm = {k: v for k, v in text.items() if k not in ("rope_parameters", "model_type")}
    llm.update(
        architectures=[FAMILY_ARCHITECTURE[family]],
        model_type=model_type,
        rope_theta=rope_theta,
        rope_scaling=None if rope_type == "default" else {"type": rope_type, **rope},
    )
    image_size = vision.get("image_size", [448, 448])
    image_size = image_size[0] if isinstance(image_size, list) else image_size
    patch_size = vision.get("patch_size", [14, 14])
    patch_size = patch_size[0] if isinstance(patch_size, list) else patch_size
    return {
        "architectures": [ORIGINAL_ARCHITECTURE],
        "model_type": "internvl_chat",
        "downsample_ratio": native.get("downsample_ratio", 0.5),
        "dynamic_image_size": True,
        "force_image_size": image_size,
        "max_dynamic_patch": 12,
        "min_dynamic_patch": 1,
        "ps_version": "v2",
        "select_layer": native.get("vision_feature_layer", -1),
        "use_thumbnail": True,
        "template": None,
        "llm_config": llm,
        "vision_config": {
            "architectures": ["InternVisionModel"],
            "model_type": "intern_vit_6b",
            "hidden_size": vision["hidden_size"],
            "intermediate_size": vision["intermediate_size"],
            "num_hidden_layers": vision["num_hidden_layers"],
            "num_attention_heads": vision["num_attention_heads"],
            "num_channels": vision.get("num_channels", 3),
            "image_size": image_size,
            "patch_size": patch_size,
            "hidden_act": vision.get("hidden_act", "gelu"),
            "layer_norm_eps": vision.get("layer_norm_eps", 1e-6),
            "norm_type": vision.get("norm_type", "layer_norm"),
            "qkv_bias": vision.get("attention_bias", False),
            "qk_normalization": vision.get("use_qk_norm", False),
            "initializer_factor": vision.get("layer_scale_init_value", 0.1),
        },
    }


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


def iter_native_tensors(ckpt: Checkpoint, shard: Path, keymap: KeyMap) -> Iterator[tuple[str, torch.Tensor]]:
    """The native (name, tensor) pairs of one original shard, converted one tensor at a time."""
    for key, tensor in iter_shard(shard):
        if _IGNORED_KEYS.match(key):
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


def iter_model_tensors(ckpt: Checkpoint, shard: Path, keymap: KeyMap | None) -> Iterator[tuple[str, torch.Tensor]]:
    """The native (name, tensor) pairs of one shard, whatever the checkpoint's layout."""
    if ckpt.layout == "internvl":
        yield from iter_native_tensors(ckpt, shard, keymap)
        return
    for key, tensor in iter_shard(shard):
        if not _IGNORED_KEYS.match(key):
            yield normalize_native_key(key), tensor


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
        if _IGNORED_KEYS.match(key):
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


# --------------------------------------------------------------------------------------------- the command


def _save_shard(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata or {"format": "pt"})


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


def _lm_head_in(ckpt: Checkpoint) -> bool:
    from .checkpoint import shard_keys

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
        from .tokenizer import image_token_ids

        image_token_id = image_token_ids(tokenizer)["<IMG_CONTEXT>"]
    tie = not _lm_head_in(ckpt)
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
    from .templates import chat_template, get_template, stop_token_id

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
    from .tokenizer import load_tokenizer

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
