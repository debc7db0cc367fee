"""Where the time of one shared-prefix training micro-batch goes (InternVL2-2B architecture, random weights):

    PYTHONPATH=src python benchmarks/profile_train.py --tokenizer .bench/tokenizer --out runs/profile

Times each part on its own (vision tower, LLM forward + backward with and without LoRA / dropout, loss) and
prints torch.profiler's table of the whole step. Its rows are not padded, so the BlockMask is built eagerly, as
in training without a compiled model. A diagnostic for the speed work, not a benchmark of record.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, warmup: int = 2, steps: int = 5) -> float:
    for _ in range(warmup):
        fn()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    sync()
    return (time.perf_counter() - start) / steps


def main() -> None:
    from captune.demo.bench import (
        bench_processor,
        internvl2_2b_config,
        lora_model,
        training_samples,
    )
    from captune.train.loss import CaptionLoss
    from captune.train.collate import collate_shared

    parser = argparse.ArgumentParser()
    parser.add_argument("--tokenizer")
    parser.add_argument("--out", required=True)
    parser.add_argument("--budget", type=int, default=8192)
    parser.add_argument("--compile", action="store_true", help="also time the whole LLM under torch.compile")
    parser.add_argument("--tiny", action="store_true", help="a tiny architecture on the CPU (to check the script)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device("cpu" if args.tiny else "cuda")
    processor = bench_processor(None if args.tiny else args.tokenizer)
    config = internvl2_2b_config(tiny=True) if args.tiny else None
    peft = lora_model(dev, processor, config)
    net = peft.base_model.model
    if not args.tiny:
        net.model.language_model.set_attn_implementation("flex_attention")
    tiles, per_row = 7, args.budget // 1900
    samples = training_samples(processor, per_row, tiles)
    groups = {}
    for s in samples:
        groups.setdefault(s["image_index"], []).append(s)
    items = [{"pixel_values": torch.randn(tiles, 3, 448, 448), "encodings": g} for g in groups.values()]
    batch = collate_shared(items, processor.pad_token_id, args.budget).to(dev, torch.bfloat16)
    loss_module = CaptionLoss(peft)
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16)
    results = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "tokens": int(batch.input_ids.numel()),
               "images": batch.pixel_values.shape[0] // tiles}

    def step():
        with autocast:
            loss = loss_module(batch.input_ids, batch.targets, batch.attention_mask, batch.position_ids,
                               batch.pixel_values)
        (loss / batch.num_tokens).backward()
        peft.zero_grad(set_to_none=True)

    results["full_step"] = timed(step)

    with torch.no_grad(), autocast:
        def vision():
            return net.model.get_image_features(pixel_values=batch.pixel_values, vision_feature_layer=-1,
                                                vision_feature_select_strategy="default")
        results["vision_forward"] = timed(vision)
        features = vision()
        embeds = net.model.get_input_embeddings()(batch.input_ids)
        mask = batch.input_ids == net.config.image_token_id
        features = getattr(features, "pooler_output", features)
        embeds[mask] = features.reshape(-1, embeds.shape[-1]).to(embeds.dtype)
        if args.tiny:
            block_mask = batch.attention_mask.dense()
        else:
            block_mask = batch.attention_mask.block_mask()
            results["block_mask"] = timed(lambda: batch.attention_mask.block_mask())
    lm = net.model.language_model
    keep = batch.targets != -100

    def llm(dropout: float | None = None, adapters: bool = True, head: bool = True):
        def run():
            x = embeds.detach().requires_grad_(not adapters)
            with autocast:
                hidden = lm(inputs_embeds=x, attention_mask=block_mask, position_ids=batch.position_ids).last_hidden_state
                out = net.lm_head(hidden[keep]).float().logsumexp(-1).sum() if head else hidden.float().sum()
            out.backward()
            peft.zero_grad(set_to_none=True)
        return run

    results["llm_fwd_bwd_lora_dropout"] = timed(llm())
    results["llm_fwd_bwd_no_head"] = timed(llm(head=False))
    for m in peft.modules():
        if hasattr(m, "lora_dropout"):
            for k in m.lora_dropout:
                m.lora_dropout[k] = torch.nn.Identity()
    results["llm_fwd_bwd_lora_no_dropout"] = timed(llm())
    with peft.disable_adapter():
        results["llm_fwd_bwd_no_lora"] = timed(llm(adapters=False))

    def fwd_only():
        with torch.no_grad(), autocast:
            lm(inputs_embeds=embeds, attention_mask=block_mask, position_ids=batch.position_ids)
    results["llm_forward_only_lora"] = timed(fwd_only)
    # matmul throughput of the LLM's shapes, for the ceiling
    a = torch.randn(results["tokens"] if not args.tiny else 64, 2048, device=dev, dtype=torch.bfloat16)
    w = torch.randn(8192, 2048, device=dev, dtype=torch.bfloat16)
    sec = timed(lambda: a @ w.T, steps=20)
    results["matmul_tflops_T_x_2048_x_8192"] = 2 * a.shape[0] * 2048 * 8192 / sec / 1e12
    r = torch.randn(128, 2048, device=dev, dtype=torch.bfloat16)
    sec = timed(lambda: a @ r.T, steps=20)
    results["matmul_tflops_T_x_2048_x_128"] = 2 * a.shape[0] * 2048 * 128 / sec / 1e12
    print(json.dumps(results, indent=2), flush=True)

    from torch.profiler import ProfilerActivity, profile

    for m in peft.modules():  # dropout back, as in training
        if hasattr(m, "lora_dropout"):
            for k in m.lora_dropout:
                m.lora_dropout[k] = torch.nn.Dropout(0.05)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(2):
            step()
        sync()
    table = prof.key_averages().table(sort_by="cuda_time_total" if dev.type == "cuda" else "cpu_time_total",
                                      row_limit=45)
    (out / "profile_table.txt").write_text(table)
    print(table, flush=True)

    if args.compile:
        t0 = time.perf_counter()
        lm.compile(dynamic=False)
        results["compiled_llm_first_step_s"] = timed(llm(), warmup=0, steps=1)
        results["compiled_llm_fwd_bwd"] = timed(llm())
        results["compile_wall_s"] = time.perf_counter() - t0
    (out / "profile.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2), flush=True)


if __name__ == "__main__":
    main()
