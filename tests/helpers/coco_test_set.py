"""The tutorial's data/coco layout for evaluation tests: val2014 images, the Karpathy test list and its ground truth."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image


def write_coco_test_set(root: Path, images: list[tuple[Image.Image | bytes, list[str]]]) -> Path:
    """`root` as data/coco: image i (from 1) saved as val2014/COCO_val2014_<i>.jpg (a PIL image, or a file's bytes
    as they are) with its reference captions; returns `root`."""
    (root / "val2014").mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(exist_ok=True)
    items, ids, anns = [], [], []
    for i, (image, refs) in enumerate(images, start=1):
        name = f"val2014/COCO_val2014_{i:012d}.jpg"
        if isinstance(image, bytes):
            (root / name).write_bytes(image)
        else:
            image.save(root / name)
        items.append({"image": name, "caption": refs})
        ids.append({"id": i})
        anns += [{"image_id": i, "caption": c, "id": 10 * i + k} for k, c in enumerate(refs)]
    (root / "annotations" / "coco_karpathy_test.json").write_text(json.dumps(items))
    (root / "annotations" / "coco_karpathy_test_gt.json").write_text(json.dumps({"images": ids, "annotations": anns}))
    return root
