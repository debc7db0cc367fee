"""Caption test sets as InternVL's caption evaluation reads them: COCO Karpathy, Flickr30k, NoCaps."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from captune.data.layout import ANNOTATIONS, TUTORIAL_TEST, TUTORIAL_TEST_GT
from captune.errors import CaptuneError
from captune.fileio import read_json

COCO_TEST = f"{ANNOTATIONS}/{TUTORIAL_TEST}"
COCO_GT = f"{ANNOTATIONS}/{TUTORIAL_TEST_GT}"


@dataclass(frozen=True)
class EvalImage:
    image_id: int
    path: Path


@dataclass(frozen=True)
class EvalSet:
    """The test images, the ground truth's path, and where they came from (`gt_given`: False when the ground truth
    defaulted to the test list itself, as for Flickr30k / NoCaps)."""

    images: list[EvalImage]
    gt_path: Path
    test_path: Path | None = None
    image_root: Path | None = None
    gt_given: bool = True


def coco_image_id(file_name: str) -> int:
    """COCO's image id is the number in the file name (`val2014/COCO_val2014_000000391895.jpg` -> 391895)."""
    numbers = re.findall(r"\d+", Path(file_name).stem)
    if not numbers:
        raise ValueError(f"no image id in file name {file_name!r}")
    return int(numbers[-1])


def read_test_images(test_json: Path, image_root: Path) -> list[EvalImage]:
    """The list of test images: a COCO Karpathy list (`[{"image": ...}]`) or `{"images": [{"id", "file_name"}]}`."""
    data = read_json(test_json)
    images: list[EvalImage] = []
    seen: set[int] = set()
    try:
        if isinstance(data, list):
            entries = [(coco_image_id(item["image"]), item["image"]) for item in data]
        elif isinstance(data, dict) and isinstance(data.get("images"), list):
            entries = [(int(item["id"]), item.get("file_name") or item["image"]) for item in data["images"]]
        else:
            raise ValueError("expected a list of {'image': ...} or {'images': [{'id', 'file_name'}]}")
    except (KeyError, TypeError, ValueError) as e:
        raise CaptuneError(f"not a caption test set: {e}", test_json) from None
    for image_id, name in entries:
        if image_id not in seen:
            seen.add(image_id)
            images.append(EvalImage(image_id, image_root / name))
    if not images:
        raise CaptuneError("no test images listed", test_json)
    return images


def resolve_eval_set(
    data: str | Path | None = None,
    test_json: str | Path | None = None,
    gt_json: str | Path | None = None,
    image_root: str | Path | None = None,
    limit: int | None = None,
) -> EvalSet:
    """`--data DIR` finds the tutorial's layout; explicit files override it.

    For Flickr30k / NoCaps a single file is both the image list and the ground truth.
    """
    if data is not None:
        data = Path(data)
        if not data.is_dir():
            raise CaptuneError("--data: no such folder", data)
        test_json = test_json or data / COCO_TEST
        gt_json = gt_json or data / COCO_GT
        image_root = image_root or data
    if test_json is None:
        raise CaptuneError("give --data DIR (the tutorial's data/coco layout) or --test-json and --gt-json")
    test_json = Path(test_json)
    gt_given = gt_json is not None
    gt_json = Path(gt_json) if gt_given else test_json
    image_root = Path(image_root) if image_root is not None else test_json.parent
    for f in (test_json, gt_json):
        if not f.is_file():
            raise CaptuneError("file not found", f)
    images = read_test_images(test_json, image_root)
    if limit is not None:
        images = images[:limit]
    return EvalSet(images=images, gt_path=gt_json, test_path=test_json, image_root=image_root, gt_given=gt_given)
