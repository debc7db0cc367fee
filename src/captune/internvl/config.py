"""The config mapping: an original InternVL2 config.json (`InternVLChatConfig`) as transformers' `InternVLConfig`, and back.

The LLM families of the seven releases: InternLM2 (2B/8B/26B, computed by transformers' Llama), Qwen2 (1B), Phi-3 with
LongRoPE (4B) and Llama (40B/76B); the vision tower is InternViT-300M or -6B. Settings the native class would compute
differently (pixel shuffle v1) are refused."""

from __future__ import annotations

from pathlib import Path

from captune.errors import CaptuneError
from captune.internvl.folder import (
    ORIGINAL_ARCHITECTURE,
)

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
