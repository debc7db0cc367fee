"""A tiny training set that a tiny model can learn: eight drawn shapes with four identical captions each, and a tiny
InternVL2 (compact tokenizer) to train on it. Shared by the training and kill tests."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, ImageDraw

import captune
from captune.demo.tinymodel import (
    build_compact_tokenizer,
    tokenizer_corpus,
    write_tiny_model,
)

COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 170, 30), "yellow": (230, 210, 20)}


def caption_of(colour: str, shape: str) -> str:
    return f"a {colour} {shape} on a white background"


def write_tiny_captions(root: Path) -> tuple[Path, Path, list[dict]]:
    """root/images/*.jpg, root/train.jsonl and a tiny model in root/base; returns (root, model folder, rows)."""
    (root / "images").mkdir(parents=True)
    rows = []
    for i, (colour, shape) in enumerate((c, s) for c in COLOURS for s in ("circle", "square")):
        im = Image.new("RGB", (160, 160), (245, 245, 245))
        draw = ImageDraw.Draw(im)
        (draw.ellipse if shape == "circle" else draw.rectangle)([30, 30, 130, 130], fill=COLOURS[colour])
        im.save(root / "images" / f"{i}.jpg", quality=95)
        rows += [{"image": f"images/{i}.jpg", "caption": caption_of(colour, shape)}] * 4
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tokenizer = build_compact_tokenizer(tokenizer_corpus([r["caption"] for r in rows], [captune.DEFAULT_QUESTION]))
    return root, write_tiny_model(root / "base", tokenizer), rows
