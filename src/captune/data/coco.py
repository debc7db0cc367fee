"""The tutorial's COCO annotation files from Karpathy's `dataset_coco.json` (`captune data coco`): the 567k-caption
training jsonl, the test list, its COCO-format ground truth, and InternVL's meta file."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

from captune.data.layout import (
    TUTORIAL_JSONL,
    TUTORIAL_META,
    TUTORIAL_TEST,
    TUTORIAL_TEST_GT,
)
from captune.data.problems import SkipRecord
from captune.data.samples import (
    TRAIN_SPLITS,
    caption_conversation,
    is_karpathy,
    karpathy_image_path,
)
from captune.errors import CaptuneError
from captune.fileio import read_json, write_json_atomic, write_text_atomic
from captune.inputs.processor import DEFAULT_QUESTION

# ---------------------------------------------------------------------------------------------------------------------
# Writing the tutorial's annotation files


def write_coco_annotations(karpathy_json: str | Path, images_dir: str | Path, out_dir: str | Path,
                           progress: bool = False) -> dict[str, Path]:
    """Write the tutorial's COCO annotation files from Karpathy's dataset_coco.json into `out_dir`.

    - `coco_karpathy_train_567k.jsonl`: one InternVL conversation per caption of splits train + restval, `"image"`
      as `<filepath>/<filename>` relative to `images_dir`. The human prompt of InternVL's own 567k file is not known
      here: every line asks `"<image>\\n" + DEFAULT_QUESTION` (the question captune's evaluation asks).
    - `coco_karpathy_test.json`: `[{"image", "caption": [references]}]` of split test, as LAVIS/BLIP's file.
    - `coco_karpathy_test_gt.json`: the same references in COCO captions format, for pycocotools / pycocoevalcap.
    - `coco_caption.json`: InternVL's meta file naming the jsonl (absolute paths, root `images_dir`).

    Returns {"train", "test", "test_gt", "meta"} -> path. Images not found under `images_dir` are counted in a
    warning; the files are written anyway. `progress` says each step on stdout, with a bar on stderr where the work
    is countable (123k images to convert and to look for in the full set).
    """
    from tqdm import tqdm

    karpathy_json, images_dir, out_dir = Path(karpathy_json), Path(images_dir), Path(out_dir)
    if progress:
        print(f"reading {karpathy_json}", flush=True)
    images = _karpathy_images(karpathy_json)
    train_lines: list[str] = []
    test: list[dict] = []
    gt: dict[str, Any] = {"info": {}, "licenses": [], "type": "captions", "images": [], "annotations": []}
    listed: list[str] = []
    for i, image in enumerate(tqdm(images, desc="converting captions", unit="image", disable=not progress)):
        split = image.get("split") if isinstance(image, dict) else None
        if split not in (*TRAIN_SPLITS, "test"):
            continue
        rel, captions = _karpathy_captions(karpathy_json, i, image)
        listed.append(rel)
        if split == "test":
            test.append({"image": rel, "caption": captions})
            image_id = _coco_id(karpathy_json, i, image)
            gt["images"].append({"id": image_id, "file_name": rel})
            for caption in captions:
                gt["annotations"].append({"image_id": image_id, "caption": caption, "id": len(gt["annotations"]) + 1})
        else:
            for caption in captions:
                line = {"id": len(train_lines), "image": rel,
                        "conversations": list(caption_conversation(DEFAULT_QUESTION, caption))}
                train_lines.append(json.dumps(line, ensure_ascii=False))
    _warn_missing(listed, images_dir, karpathy_json, progress)

    out = {"train": out_dir / TUTORIAL_JSONL, "test": out_dir / TUTORIAL_TEST,
           "test_gt": out_dir / TUTORIAL_TEST_GT, "meta": out_dir / TUTORIAL_META}
    if progress:
        print(f"writing {len(train_lines)} training captions and {len(test)} test images into {out_dir}", flush=True)
    write_text_atomic(out["train"], "".join(line + "\n" for line in train_lines))
    write_json_atomic(out["test"], test, indent=None)
    write_json_atomic(out["test_gt"], gt, indent=None)
    meta = {Path(TUTORIAL_JSONL).stem: {"root": os.path.abspath(images_dir),
                                        "annotation": os.path.abspath(out["train"]),
                                        "data_augment": False, "repeat_time": 1, "length": len(train_lines)}}
    write_json_atomic(out["meta"], meta)
    return out


def _karpathy_images(path: Path) -> list:
    data = read_json(path)
    if not is_karpathy(data):
        raise CaptuneError('not Karpathy\'s dataset_coco.json: expected {"images": [{"filepath", "filename", "split", '
                           '"sentences", "cocoid"}]}', path)
    return data["images"]


def _karpathy_captions(path: Path, i: int, image: dict) -> tuple[str, list[str]]:
    """(image path relative to the images folder, stripped non-empty raw sentences); a malformed entry is an error."""
    try:
        rel = karpathy_image_path(image)
        sentences = image["sentences"]
        captions = [s["raw"].strip() for s in sentences]
    except (SkipRecord, KeyError, TypeError, AttributeError):
        raise CaptuneError(f'images[{i}]: needs "filename" and "sentences" [{{"raw": ...}}]', path) from None
    return rel, [c for c in captions if c]


def _coco_id(path: Path, i: int, image: dict) -> int:
    if isinstance(image.get("cocoid"), int):
        return image["cocoid"]
    from captune.data.evalsets import coco_image_id

    try:
        return coco_image_id(image["filename"])
    except ValueError:
        raise CaptuneError(f'images[{i}]: no "cocoid" and no id in the file name', path) from None


def _warn_missing(listed: list[str], images_dir: Path, source: Path, progress: bool = False) -> None:
    from tqdm import tqdm

    bar = tqdm(listed, desc=f"looking for the images in {images_dir}", unit="image", disable=not progress)
    missing = [rel for rel in bar if not (images_dir / rel).is_file()]
    if missing:
        warnings.warn(f"{len(missing)} of {len(listed)} images listed in {source} are not under {images_dir} "
                      f"(e.g. {missing[0]}); the annotations are written anyway", stacklevel=3)


def data_coco_command(karpathy: str | Path, images: str | Path, out: str | Path) -> None:
    """`captune data coco --karpathy dataset_coco.json --image-root DIR --out DIR`."""
    paths = write_coco_annotations(karpathy, images, out, progress=True)
    length = read_json(paths["meta"])[Path(TUTORIAL_JSONL).stem]["length"]
    print(f"wrote {paths['train']} ({length} training captions)")
    for key in ("test", "test_gt", "meta"):
        print(f"wrote {paths[key]}")
