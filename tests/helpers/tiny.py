"""Tiny original-layout InternVL2 checkpoints for the families the fixtures do not cover (Phi-3, Llama,
InternViT-6B), comparisons of their tensors, and an independent reference of the original vision path to check them
against. The configs and weights come from the package's one factory, `captune.demo.tinymodel`."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from captune.demo.tinymodel import internvl_config, write_release

IMAGE_TOKEN_ID = 1017  # <IMG_CONTEXT> of the tokenizer-less checkpoints (1024-token vocabulary)


def write_original_checkpoint(path: Path, family: str, vision: str = "300m", shards: int = 1) -> Path:
    """`internvl_config(family, vision)` with noise weights (no tokenizer), in `shards` files."""
    return write_release(path, internvl_config(family, vision), init="noise", shards=shards)


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
