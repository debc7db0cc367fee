"""python scripts/train_demo_base.py [--out src/captune/assets/demo_base] [--epochs 30]

Rebuilds the demo's base model: a tiny InternVL2 (InternViT + projector + InternLM2, internlm2-chat template,
compact tokenizer) trained by captune's own code to describe the synthetic scenes in its own style ("The image
shows: circle, red. ...") -- the way InternVL2-2B describes COCO images before fine-tuning -- then merged and
written in the original InternVL2 release layout, so the demo also exercises the conversion path.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from captune.data.synthetic import make_synthetic_dataset, write_style_jsonl
from captune.demo.tinymodel import (
    TinySpec,
    build_compact_tokenizer,
    tokenizer_corpus,
    write_tiny_model,
)
from captune.inputs.processor import DEFAULT_QUESTION
from captune.merge.merge import merge
from captune.train import config as cfg
from captune.train.loop import train

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "src" / "captune" / "assets" / "demo_base"))
    parser.add_argument("--images", type=int, default=800)
    parser.add_argument("--epochs", type=float, default=30)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        style = write_style_jsonl(tmp / "style" / "train.jsonl", tmp / "style" / "images", args.images, seed=1)
        # the tokenizer must also cover the reference wording the demo fine-tunes towards
        refs = make_synthetic_dataset(tmp / "refs", train=300, test=1, seed=2)
        captions = [json.loads(line)["conversations"][1]["value"] for path in (style, refs["train"])
                    for line in Path(path).read_text().splitlines()]
        tokenizer = build_compact_tokenizer(tokenizer_corpus(captions, [DEFAULT_QUESTION]))
        init = write_tiny_model(tmp / "init", tokenizer, TinySpec(), seed=0)
        run = train(cfg.resolve("tiny_cpu_lora", {
            "model": str(init), "data": str(style), "out": str(tmp / "run"), "epochs": args.epochs,
            "lora_rank": 64, "lora_alpha": 64, "lora_vision": True, "train_projector": True,
            "learning_rate": 2e-3, "global_batch_size": 32, "per_device_batch_size": 32, "share_prefix": "off",
            "save_every": 100000, "log_every": 50,
        }))
        out = Path(args.out)
        shutil.rmtree(out, ignore_errors=True)
        merge(run, out, format="internvl", dtype="fp32", force=True)
    print(f"demo base model written to {out}")


if __name__ == "__main__":
    main()
