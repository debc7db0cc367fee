"""`captune bench train` (and what `captune bench eval` shares): speed on a GPU, the tutorial's way and captune's side
by side in one run.

    captune bench eval --tokenizer TOKENIZER_DIR --out runs/bench
    captune bench train --tokenizer TOKENIZER_DIR --out runs/bench

The model is a randomly initialised InternVL2-2B (the exact architecture: InternViT-300M, InternLM2-1.8B,
92,553-token vocabulary); speed does not depend on the weights. Images are synthetic 640x480 JPEGs, which
InternVL2's tiling cuts into 6 tiles + thumbnail, as most COCO images.
"""

from __future__ import annotations

import json
import random
import tempfile
import time
from pathlib import Path

import torch

from captune.demo.tinymodel import (
    build_compact_tokenizer,
    internvl_config,
    tokenizer_corpus,
)


def internvl2_2b_config(tiny: bool = False) -> dict:
    """The config.json of the OpenGVLab/InternVL2-2B release (the fields the model reads); `tiny`: the same with
    tiny layers and vocabulary, to run the benchmarks end to end on a CPU."""
    if tiny:
        return internvl_config(torch_dtype="bfloat16", llm={"max_position_embeddings": 32768},
                               vit={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                    "num_attention_heads": 2})
    return internvl_config(
        torch_dtype="bfloat16",
        llm={"vocab_size": 92553, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 24,
             "num_attention_heads": 16, "num_key_value_heads": 8, "max_position_embeddings": 32768},
        vit={"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16},
    )


def random_model(device: torch.device, dtype: torch.dtype, image_token_id: int, attn_implementation: str = "sdpa",
                 model_config: dict | None = None):
    from transformers import InternVLForConditionalGeneration

    from captune.internvl.config import native_config

    config = native_config(model_config or internvl2_2b_config(), image_token_id)
    torch.manual_seed(0)
    with torch.device(device):
        model = InternVLForConditionalGeneration(config)
    model.set_attn_implementation(attn_implementation)
    return model.to(dtype).eval()


def lora_model(device: torch.device, processor, model_config: dict | None = None):
    """The random InternVL2-2B (bf16) with the recipe's LoRA (r=128, alpha 256, dropout 0.05, float32 weights)."""
    from captune.internvl.lora import add_lora
    from captune.train.parallel import trainable_to_float32

    model = random_model(device, torch.bfloat16, processor.tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
                         model_config=model_config)
    peft = add_lora(model, rank=128, alpha=256, dropout=0.05)
    trainable_to_float32(peft)
    return peft


def bench_processor(tokenizer_dir: str | Path | None):
    """InternLM2's tokenizer when given (the real prompt lengths), else a compact stand-in (ids < 1000)."""
    from captune.inputs.processor import DEFAULT_QUESTION, Processor
    from captune.inputs.templates import get_template

    if tokenizer_dir is not None:
        from captune.internvl.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(tokenizer_dir)
    else:
        tokenizer = build_compact_tokenizer(tokenizer_corpus(CAPTION_WORDS, [DEFAULT_QUESTION]), vocab_size=1000)
    return Processor(tokenizer=tokenizer, template=get_template("internlm2-chat"), tile_size=448, max_tiles=12,
                     thumbnail=True, tokens_per_tile=256)


CAPTION_WORDS = ("a man woman dog cat bus train plate of food sitting standing on the table next to street with "
                 "two people riding bike near red white blue green large small in front field grass water").split()


def synthetic_jpegs(folder: Path, n: int, size: tuple[int, int] = (640, 480), seed: int = 0) -> list[Path]:
    """Photo-like noise with shapes, as JPEG files: decoding costs what a COCO image costs."""
    import numpy as np
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        base = rng.integers(0, 255, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
        im = Image.fromarray(base).resize(size, Image.Resampling.BILINEAR)
        draw = ImageDraw.Draw(im)
        for _ in range(5):
            x, y = rng.integers(0, size[0]), rng.integers(0, size[1])
            draw.ellipse([x, y, x + 120, y + 90], fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
        path = folder / f"COCO_val2014_{i:012d}.jpg"
        im.save(path, quality=90)
        paths.append(path)
    return paths


def cuda_sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_gb(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def report(result: dict, out: str | None, name: str) -> None:
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / name).write_text(text + "\n")


# ------------------------------------------------------------------------------------------------ training


def coco_like_captions(n_images: int, per_image: int = 5, seed: int = 0) -> list[list[str]]:
    """Captions of COCO's length (10 to 14 words, ~15 tokens)."""
    rng = random.Random(seed)
    return [[" ".join(rng.choice(CAPTION_WORDS) for _ in range(rng.randint(9, 14))).capitalize() + "."
             for _ in range(per_image)] for _ in range(n_images)]


def training_samples(processor, n_images: int, tiles: int, seed: int = 0) -> list[dict]:
    """Tokenized training samples: (image index, input_ids, labels) of each caption, as the trainer feeds them."""
    from captune.inputs.processor import DEFAULT_QUESTION
    from captune.inputs.templates import encode_conversation

    samples = []
    for i, captions in enumerate(coco_like_captions(n_images, seed=seed)):
        for caption in captions:
            conv = [{"from": "human", "value": "<image>\n" + DEFAULT_QUESTION}, {"from": "gpt", "value": caption}]
            enc = encode_conversation(processor.tokenizer, conv, tiles * processor.tokens_per_tile, processor.template)
            samples.append({"image_index": i, "input_ids": enc["input_ids"], "labels": enc["labels"]})
    return samples


def _flops_per_step(model, batch, vision_tokens: int) -> float:
    """Model FLOPs of one LoRA step: the LLM forward and the backward through its activations (4 x params x
    tokens, the frozen weights get no gradient) plus attention, and the frozen vision tower's forward."""
    lm = model.model.language_model
    cfg = lm.config
    n_llm = sum(p.numel() for p in lm.parameters()) + model.lm_head.weight.numel() * 0  # head: supervised rows only
    tokens = batch.num_real_tokens
    attn = 4 * cfg.num_hidden_layers * cfg.hidden_size * _attended_pairs(batch)  # QK^T and AV, forward
    n_vis = sum(p.numel() for p in model.model.vision_tower.parameters())
    return 4 * n_llm * tokens + 3 * attn + 2 * n_vis * vision_tokens


def _time_training(loss_module, optimizer, batches, device, warmup: int, steps: int,
                   reset: bool = True) -> tuple[float, float]:
    """Seconds per micro-batch (forward and backward; one optimizer step per `steps` micro-batches, as gradient
    accumulation does: the recipe steps once per 512 captions), and peak GB."""
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16)

    def run(n: int, offset: int) -> None:
        for i in range(n):
            batch = batches[(offset + i) % len(batches)]
            with autocast:
                loss = loss_module(batch.input_ids, batch.targets, batch.attention_mask, batch.position_ids,
                                   batch.pixel_values, batch.num_tokens)
            (loss / batch.num_tokens).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    if reset:
        reset_peak(device)  # frees the previous variant's cached blocks
    run(warmup, 0)
    cuda_sync(device)
    if device.type == "cuda":  # the timed steps reuse the warm-up's memory, as a training run does
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    run(steps, warmup)
    cuda_sync(device)
    return (time.perf_counter() - start) / steps, peak_gb(device)


def _profile(loss_module, optimizer, batches, device, path: Path) -> None:
    """torch.profiler's table of two micro-batches: where the time of a step goes."""
    from torch.profiler import ProfilerActivity, profile

    batches = [b.to(device, torch.bfloat16) for b in batches]
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:  # on the warm cache
        _time_training(loss_module, optimizer, batches, device, warmup=0, steps=2, reset=False)
    path.write_text(prof.key_averages().table(sort_by="cuda_time_total", row_limit=60))


def _attended_pairs(batch) -> int:
    """(query, key) pairs the attention computes: causal rows, or block-diagonal groups with caption branches."""
    from captune.train.collate import PrefixSharing

    if not isinstance(batch.attention_mask, PrefixSharing):
        t = batch.input_ids.shape[1]
        return batch.input_ids.shape[0] * t * (t + 1) // 2
    total = 0
    doc, branch = batch.attention_mask.doc.cpu(), batch.attention_mask.branch.cpu()
    for r in range(doc.shape[0]):
        for d in doc[r].unique().tolist():
            if d < 0:
                continue
            br = branch[r][doc[r] == d]
            p = int((br == 0).sum())
            total += p * (p + 1) // 2
            for k in br[br > 0].unique().tolist():
                m = int((br == k).sum())
                total += m * p + m * (m + 1) // 2
    return total


def bench_train(tokenizer: str | None = None, steps: int = 8, warmup: int = 3, batch_size: int = 4,
                budgets: tuple[int, ...] = (16384,), device: str = "cuda", out: str | None = None,
                peak_tflops: float = 989.0, model_config: dict | None = None, compile_layers: bool = True,
                steps_between: bool = True) -> dict:
    """(a) the tutorial's way: one caption per sample, batch 4, gradient checkpointing, full logits;
    (b) captune's default: each image once for its five captions, rows packed (and padded) to 16,384 tokens,
    FlexAttention, logits only where there is a loss, LLM and vision tower compiled; and the steps on the way
    (eager, with PEFT's float32 input casts, with checkpointing). Same GPU, same run."""
    from captune.devices import resolve_device
    from captune.train.collate import collate_separate, collate_shared
    from captune.train.loss import CaptionLoss, enable_gradient_checkpointing

    dev = resolve_device(device)
    processor = bench_processor(tokenizer)
    peft = lora_model(dev, processor, model_config)
    trainable = sum(p.numel() for p in peft.parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad], lr=1e-5)
    tiles = 7
    n_images = max(8, 2 * (max(budgets) // 1900))  # two different packs at the largest budget
    samples = training_samples(processor, n_images, tiles)
    pixels = [torch.randn(tiles, 3, 448, 448) for _ in range(n_images)]
    result = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
              "trainable_params": trainable, "tiles_per_image": tiles,
              "mean_caption_tokens": sum(sum(1 for x in s["labels"] if x != -100) for s in samples) / len(samples),
              "prompt_tokens": sum(1 for x in samples[0]["labels"] if x == -100), "variants": {}}

    def record(name, batches, loss_module, checkpointing):
        net = loss_module.net
        if checkpointing:
            enable_gradient_checkpointing(net)
        else:
            net.gradient_checkpointing_disable()
        peft.train()
        batches = [b.to(dev, torch.bfloat16) for b in batches]
        try:
            seconds, peak = _time_training(loss_module, optimizer, batches, dev, warmup, steps)
        except torch.cuda.OutOfMemoryError:
            result["variants"][name] = {"error": "out of memory"}
            optimizer.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            return
        b = batches[0]
        captions = sum(x.num_captions for x in batches) / len(batches)
        tokens = sum(x.num_real_tokens for x in batches) / len(batches)
        flops = sum(_flops_per_step(net, x, x.pixel_values.shape[0] * 1025) for x in batches) / len(batches)
        rate = captions / seconds
        result["variants"][name] = {
            "captions_per_microbatch": captions, "tokens_per_microbatch": tokens, "seconds_per_microbatch": seconds,
            "caption_samples_per_s": rate, "tokens_per_s": tokens / seconds,
            "mfu": flops / seconds / (peak_tflops * 1e12), "peak_gb": peak,
            "coco_epoch_hours": 566_747 / rate / 3600, "rows": int(b.input_ids.shape[0]),
            "row_tokens": int(b.input_ids.shape[1]),
            "gradient_checkpointing": checkpointing,
        }
        print(name, json.dumps(result["variants"][name]), flush=True)

    # (a) the tutorial: 4 captions per micro-batch, each with its image, checkpointing, full logits, SDPA
    items = [{"encodings": [{"input_ids": s["input_ids"], "labels": s["labels"]}],
              "pixel_values": pixels[s["image_index"]]} for s in samples]
    separate = [collate_separate(items[i : i + batch_size], processor.pad_token_id)
                for i in range(0, 4 * batch_size, batch_size)]
    peft.base_model.model.model.language_model.set_attn_implementation("sdpa")
    record("a_tutorial", separate, CaptionLoss(peft, full_logits=True), checkpointing=True)
    if steps_between:
        record("a_tutorial_no_ckpt_supervised_logits", separate, CaptionLoss(peft), checkpointing=False)

    # (b) captune: whole images, five captions each, packed up to a token budget, FlexAttention
    groups = {}
    for s in samples:
        groups.setdefault(s["image_index"], []).append(s)
    group_items = [{"pixel_values": pixels[i], "encodings": g} for i, g in groups.items()]
    if dev.type == "cuda":
        peft.base_model.model.model.language_model.set_attn_implementation("flex_attention")

    def packs(budget: int) -> list:
        per_batch = max(1, budget // 1900)
        return [collate_shared(group_items[i : i + per_batch], processor.pad_token_id, budget, pad_to_budget=True)
                for i in range(0, len(group_items) - per_batch + 1, per_batch)]

    lora_layers = [m for m in peft.modules() if hasattr(m, "cast_input_dtype_enabled")]
    for m in lora_layers:  # PEFT's default, for the record: every LoRA input copied to float32
        m.cast_input_dtype_enabled = True
    first = budgets[0]
    if steps_between:
        record("b_eager_peft_input_cast", packs(first), CaptionLoss(peft), checkpointing=False)
    for m in lora_layers:
        m.cast_input_dtype_enabled = False
    if steps_between:
        record("b_eager", packs(first), CaptionLoss(peft), checkpointing=False)
        record("b_eager_ckpt", packs(first), CaptionLoss(peft), checkpointing=True)
    if compile_layers and dev.type == "cuda":
        from captune.train.loss import compile_model

        compile_model(peft.base_model.model)
        t0 = time.perf_counter()
        record("b_default", packs(first), CaptionLoss(peft), checkpointing=False)  # the recipe's configuration
        result["compile_and_measure_s"] = time.perf_counter() - t0
        if out:
            _profile(CaptionLoss(peft), optimizer, packs(first), dev, Path(out) / "bench_train_profile.txt")
        for budget in budgets[1:]:
            record(f"b_{budget}_compiled", packs(budget), CaptionLoss(peft), checkpointing=False)
    base = result["variants"].get("a_tutorial", {}).get("caption_samples_per_s")
    for v in result["variants"].values():
        if base and "caption_samples_per_s" in v:
            v["speedup_vs_a"] = v["caption_samples_per_s"] / base
    report(result, out, "bench_train.json")
    return result
