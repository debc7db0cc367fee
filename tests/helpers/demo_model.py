"""The shipped demo base model with images of six aspect ratios: a small trained model with grouped-query attention
(4 query heads, 2 key/value heads) and the tracked files only (the fixtures do not travel to the GPU machine)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

import captune


def demo_model_and_images(device: str):
    """(model in float32 on `device`, processor, six noise images whose tile counts differ: left-padded rows)."""
    model, processor = captune.load(Path(captune.__file__).parent / "demo" / "assets" / "demo_base", dtype="fp32",
                                    device=device)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
              for w, h in ((640, 480), (480, 640), (300, 300), (640, 200), (200, 640), (500, 375))]
    return model, processor, images
