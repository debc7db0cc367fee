"""`captune bench eval`: captioning speed on a GPU, end to end (JPEG decoding included), three ways in one run.

    captune bench eval --tokenizer TOKENIZER_DIR --out runs/bench

(a) one image at a time, as InternVL's `evaluate_caption.py`; (b) captune (`eval/greedy.py`: static cache, CUDA-graphed
decode step; the prompt's repeated blocks compiled if `captune eval` would compile them for the 5,000 COCO test images,
the compilation timed in the warm-up and counted in the 5,000 images' minutes); (c) plain transformers `generate` on
the same batches from the same loader: the loop a user would otherwise write. Also: how often (b)'s captions equal
(c)'s and batch 1's (bf16 on a GPU changes sums with the batch shape), and where (b)'s time goes (vision tower,
prompt, decoding, the rest). The model is a random InternVL2-2B
(`demo.bench.random_model`); with `--tokens 30` every row generates exactly 30 tokens, so the work is fixed.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch

from captune.demo.bench import (
    bench_processor,
    cuda_sync,
    peak_gb,
    random_model,
    report,
    reset_peak,
    synthetic_jpegs,
)


def caption_run(model, processor, paths: list[Path], batch_size: int, workers: int, tokens: int,
                 engine: str, compile: bool = False) -> tuple[float, dict[int, str]]:
    """Wall seconds to caption `paths` end to end (images decoded and tiled in workers), and the captions."""
    from captune.data.evalsets import EvalImage
    from captune.eval.evaluate import (
        CaptionLog,
        EvalSettings,
        generate_captions,
        read_jsonl,
    )

    images = [EvalImage(i, p) for i, p in enumerate(paths)]
    settings = EvalSettings(model="random", test_json="-", max_tiles=6, max_new_tokens=tokens, min_new_tokens=tokens)
    with tempfile.TemporaryDirectory() as tmp:
        log = CaptionLog(Path(tmp), 0, False)
        cuda_sync(model.device)
        start = time.perf_counter()
        generate_captions(model, processor, images, log, settings, batch_size, workers, progress=False, engine=engine,
                          compile=compile)
        cuda_sync(model.device)
        elapsed = time.perf_counter() - start
        log.close()
        captions = {row["image_id"]: row["caption"] for row in read_jsonl(log.captions_path)}
    return elapsed, captions


def _same(a: dict[int, str], b: dict[int, str]) -> dict:
    shared = sorted(a.keys() & b.keys())
    same = sum(a[i] == b[i] for i in shared)
    return {"images": len(shared), "identical": same, "share": same / max(len(shared), 1)}


def _timed(device: torch.device, fn, repeats: int = 3) -> float:
    """Seconds of the fastest of `repeats` calls of `fn` (after one warm-up), synchronised."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        cuda_sync(device)
        start = time.perf_counter()
        fn()
        cuda_sync(device)
        best = min(best, time.perf_counter() - start)
    return best


@torch.inference_mode()
def time_breakdown(model, processor, paths: list[Path], tokens: int, compile: bool = False) -> dict:
    """Seconds per batch of `len(paths)` images in each part of captune's path, the batch already on the GPU:
    the vision tower (with projector), the whole prompt (vision tower + LLM, first new token), and prompt +
    decoding (`eval/greedy.py`); decoding = the difference."""
    from captune.eval.generate import Captioner, GenerationSettings, model_inputs

    batch = processor(paths, max_tiles=6)
    inputs = model_inputs(model, batch)
    dev = model.device
    settings = GenerationSettings(max_new_tokens=tokens, min_new_tokens=tokens)
    with Captioner(model, processor, settings, compile=compile) as captioner:
        decoder = captioner.decoder

        def vision_tower():
            with decoder.compiled_forwards():
                model.model.get_image_features(pixel_values=inputs["pixel_values"])

        vision = _timed(dev, vision_tower)
        prompt = _timed(dev, lambda: decoder.start(**inputs))
        whole = _timed(dev, lambda: decoder(**inputs))
    n = len(paths)
    return {"batch": n, "vision_tower_s": vision, "llm_prompt_s": prompt - vision, "decode_s": whole - prompt,
            "gpu_total_s": whole, "gpu_images_per_s": n / whole}


def profile_batch(model, processor, paths: list[Path], tokens: int, path: Path, compile: bool = False) -> None:
    """A torch.profiler table (CUDA time by operator) of captioning one batch with captune's path."""
    from torch.profiler import ProfilerActivity, profile

    from captune.eval.generate import Captioner, GenerationSettings, model_inputs

    inputs = model_inputs(model, processor(paths, max_tiles=6))
    settings = GenerationSettings(max_new_tokens=tokens, min_new_tokens=tokens)
    with Captioner(model, processor, settings, compile=compile) as captioner, torch.inference_mode():
        captioner.decoder(**inputs)  # capture outside the profile
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            captioner.decoder(**inputs)
            cuda_sync(model.device)
    path.write_text(prof.key_averages().table(sort_by="cuda_time_total", row_limit=40) + "\n")


def bench_eval(tokenizer: str | None = None, images: int = 640, baseline_images: int = 24,
               batch_sizes: tuple[int, ...] = (64,), workers: int = 12, tokens: int = 30, device: str = "cuda",
               out: str | None = None, model_config: dict | None = None, agreement_images: int = 128,
               profile: bool = False) -> dict:
    """Rows (a), (b) and (c) for each batch size, the captions' agreement, and the time breakdown of (b)."""
    from captune.devices import resolve_device
    from captune.eval.generate import compile_choice

    dev = resolve_device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    processor = bench_processor(tokenizer)
    model = random_model(dev, dtype, processor.tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
                         model_config=model_config)
    result = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "new_tokens": tokens,
              "images": images, "workers": workers}
    with tempfile.TemporaryDirectory() as tmp:
        paths = synthetic_jpegs(Path(tmp) / "val2014", max(images, baseline_images, agreement_images))
        result["tiles_per_image"] = processor.tile(paths[0], 6).shape[0]
        caption_run(model, processor, paths[:2], 1, 1, tokens, "generate")  # warm-up
        reset_peak(dev)
        # InternVL's evaluate_caption.py: batch size 1, one DataLoader worker, transformers' generate
        a, _ = caption_run(model, processor, paths[:baseline_images], 1, 1, tokens, "generate")
        result["a_one_at_a_time"] = {"images": baseline_images, "seconds": a, "images_per_s": baseline_images / a,
                                     "peak_gb": peak_gb(dev)}
        print(f"captune bench eval: (a) {baseline_images / a:.2f} images/s", file=sys.stderr, flush=True)
        static = {}
        compile = compile_choice("auto", 5000, dev)  # as `captune eval` on COCO's test split
        result["b_compiled"] = compile
        for size in batch_sizes:
            captions = {}
            for name, engine in (("b_captune", "static"), ("c_generate", "generate")):
                key = f"{name}_batch{size}"
                # warm-up at full size (captune: the prompt's blocks compiled, the decode step captured)
                warm, _ = caption_run(model, processor, paths[:size], size, workers, tokens, engine, compile)
                reset_peak(dev)
                try:
                    seconds, captions[engine] = caption_run(model, processor, paths[:images], size, workers, tokens,
                                                             engine, compile)
                except torch.cuda.OutOfMemoryError:
                    result[key] = {"error": "out of memory"}
                    torch.cuda.empty_cache()
                    continue
                rate = images / seconds
                once = max(warm - size / rate, 0.0)  # what the first batch took beyond a batch of the timed run
                result[key] = {"seconds": seconds, "images_per_s": rate, "peak_gb": peak_gb(dev), "warm_up_s": warm,
                               "speedup_vs_a": rate / result["a_one_at_a_time"]["images_per_s"],
                               "coco_test_5000_minutes": (5000 / rate + once) / 60}
                print(f"captune bench eval: {key}: {rate:.2f} images/s, peak {result[key]['peak_gb']:.1f} GB, "
                      f"warm-up {warm:.0f} s", file=sys.stderr, flush=True)
            b, c = result.get(f"b_captune_batch{size}", {}), result.get(f"c_generate_batch{size}", {})
            if "images_per_s" in b and "images_per_s" in c:
                b["speedup_vs_c"] = b["images_per_s"] / c["images_per_s"]
            static[size] = captions.get("static", {})
            if len(captions) == 2:
                result[f"agreement_batch{size}"] = {
                    "captune_vs_generate": _same(captions["static"], captions["generate"])}
        if agreement_images:  # after the timed rows, so that the first (b) warm-up includes the first compilation
            _, one = caption_run(model, processor, paths[:agreement_images], 1, workers, tokens, "static", compile)
            for size, captions in static.items():
                result.setdefault(f"agreement_batch{size}", {})["captune_vs_batch1"] = _same(captions, one)
        size = batch_sizes[0]
        result[f"breakdown_batch{size}"] = time_breakdown(model, processor, paths[:size], tokens, compile)
        if profile and out:
            Path(out).mkdir(parents=True, exist_ok=True)
            profile_batch(model, processor, paths[:size], tokens, Path(out) / "profile_eval.txt", compile)
    report(result, out, "bench_eval.json")
    return result
