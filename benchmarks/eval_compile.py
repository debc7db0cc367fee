"""What compiling the prompt's repeated blocks costs and saves in captune's decoder, on a GPU, side by side in one run.

    PYTHONPATH=src python benchmarks/eval_compile.py --tokenizer .bench/tokenizer --out $OUT

A random InternVL2-2B (bf16, SDPA), batches of synthetic 640x480 JPEGs (7 tiles) already on the GPU: seconds of
the first call (compilation, CUDA-graph capture) and of later calls (fastest of 3) with the prompt eager and its
repeated blocks compiled (`eval.compiled.compiled_regions`), then a batch of another size and tile count (one
recompilation with symbolic dimensions), and whether the two give the same tokens.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from captune.demo.bench import (
    bench_processor,
    cuda_sync,
    internvl2_2b_config,
    random_model,
    report,
    synthetic_jpegs,
)
from captune.eval.generate import model_inputs
from captune.eval.greedy import GreedyDecoder


def _seconds(device, fn) -> float:
    cuda_sync(device)
    start = time.perf_counter()
    fn()
    cuda_sync(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", default=None)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=30)
    parser.add_argument("--out", default=None)
    parser.add_argument("--tiny", action="store_true", help="a tiny model in float32 on the CPU (a dry run)")
    parser.add_argument("--profile", action="store_true", help="a CUDA-time table of one batch per mode")
    args = parser.parse_args()
    dev = torch.device("cpu" if args.tiny else "cuda")
    processor = bench_processor(args.tokenizer)
    model = random_model(dev, torch.float32 if args.tiny else torch.bfloat16,
                         processor.tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
                         model_config=internvl2_2b_config(tiny=True) if args.tiny else None)
    result = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "batch": args.batch}
    with tempfile.TemporaryDirectory() as tmp:
        paths = synthetic_jpegs(Path(tmp), args.batch)
        wide = synthetic_jpegs(Path(tmp) / "wide", args.batch // 2, size=(900, 300), seed=1)
        inputs = model_inputs(model, processor(paths, max_tiles=6))
        other = model_inputs(model, processor(wide, max_tiles=6))
        tokens = {}
        for name, compile in (("eager", False), ("compiled", True)):
            decoder = GreedyDecoder(model, processor.stop_token_id, processor.pad_token_id, args.tokens, args.tokens,
                                    compile=compile)
            row = {"first_call_s": _seconds(dev, lambda: decoder(**inputs))}
            print(name, row, flush=True)
            row["batch_s"] = min(_seconds(dev, lambda: decoder(**inputs)) for _ in range(3))
            row["images_per_s"] = args.batch / row["batch_s"]
            print(name, row, flush=True)
            row["other_shape_first_call_s"] = _seconds(dev, lambda: decoder(**other))
            row["other_shape_s"] = min(_seconds(dev, lambda: decoder(**other)) for _ in range(2))
            row["still_compiled"] = bool(decoder.compiled)
            tokens[name] = (decoder(**inputs).to("cpu", copy=True), decoder(**other).to("cpu", copy=True))
            if args.profile and args.out and dev.type == "cuda":
                from torch.profiler import ProfilerActivity, profile

                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    decoder(**inputs)
                    cuda_sync(dev)
                table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=90)
                (Path(args.out) / f"profile_{name}.txt").write_text(table + "\n")
            decoder.close()
            result[name] = row
            print(name, row, flush=True)
        result["same_tokens_share"] = [float((a == b).all(-1).float().mean())
                                       for a, b in zip(tokens["eager"], tokens["compiled"])]
    report(result, args.out, "eval_compile.json")


if __name__ == "__main__":
    main()
