"""Where `captune eval`'s end-to-end time goes beyond the GPU's work: a torch.profiler timeline of the whole loop,
DataLoader workers running, read back as the GPU's idle time by what the main thread was doing meanwhile.

    PYTHONPATH=src python benchmarks/eval_timeline.py --tokenizer .bench/tokenizer --out $OUT

A random InternVL2-2B (bf16, SDPA) captions synthetic 640x480 JPEGs (7 tiles) with `eval.captions.generate_captions`
(what `captune eval` and `bench eval`'s row (b) run, compiled as for 5,000 images): first timed without the
profiler, then under it. The labels
are `Captioner.overlapped`'s (`captune.next_batch`: waiting for the loader, `captune.start`, `captune.finish`,
`captune.give_out`); "caller" is the time outside them (writing captions.jsonl, the progress bar). The GPU is busy
where any kernel, copy or memset runs.
"""

from __future__ import annotations

import argparse
import gzip
import json
import tempfile
from collections import defaultdict
from pathlib import Path

import torch

from captune.demo.bench import (
    bench_processor,
    random_model,
    report,
    synthetic_jpegs,
)

GPU_CATEGORIES = {"kernel", "gpu_memcpy", "gpu_memset"}


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[list[float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(a, b) for a, b in merged]


def _gaps(busy: list[tuple[float, float]], start: float, end: float) -> list[tuple[float, float]]:
    """The idle intervals of [start, end] between the busy ones (all in microseconds)."""
    gaps, at = [], start
    for a, b in busy:
        if b <= start or a >= end:
            continue
        if a > at:
            gaps.append((at, a))
        at = max(at, b)
    if at < end:
        gaps.append((at, end))
    return gaps


def _overlap(a: tuple[float, float], b: tuple[float, float]) -> float:
    return max(0.0, min(a[1], b[1]) - max(a[0], b[0]))


def analyse(trace: dict, batches: int) -> dict:
    """The GPU's busy and idle time over the loop, the idle time by the main thread's label, the longest gaps."""
    events = [e for e in trace["traceEvents"] if e.get("ph") == "X"]
    gpu = _union([(e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") in GPU_CATEGORIES])
    labels = [e for e in events if e.get("cat") == "user_annotation" and e["name"].startswith("captune.")]
    main_tid = labels[0]["tid"]
    labels = [(e["name"], (e["ts"], e["ts"] + e["dur"])) for e in labels if e["tid"] == main_tid]
    start = min(span[0] for _, span in labels)
    end = max(span[1] for _, span in labels)
    idle = _gaps(gpu, start, end)
    ops = [e for e in events if e.get("tid") == main_tid and e.get("cat") in ("cpu_op", "cuda_runtime", "cuda_driver")]
    by_label: dict[str, float] = defaultdict(float)
    host_by_label: dict[str, float] = defaultdict(float)
    for name, span in labels:
        host_by_label[name] += span[1] - span[0]
    for gap in idle:
        inside = sum(_overlap(gap, span) for _, span in labels)
        for name, span in labels:
            by_label[name] += _overlap(gap, span)
        by_label["caller"] += (gap[1] - gap[0]) - inside
    longest = []
    for gap in sorted(idle, key=lambda g: g[0] - g[1])[:40]:
        label = next((name for name, span in labels if span[0] <= gap[0] < span[1]), "caller")
        running = [e["name"] for e in ops if e["ts"] <= gap[0] < e["ts"] + e["dur"]]
        overlapping = defaultdict(float)
        for e in ops:
            overlapping[e["name"]] += _overlap(gap, (e["ts"], e["ts"] + e["dur"]))
        top = sorted(overlapping.items(), key=lambda kv: -kv[1])[:4]
        longest.append({"ms": (gap[1] - gap[0]) / 1e3, "at_ms": (gap[0] - start) / 1e3, "label": label,
                        "main_thread_at_start": running[-3:],
                        "main_thread_during_ms": {k: round(v / 1e3, 2) for k, v in top}})
    wall = (end - start) / 1e6
    busy = sum(_overlap(span, (start, end)) for span in gpu) / 1e6
    return {"wall_s": wall, "gpu_busy_s": busy, "gpu_idle_s": wall - busy, "batches": batches,
            "gpu_idle_per_batch_s": (wall - busy) / batches,
            "gpu_idle_s_by_main_thread_label": {k: v / 1e6 for k, v in sorted(by_label.items())},
            "main_thread_s_by_label": {k: v / 1e6 for k, v in sorted(host_by_label.items())},
            "idle_gaps_over_1ms": sum(1 for a, b in idle if b - a > 1e3),
            "idle_s_in_gaps_under_1ms": sum(b - a for a, b in idle if b - a <= 1e3) / 1e6,
            "longest_idle_gaps": longest}


def main() -> None:
    from captune.demo.bench_eval import caption_run
    from captune.eval.generate import compile_choice

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", default=None)
    parser.add_argument("--images", type=int, default=1280, help="the timed run without the profiler")
    parser.add_argument("--profiled-images", type=int, default=640)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, default=12)
    parser.add_argument("--tokens", type=int, default=30)
    parser.add_argument("--compile", default="auto", help="auto (as `captune eval` on 5,000 images), on or off")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    dev = torch.device("cuda")
    processor = bench_processor(args.tokenizer)
    model = random_model(dev, torch.bfloat16, processor.tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"))
    compile = compile_choice(args.compile, 5000, dev)
    result = {"device": torch.cuda.get_device_name(dev), "batch": args.batch, "workers": args.workers,
              "compiled": compile}
    with tempfile.TemporaryDirectory() as tmp:
        paths = synthetic_jpegs(Path(tmp) / "val2014", max(args.images, args.profiled_images))

        def run(n: int, name: str) -> float:
            seconds, _ = caption_run(model, processor, paths[:n], args.batch, args.workers, args.tokens, "static",
                                     compile)
            print(f"{name}: {n / seconds:.2f} images/s ({seconds:.1f} s)", flush=True)
            return seconds

        run(args.batch, "warm-up")
        seconds = run(args.images, "timed")
        result["timed"] = {"images": args.images, "seconds": seconds, "images_per_s": args.images / seconds}
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            seconds = run(args.profiled_images, "profiled")
        result["profiled"] = {"images": args.profiled_images, "seconds": seconds}
        trace_path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace_path))
        trace = json.loads(trace_path.read_text())
        result["timeline"] = analyse(trace, -(-args.profiled_images // args.batch))
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            with gzip.open(Path(args.out) / "eval_timeline_trace.json.gz", "wt") as f:
                json.dump(trace, f)
    report(result, args.out, "eval_timeline.json")


if __name__ == "__main__":
    main()
