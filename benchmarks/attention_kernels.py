"""The attention calls of captioning with InternVL2-2B at batch 64, each with the kernels PyTorch can run it with.

    python benchmarks/attention_kernels.py --out $OUT

decode: one new token per row over the static cache (`eval/greedy.one_token_attention`: grouped query heads
`[B, kv_heads, group, D]`, a boolean mask `[B, 1, 1, L]`); vision: the vision tower's self-attention over 1,025
tokens per tile; prompt: the LLM's causal attention over a 1,842-token prompt. Milliseconds per call (CUDA events,
median of 50 after 10 warm-ups) and each variant's largest difference from float32 math.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def _ms(fn, repeats: int = 50) -> float:
    for _ in range(10):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def _variants(call, reference: torch.Tensor, backends: dict) -> dict:
    rows = {}
    for name, fn in backends.items():
        try:
            out = fn()
            rows[name] = {"ms": _ms(fn), "max_abs_diff": float((out.float() - reference).abs().max())}
        except Exception as e:  # noqa: BLE001 -- a backend that does not take these inputs
            rows[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}
        print(call, name, rows[name], flush=True)
    return rows


def _with(backend, fn):
    def run():
        with sdpa_kernel([backend]):
            return fn()
    return run


def decode(batch: int = 64, kv_heads: int = 8, group: int = 2, dim: int = 128, length: int = 1920,
           filled: int = 1860) -> dict:
    dev, dt = torch.device("cuda"), torch.bfloat16
    q = torch.randn(batch, kv_heads, group, dim, device=dev, dtype=dt)
    k = torch.randn(batch, kv_heads, length, dim, device=dev, dtype=dt)
    v = torch.randn(batch, kv_heads, length, dim, device=dev, dtype=dt)
    mask = torch.zeros(batch, 1, 1, length, dtype=torch.bool, device=dev)
    mask[..., :filled] = True
    mask[::2, ..., :5] = False  # left padding in half the rows
    bias = torch.zeros(batch, 1, 1, length, dtype=dt, device=dev).masked_fill(~mask, float("-inf"))
    scale = dim**-0.5
    reference = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, scale=scale)

    def sdpa():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)

    def sdpa_bias():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)

    def matmuls():  # scores in float32, as SDPA's math path
        scores = torch.matmul(q, k.transpose(-1, -2)).float() * scale  # [B, kv_heads, group, L]
        scores = scores.masked_fill(~mask, float("-inf")).softmax(-1)
        return torch.matmul(scores.to(dt), v)

    result = _variants("decode", reference, {
        "sdpa_default": sdpa, "cudnn": _with(SDPBackend.CUDNN_ATTENTION, sdpa),
        "efficient": _with(SDPBackend.EFFICIENT_ATTENTION, sdpa), "math": _with(SDPBackend.MATH, sdpa),
        "efficient_float_mask": _with(SDPBackend.EFFICIENT_ATTENTION, sdpa_bias),
        "cudnn_float_mask": _with(SDPBackend.CUDNN_ATTENTION, sdpa_bias), "matmuls": matmuls})
    gb = 2 * k.numel() * k.element_size() / 1e9
    for row in result.values():
        if "ms" in row:
            row["cache_read_TB_per_s"] = gb / row["ms"]
    return {"shape": {"batch": batch, "kv_heads": kv_heads, "group": group, "dim": dim, "length": length},
            "cache_GB": gb, "variants": result}


def vision(tiles: int = 448, heads: int = 16, tokens: int = 1025, dim: int = 64) -> dict:
    dev, dt = torch.device("cuda"), torch.bfloat16
    q, k, v = (torch.randn(tiles, heads, tokens, dim, device=dev, dtype=dt) for _ in range(3))
    reference = F.scaled_dot_product_attention(q[:8].float(), k[:8].float(), v[:8].float())

    def sdpa():
        return F.scaled_dot_product_attention(q, k, v)

    rows = {}
    for name, backend in (("default", None), ("cudnn", SDPBackend.CUDNN_ATTENTION),
                          ("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
        fn = sdpa if backend is None else _with(backend, sdpa)
        try:
            out = fn()
            rows[name] = {"ms": _ms(fn, 10), "max_abs_diff": float((out[:8].float() - reference).abs().max())}
            rows[name]["TFLOP_per_s"] = 4 * tiles * heads * tokens**2 * dim / rows[name]["ms"] / 1e9
        except Exception as e:  # noqa: BLE001
            rows[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}
        print("vision", name, rows[name], flush=True)
    return rows


def prompt(batch: int = 64, heads: int = 16, kv_heads: int = 8, tokens: int = 1842, dim: int = 128) -> dict:
    dev, dt = torch.device("cuda"), torch.bfloat16
    q = torch.randn(batch, heads, tokens, dim, device=dev, dtype=dt)
    k, v = (torch.randn(batch, kv_heads, tokens, dim, device=dev, dtype=dt) for _ in range(2))
    kr, vr = (t.repeat_interleave(heads // kv_heads, 1) for t in (k, v))  # transformers' repeat_kv

    def repeated():
        return F.scaled_dot_product_attention(q, kr, vr, is_causal=True)

    def gqa():
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    reference = repeated().float()
    rows = {}
    for name, fn in (("default_repeated", repeated), ("default_gqa", gqa),
                     ("cudnn_repeated", _with(SDPBackend.CUDNN_ATTENTION, repeated)),
                     ("flash_repeated", _with(SDPBackend.FLASH_ATTENTION, repeated)),
                     ("flash_gqa", _with(SDPBackend.FLASH_ATTENTION, gqa))):
        try:
            out = fn()
            rows[name] = {"ms": _ms(fn, 10), "max_abs_diff_vs_default": float((out.float() - reference).abs().max())}
            rows[name]["TFLOP_per_s"] = 2 * batch * heads * tokens**2 * dim / rows[name]["ms"] / 1e9
        except Exception as e:  # noqa: BLE001
            rows[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}
        print("prompt", name, rows[name], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "decode": decode(), "vision": vision(), "prompt": prompt()}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "attention_kernels.json").write_text(text + "\n")


if __name__ == "__main__":
    main()
