"""Tiny original-layout InternVL2 checkpoints for the families the fixtures do not cover (Phi-3, Llama,
InternViT-6B), and an independent reference of the original vision path to check them against."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

VISION_300M = {
    "architectures": ["InternVisionModel"], "model_type": "intern_vit_6b", "hidden_size": 64, "intermediate_size": 128,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_channels": 3, "image_size": 448, "patch_size": 14,
    "hidden_act": "gelu", "layer_norm_eps": 1e-6, "norm_type": "layer_norm", "qkv_bias": True, "qk_normalization": False,
    "initializer_factor": 0.1,
}
VISION_6B = {**VISION_300M, "norm_type": "rms_norm", "qkv_bias": False, "qk_normalization": True}

_LLM_COMMON = {"vocab_size": 1024, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "hidden_act": "silu",
               "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2, "tie_word_embeddings": False}
LLMS = {
    "internlm2": {**_LLM_COMMON, "architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2", "bias": False,
                  "rope_theta": 1000000, "rope_scaling": {"type": "dynamic", "factor": 2.0},
                  "max_position_embeddings": 4096},
    "qwen2": {**_LLM_COMMON, "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "rope_theta": 1000000.0,
              "max_position_embeddings": 4096, "use_sliding_window": False, "sliding_window": 4096},
    # Phi-3-mini-128k: LongRoPE ("su" in its remote code), factors switch past original_max_position_embeddings.
    "phi3": {**_LLM_COMMON, "architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "num_key_value_heads": 4,
             "rope_theta": 10000.0, "max_position_embeddings": 4096, "original_max_position_embeddings": 64,
             "rope_scaling": {"type": "su", "short_factor": [1.0 + 0.1 * i for i in range(8)],
                              "long_factor": [1.5 + 0.5 * i for i in range(8)]}, "sliding_window": 4096},
    # Yi-34B / Llama-3-70B.
    "llama": {**_LLM_COMMON, "architectures": ["LlamaForCausalLM"], "model_type": "llama", "rope_theta": 5000000.0,
              "rope_scaling": None, "max_position_embeddings": 4096, "attention_bias": False},
}
TEMPLATES = {"internlm2": "internlm2-chat", "qwen2": "Hermes-2", "phi3": "phi3-chat", "llama": "Hermes-2"}
IMAGE_TOKEN_ID = 1017


def internvl_config(family: str, vision: str = "300m") -> dict:
    return {
        "architectures": ["InternVLChatModel"], "model_type": "internvl_chat", "downsample_ratio": 0.5,
        "dynamic_image_size": True, "force_image_size": 448, "max_dynamic_patch": 12, "min_dynamic_patch": 1,
        "ps_version": "v2", "select_layer": -1, "template": TEMPLATES[family], "use_thumbnail": True,
        "torch_dtype": "float32", "llm_config": dict(LLMS[family]),
        "vision_config": dict(VISION_6B if vision == "6b" else VISION_300M),
    }


def random_original_state_dict(cfg: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights with the original names, derived from the native model's shapes."""
    from transformers import InternVLForConditionalGeneration

    from captune.demo.tinymodel import original_state_dict
    from captune.internvl.config import native_config

    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(native_config(cfg, IMAGE_TOKEN_ID))
    with torch.no_grad():
        for key, t in model.state_dict().items():
            if "rotary_emb" not in key:
                t.copy_((1.0 + 0.1 * torch.randn_like(t)) if ("norm" in key or "lambda" in key)
                        else 0.05 * torch.randn_like(t))
    return original_state_dict(model, cfg)


def all_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def assert_bit_identical(a: dict, b: dict) -> None:
    """Same names, dtypes, shapes and bytes."""
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)), k


def write_original_checkpoint(path: Path, family: str, vision: str = "300m", shards: int = 1) -> Path:
    cfg = internvl_config(family, vision)
    sd = random_original_state_dict(cfg)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    keys = sorted(sd)
    if shards == 1:
        save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})
        return path
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        chunk = {k: sd[k].contiguous() for k in keys[i::shards]}
        save_file(chunk, str(path / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(chunk, name))
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


def _norm(x: torch.Tensor, sd: dict, prefix: str, kind: str, eps: float = 1e-6) -> torch.Tensor:
    if kind == "rms_norm":
        return sd[prefix + "weight"] * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))
    return F.layer_norm(x, x.shape[-1:], sd[prefix + "weight"], sd[prefix + "bias"], eps)


def reference_image_features(sd: dict, cfg: dict, pixel_values: torch.Tensor) -> torch.Tensor:
    """InternVL2's `extract_feature`, written from the architecture: InternViT, pixel shuffle v2, mlp1."""
    v = cfg["vision_config"]
    heads, kind = v["num_attention_heads"], v["norm_type"]
    x = F.conv2d(pixel_values, sd["vision_model.embeddings.patch_embedding.weight"],
                 sd["vision_model.embeddings.patch_embedding.bias"], stride=v["patch_size"])  # [B, C, h, w]
    x = x.flatten(2).transpose(1, 2)  # [B, N, C]
    b, n, c = x.shape
    x = torch.cat([sd["vision_model.embeddings.class_embedding"].expand(b, -1, -1), x], 1)
    x = x + sd["vision_model.embeddings.position_embedding"]
    n, d = n + 1, c // heads
    for i in range(v["num_hidden_layers"]):
        p = f"vision_model.encoder.layers.{i}."
        h = _norm(x, sd, p + "norm1.", kind)
        qkv = F.linear(h, sd[p + "attn.qkv.weight"], sd.get(p + "attn.qkv.bias"))
        q, k, val = qkv.reshape(b, n, 3, heads, d).permute(2, 0, 3, 1, 4)  # 3 x [B, H, N, D]
        if v["qk_normalization"]:
            q = _norm(q.transpose(1, 2).flatten(-2), sd, p + "attn.q_norm.", "rms_norm").view(b, n, heads, d).transpose(1, 2)
            k = _norm(k.transpose(1, 2).flatten(-2), sd, p + "attn.k_norm.", "rms_norm").view(b, n, heads, d).transpose(1, 2)
        attn = torch.softmax(q @ k.transpose(-1, -2) * d**-0.5, dim=-1) @ val  # [B, H, N, D]
        attn = F.linear(attn.transpose(1, 2).reshape(b, n, c), sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
        x = x + sd[p + "ls1"] * attn
        h = _norm(x, sd, p + "norm2.", kind)
        h = F.linear(F.gelu(F.linear(h, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"])),
                     sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
        x = x + sd[p + "ls2"] * h
    x = x[:, 1:]  # drop CLS
    side = int((n - 1) ** 0.5)
    x = x.reshape(b, side, side, c)
    # pixel shuffle, scale 0.5, "v2" (swap back)
    x = x.reshape(b, side, side // 2, c * 2).permute(0, 2, 1, 3).reshape(b, side // 2, side // 2, c * 4)
    x = x.permute(0, 2, 1, 3).reshape(b, -1, c * 4)
    x = F.layer_norm(x, x.shape[-1:], sd["mlp1.0.weight"], sd["mlp1.0.bias"], 1e-5)
    x = F.linear(F.gelu(F.linear(x, sd["mlp1.1.weight"], sd["mlp1.1.bias"])), sd["mlp1.3.weight"], sd["mlp1.3.bias"])
    return x
