"""How often batching changes a caption on a GPU in bf16, measured on a trained model (the demo's base captioner).

    PYTHONPATH=src python benchmarks/agreement.py --images 320 --out $OUT

Random weights (`captune bench eval`) give logits with near-ties everywhere, so there the share of captions that
batching leaves unchanged says little; the demo's base model is trained on its synthetic scenes, so its captions
have real margins. Captions its synthetic scenes as the demo does (one tile each, the demo model's training) with
captune's decoder at batch 64 (eager, and with the prompt's repeated blocks compiled) and at batch 1, and with
transformers' `generate` at batch 64, and counts the identical captions. float32 on the CPU gives identical captions, also for rows of different tile counts
(tests/eval/test_greedy.py).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

import captune
from captune.data.synthetic import random_scene, render_scene
from captune.demo.bench import report
from captune.eval.generate import caption_images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=320)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    model, processor = captune.load(Path(captune.__file__).parent / "demo" / "assets" / "demo_base",
                                    dtype=args.dtype, device=args.device)
    rng = np.random.default_rng(0)
    images = [render_scene(random_scene(rng)) for _ in range(args.images)]
    # one tile each, as the demo model was trained
    static = caption_images(model, processor, images, max_tiles=1, batch_size=args.batch)
    one = caption_images(model, processor, images, max_tiles=1, batch_size=1)
    plain = caption_images(model, processor, images, max_tiles=1, batch_size=args.batch, engine="generate")
    compiled = caption_images(model, processor, images, max_tiles=1, batch_size=args.batch, compile=True)
    n = len(images)
    result = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "dtype": args.dtype,
              "images": n, "batch": args.batch,
              "captune_batch_vs_batch1": sum(a == b for a, b in zip(static, one)) / n,
              "captune_vs_generate_same_batches": sum(a == b for a, b in zip(static, plain)) / n,
              "captune_compiled_batch_vs_batch1": sum(a == b for a, b in zip(compiled, one)) / n,
              "distinct_captions": len(set(static)), "examples": static[:3]}
    report(result, args.out, "agreement.json")


if __name__ == "__main__":
    main()
