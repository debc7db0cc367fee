"""InternVL2 release by release on one GPU: captioning and a LoRA training step, each next to `captune plan`'s figure.

    PYTHONPATH=src python benchmarks/sizes.py --sizes 8b,26b,40b,76b-depth --out $OUT

Each size is its release's exact architecture (tests/internvl/releases/, through `native_config` as
`captune.demo.bench.random_model` builds it) with RANDOM bf16 weights made directly on the GPU: no checkpoint is read
or written (speed and memory do not depend on the weights). Measured, beside the plan's prediction and the ratio:

  eval       captune's decoding (`eval/greedy.py`), greedy, batch 16 of 7-tile images (1,828-token prompts with the compact tokenizer),
             exactly 30 new tokens (min = max): seconds per batch, peak memory
  train      one LoRA step with the size's recipe (rank, alpha, dropout; float32 LoRA weights; AdamW) on one
             shared-prefix row of 4 images x 7 tiles with 5 captions each (7,778 tokens), gradient checkpointing,
             FlexAttention, wrapped by FSDP2 as `captune train --fsdp` wraps it (`train.parallel.shard_fsdp2`) in a
             process group of one: seconds per step, peak memory
  76b-depth  InternVL2-Llama3-76B, every width real, only --depths of its 80 LLM layers (default 10 and 20) so that it
             fits one GPU: measured at both depths, extrapolated linearly per layer to 80 (marked so in the output)

One warm-up (it absorbs FlexAttention's compilation) and two timed repetitions each; peaks are
`torch.cuda.max_memory_allocated` over the timed ones, in GB of 2^30 bytes as the plan's. An error (out of memory
above all) is that size's result and the next goes on; memory is freed between sizes; OUT/sizes.json is rewritten
after every size. About 5 minutes on an H200 for the four sizes above. `--tiny`: the same code, tiny widths, on the CPU
(tests/demo/test_sizes_bench.py). The compact tokenizer is the default because its ids fit every vocabulary
(InternLM2's, --tokenizer .bench/tokenizer, has ids past the 40B's 64,000: that size is then refused).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import sys
import time
from pathlib import Path

import torch
import torch._dynamo
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
RELEASES = ROOT / "tests" / "internvl" / "releases"
FOLDERS = {"1b": "InternVL2-1B", "2b": "InternVL2-2B", "4b": "InternVL2-4B", "8b": "InternVL2-8B",
           "26b": "InternVL2-26B", "40b": "InternVL2-40B", "76b": "InternVL2-Llama3-76B"}
DEPTH = "76b-depth"
GB = 2**30
FIGURES = (("eval", "seconds_per_batch", " s"), ("eval", "peak_gb", " GB"), ("train", "seconds_per_step", " s"),
           ("train", "peak_gb", " GB"))  # what is measured and compared with the plan


def release_config(size: str, tiny: bool, layers: int | None = None, vocab: int = 1024) -> dict:
    """The release's original config.json; `layers` LLM layers instead of its own; `tiny`: the same families with
    tiny widths (LLM 64 wide, 4 heads over 2 KV heads, `vocab` tokens; InternViT 32 wide, one layer)."""
    config = json.loads((RELEASES / FOLDERS[size] / "config.json").read_text())
    llm, vit = config["llm_config"], config["vision_config"]
    if tiny:
        llm.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=vocab)
        llm.pop("head_dim", None)
        scaling = llm.get("rope_scaling")
        for key in ("short_factor", "long_factor"):  # Phi-3's LongRoPE: one factor per rotary pair
            if isinstance(scaling, dict) and key in scaling:
                scaling[key] = scaling[key][: 64 // 4 // 2]
        llm.update(bos_token_id=1, eos_token_id=2, pad_token_id=2)  # within the tiny vocabulary
        vit.update(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    if layers is not None:
        llm["num_hidden_layers"] = layers
    return config


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    """Parameters made in `dtype` from the start: the 40B in float32 would not fit the GPU even for a moment."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def timed(fn, device: torch.device, warmup: int, repeats: int) -> tuple[float, float | None]:
    """Mean seconds of `repeats` calls after `warmup`, and the peak GB over the timed calls (None on the CPU)."""
    for _ in range(warmup):
        fn()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    seconds = (time.perf_counter() - start) / repeats
    return seconds, (torch.cuda.max_memory_allocated(device) / GB if device.type == "cuda" else None)


def guarded(fn, *args) -> dict:
    """`fn`'s result, or the error as a result (out of memory is one); the exception and its frames are dropped."""
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 -- every failure of one size is that size's result
        oom = isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e)
        return {"error": "out of memory" if oom else f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}


def check_ids(ids: list[int], config: dict) -> None:
    if max(ids) >= (vocab := config["llm_config"]["vocab_size"]):
        raise ValueError(f"token id {max(ids)} is past the {vocab}-token vocabulary: use the compact tokenizer")


def measure_eval(model, processor, config: dict, device, dtype, args) -> dict:
    """captune's greedy decoding (`eval/greedy.py`, as `captune eval` runs it) of exactly `new_tokens` for a batch of
    identical 7-tile prompts (random pixels)."""
    from captune.eval.greedy import GreedyDecoder
    from captune.inputs.processor import DEFAULT_QUESTION

    ids = processor.prompt_ids(DEFAULT_QUESTION, args.tiles)
    check_ids(ids, config)
    input_ids = torch.tensor([ids] * args.batch, device=device)
    mask = torch.ones_like(input_ids)
    size = processor.tile_size
    pixels = torch.randn(args.batch * args.tiles, 3, size, size, device=device, dtype=dtype)
    n = args.new_tokens
    model.eval()
    decoder = GreedyDecoder(model, processor.stop_token_id, processor.pad_token_id, n, n)

    def run() -> None:
        out = decoder(input_ids=input_ids, attention_mask=mask, pixel_values=pixels)
        assert out.shape == (args.batch, n), out.shape

    free(device)
    try:
        seconds, peak = timed(run, device, args.warmup, args.repeats)
    finally:
        decoder.close()
    return {"batch": args.batch, "tiles": args.tiles, "prompt_tokens": len(ids), "new_tokens": n,
            "seconds_per_batch": seconds, "images_per_s": args.batch / seconds, "peak_gb": peak}


def training_row(processor, args):
    """One shared-prefix row (`captune train`'s layout): `train_images` images of `tiles` tiles, `captions` each."""
    from captune.demo.bench import training_samples
    from captune.train.collate import collate_shared

    groups: dict[int, list[dict]] = {}
    for s in training_samples(processor, args.train_images, args.tiles):
        groups.setdefault(s["image_index"], []).append(s)
    generator = torch.Generator().manual_seed(0)
    size = processor.tile_size
    items = [{"pixel_values": torch.randn(args.tiles, 3, size, size, generator=generator),
              "encodings": g[: args.captions]} for g in groups.values()]
    return collate_shared(items, processor.pad_token_id, token_budget=10**9)


def measure_train(model, row, recipe, config: dict, device, dtype, args) -> dict:
    """One LoRA step under FSDP2 in a world of one, set up as `captune train` sets it up (loop._train)."""
    from contextlib import nullcontext

    from captune.internvl.lora import add_lora
    from captune.train.loss import CaptionLoss, enable_gradient_checkpointing
    from captune.train.parallel import shard_fsdp2, trainable_to_float32

    check_ids(row.input_ids.flatten().tolist(), config)
    peft = add_lora(model, recipe.lora_rank, recipe.lora_alpha, recipe.lora_dropout)
    trainable_to_float32(peft)
    trainable = sum(p.numel() for p in peft.parameters() if p.requires_grad)
    enable_gradient_checkpointing(peft.base_model.model)
    peft.train()
    attention = args.attention or ("flex" if device.type == "cuda" else "sdpa")
    if attention == "flex":
        peft.base_model.model.model.language_model.set_attn_implementation("flex_attention")
    loss_module = shard_fsdp2(CaptionLoss(peft), dtype)
    optimizer = torch.optim.AdamW([p for p in loss_module.parameters() if p.requires_grad], lr=1e-5)
    batch = row.to(device, dtype)
    autocast = torch.autocast(device_type=device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()

    losses = []

    def step() -> None:  # as loop._train: the summed loss over the supervised tokens, AdamW, gradients dropped
        with autocast:
            loss = loss_module(batch.input_ids, batch.targets, batch.attention_mask, batch.position_ids,
                               batch.pixel_values, batch.num_tokens) / batch.num_tokens
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())  # read after the timing: no host sync inside it

    free(device)
    seconds, peak = timed(step, device, args.warmup, args.repeats)
    tokens = batch.num_real_tokens
    return {"lora_rank": recipe.lora_rank, "trainable": trainable, "images": args.train_images,
            "captions": batch.num_captions, "tokens": tokens, "attention": attention, "gradient_checkpointing": True,
            "wrapping": f"FSDP2 ({type(loss_module).__name__}), process group of {dist.get_world_size()}",
            "loss": float(losses[-1]), "seconds_per_step": seconds, "tokens_per_s": tokens / seconds,
            "peak_gb": peak}


def predicted(config: dict, recipe, args, tokens: int) -> dict:
    """`captune plan`'s figures for what is measured: eval at this batch on one GPU; the checkpointed LoRA step on
    `tokens` tokens under FSDP2 over one GPU, and its time on one GPU."""
    from captune.internvl import plan as P

    s = P.model_shape(config)
    per_image = P.eval_seconds_per_image(s, args.batch)
    group = tokens / args.train_images
    return {"parameters": P.parameter_counts(s)["total"], "llm_layers": s.layers,
            "eval": {"seconds_per_batch": per_image * args.batch,
                     "seconds_per_batch_without_data_path": (per_image - P.EVAL_HOST_S) * args.batch,
                     "peak_gb": P.eval_memory(s, args.batch)["total"]},
            "train": {"seconds_per_step": tokens / P.train_tokens_per_s(s, True, False, args.train_images, group,
                                                                        args.tiles),
                      "peak_gb": P.train_memory(s, recipe.lora_rank, tokens, True, "FSDP2", 1, compiled=False,
                                                tiles=args.tiles)["total"]}}


def add_ratios(result: dict) -> None:
    """measured / predicted for each figure that was measured."""
    for phase, key, _ in FIGURES:
        measured, plan = result.get(phase, {}).get(key), result["plan"][phase][key]
        if isinstance(measured, float) and plan:
            result[phase][f"{key}_vs_plan"] = measured / plan


def measure_size(size: str, args, processor, row, device, dtype, layers: int | None = None) -> dict:
    """Build one size on the device, caption with it, then train it; everything freed on return."""
    from captune.demo.bench import random_model
    from captune.train.config import recipe_values

    base = "76b" if size == DEPTH else size
    config = release_config(base, args.tiny, layers, vocab=max(1024, len(processor.tokenizer)))
    recipe = recipe_values(f"internvl2_{base}_coco_lora")
    free(device)
    start = time.perf_counter()
    with default_dtype(dtype):  # random_model's own cast to dtype comes after the whole model is made
        model = random_model(device, dtype, processor.tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"), "sdpa",
                             model_config=config)
    sync(device)
    result = {"release": FOLDERS[base], "build_s": time.perf_counter() - start,
              "plan": predicted(config, recipe, args, row.num_real_tokens)}
    result["eval"] = guarded(measure_eval, model, processor, config, device, dtype, args)
    free(device)
    result["train"] = guarded(measure_train, model, row, recipe, config, device, dtype, args)
    del model
    free(device)
    add_ratios(result)
    if device.type == "cuda":
        result["left_allocated_gb"] = torch.cuda.memory_allocated(device) / GB
    return result


def extrapolate(runs: dict[int, dict], layers: int) -> dict:
    """Each figure measured at the two largest depths, continued linearly per layer to `layers` layers."""
    (d1, r1), (d2, r2) = sorted(runs.items())[-2:]
    out: dict = {}
    for phase, key, _ in FIGURES:
        v1, v2 = r1.get(phase, {}).get(key), r2.get(phase, {}).get(key)
        if isinstance(v1, float) and isinstance(v2, float):
            per_layer = (v2 - v1) / (d2 - d1)
            out.setdefault(phase, {})[key] = v2 + (layers - d2) * per_layer
            out[phase][f"{key}_per_layer"] = per_layer
    return out


def measure_depth(args, processor, row, device, dtype) -> dict:
    """76B at a few depths, every width real, and the 80-layer figures extrapolated from them."""
    from captune.train.config import recipe_values

    depths = sorted(args.depths)
    layers = release_config("76b", tiny=False)["llm_config"]["num_hidden_layers"]  # 80, also for --tiny
    full = release_config("76b", args.tiny, layers, vocab=max(1024, len(processor.tokenizer)))
    runs = {}
    for d in depths:
        runs[d] = guarded(measure_size, DEPTH, args, processor, row, device, dtype, d)
        print(summary(f"  {d} layers", runs[d]), flush=True)
    result = {"release": FOLDERS["76b"], "depths": {str(d): r for d, r in runs.items()},
              "note": (f"EXTRAPOLATED, not measured: {FOLDERS['76b']} with every width real and {depths} of its "
                       f"{layers} LLM layers was measured on one GPU; the {layers}-layer figures continue the two "
                       f"largest depths linearly per layer"),
              "plan": predicted(full, recipe_values("internvl2_76b_coco_lora"), args, row.num_real_tokens)}
    measured = {d: r for d, r in runs.items() if "error" not in r}
    if len(measured) >= 2:
        result.update(extrapolate(measured, layers))
    add_ratios(result)
    return result


def environment(device: torch.device) -> dict:
    import peft
    import transformers

    env = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
           "device": "cpu", "utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}
    if device.type == "cuda":
        env.update(device=torch.cuda.get_device_name(device),
                   gpu_memory_gb=torch.cuda.get_device_properties(device).total_memory / GB)
    return env


def summary(name: str, r: dict) -> str:
    """One line per size: measured (plan, ratio) for each figure."""
    if "error" in r:
        return f"{name:<10} {r['error']}"

    def cell(phase: str, key: str, unit: str) -> str:
        got = r.get(phase, {})
        if "error" in got:
            return f"{phase} {got['error']}"
        if not isinstance(got.get(key), float):
            return f"{phase} {key} -"
        return f"{phase} {got[key]:.2f}{unit} (plan {r['plan'][phase][key]:.2f}, x{got.get(key + '_vs_plan', 0):.2f})"

    return f"{name:<10} " + " | ".join(cell(*figure) for figure in FIGURES)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="8b,26b,40b,76b-depth", help=f"comma-separated: {', '.join(FOLDERS)}, {DEPTH}")
    p.add_argument("--out", help="folder for sizes.json (or a .json file); default: only printed")
    p.add_argument("--tiny", action="store_true", help="tiny widths (the CPU test)")
    p.add_argument("--device", help="default: cuda when there is one, else cpu")
    p.add_argument("--tokenizer", help="a tokenizer folder (default: the compact stand-in, whose ids fit every size)")
    p.add_argument("--batch", type=int, default=16, help="images per captioning batch")
    p.add_argument("--tiles", type=int, default=7, help="tiles per image (the plan's 7: 6 + thumbnail)")
    p.add_argument("--new-tokens", type=int, default=30)
    p.add_argument("--train-images", type=int, default=4, help="images in the training row")
    p.add_argument("--captions", type=int, default=5, help="captions per image in the training row (at most 5)")
    p.add_argument("--depths", default="10,20", help=f"{DEPTH}: LLM layers measured (two or more)")
    p.add_argument("--attention", choices=("flex", "sdpa"), help="training attention (default: flex on GPUs)")
    p.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default="auto", help="auto: bf16 on GPUs, else fp32")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args(argv)
    args.sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    unknown = [s for s in args.sizes if s not in FOLDERS and s != DEPTH]
    args.depths = [int(d) for d in args.depths.split(",")]
    if unknown or len(set(args.depths)) < 2 or min(args.depths) < 1 or not 1 <= args.captions <= 5:
        p.error(f"unknown sizes {unknown}" if unknown else "--depths: two different depths >= 1; --captions: 1 to 5")
    return args


def write(result: dict, out: str) -> None:
    path = Path(out) if out.endswith(".json") else Path(out) / "sizes.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")


def main(argv: list[str] | None = None) -> dict:
    from captune.demo.bench import bench_processor
    from captune.devices import resolve_dtype

    args = parse(argv)
    started = time.perf_counter()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        device = torch.device("cuda", device.index or 0)
        torch.cuda.set_device(device)
    dtype = resolve_dtype(args.dtype, device)  # auto: bf16 on a GPU, float32 on the CPU, as captune's
    for name in {"recompile_limit", "cache_size_limit"} & set(dir(torch._dynamo.config)):  # FlexAttention
        setattr(torch._dynamo.config, name, 64)  # recompiles for each head layout
    # FSDP2 needs a process group: one process, its store in memory (no port, no torchrun)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                            world_size=1)
    processor = bench_processor(args.tokenizer)
    row = training_row(processor, args)
    result = {**environment(device), "tiny": args.tiny, "dtype": str(dtype).removeprefix("torch."),
              "settings": {k: v for k, v in vars(args).items() if k not in ("out",)},
              "training_row_tokens": row.num_real_tokens, "sizes": {}}
    try:
        for size in args.sizes:
            t0 = time.perf_counter()
            print(f"[{time.perf_counter() - started:6.0f} s] {size} ...", flush=True)
            r = (guarded(measure_depth, args, processor, row, device, dtype) if size == DEPTH else
                 guarded(measure_size, size, args, processor, row, device, dtype))
            r["wall_s"] = time.perf_counter() - t0
            result["sizes"][size] = r
            free(device)
            print(summary(size, r), flush=True)
            result["total_s"] = time.perf_counter() - started
            if args.out:
                write(result, args.out)
    finally:
        dist.destroy_process_group()
    print(json.dumps(result, indent=2), flush=True)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
