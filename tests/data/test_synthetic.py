"""captune.data.synthetic: the tutorial's layout and file formats, determinism, captions that match the pixels, and the
base model's caption style differing from the references."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from captune.data.synthetic import (
    BACKGROUNDS,
    PALETTE,
    PLURAL,
    SHAPES,
    _reference_templates,
    data_synthetic_command,
    make_synthetic_dataset,
    random_scene,
    reference_captions,
    render_scene,
    style_caption,
    write_style_jsonl,
)
from captune.errors import CaptuneError
from captune.inputs.processor import DEFAULT_QUESTION

TRAIN, TEST = 12, 6
SIZE = (112, 112)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("syn") / "data"
    info = make_synthetic_dataset(out, train=TRAIN, test=TEST, seed=3, image_size=SIZE, style=4)
    return out, info


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_layout_and_formats(dataset):
    out, info = dataset
    assert info["train_images"] == TRAIN and info["test_images"] == TEST and info["train_captions"] == 5 * TRAIN
    train_images = sorted((out / "train2014").glob("*.jpg"))
    test_images = sorted((out / "val2014").glob("*.jpg"))
    assert len(train_images) == TRAIN and len(test_images) == TEST
    assert all(re.fullmatch(r"COCO_train2014_\d{12}\.jpg", p.name) for p in train_images)
    assert all(re.fullmatch(r"COCO_val2014_\d{12}\.jpg", p.name) for p in test_images)
    train_ids = {int(p.stem.rsplit("_", 1)[1]) for p in train_images}
    test_ids = {int(p.stem.rsplit("_", 1)[1]) for p in test_images}
    assert not train_ids & test_ids
    with Image.open(train_images[0]) as im:
        assert im.format == "JPEG" and im.size == SIZE and im.mode == "RGB"

    lines = _jsonl(out / "annotations" / "coco_karpathy_train_567k.jsonl")
    assert [line["id"] for line in lines] == list(range(5 * TRAIN))
    per_image: dict[str, list[str]] = {}
    for line in lines:
        human, gpt = line["conversations"]
        assert human == {"from": "human", "value": f"<image>\n{DEFAULT_QUESTION}"}
        assert gpt["from"] == "gpt" and gpt["value"].strip()
        assert (out / line["image"]).is_file()
        per_image.setdefault(line["image"], []).append(gpt["value"])
    assert len(per_image) == TRAIN
    assert all(len(caps) == 5 and len(set(caps)) == 5 for caps in per_image.values())

    test = json.loads((out / "annotations" / "coco_karpathy_test.json").read_text())
    assert len(test) == TEST
    for entry in test:
        assert entry["image"].startswith("val2014/") and (out / entry["image"]).is_file()
        assert len(entry["caption"]) == 5 and len(set(entry["caption"])) == 5

    from pycocotools.coco import COCO

    coco = COCO(str(out / "annotations" / "coco_karpathy_test_gt.json"))
    assert sorted(coco.getImgIds()) == sorted(test_ids)
    for entry in test:
        image_id = int(Path(entry["image"]).stem.rsplit("_", 1)[1])
        anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
        assert [a["caption"] for a in anns] == entry["caption"]
    assert len({a["id"] for a in coco.dataset["annotations"]}) == 5 * TEST

    meta = json.loads((out / "annotations" / "coco_caption.json").read_text())
    (entry,) = meta.values()
    assert Path(entry["annotation"]).resolve() == (out / "annotations" / "coco_karpathy_train_567k.jsonl").resolve()
    assert Path(entry["root"]).resolve() == out.resolve()
    assert entry["length"] == 5 * TRAIN and entry["repeat_time"] == 1 and entry["data_augment"] is False


def test_captune_reads_it(dataset):
    """The meta file and the folder are read by captune's own training-data reader, with no problems."""
    from captune.data.samples import read_training_data

    out, _ = dataset
    for source in (out, out / "annotations" / "coco_caption.json", out / "style" / "style_captions.jsonl"):
        report = read_training_data(source)
        assert report.problems.total == 0, source
        assert all(Path(s.image).is_file() for s in report.samples)
    assert len(read_training_data(out).samples) == 5 * TRAIN


def test_deterministic(dataset, tmp_path):
    out, _ = dataset
    again = tmp_path / "again"
    make_synthetic_dataset(again, train=TRAIN, test=TEST, seed=3, image_size=SIZE, style=4)
    for name in ("coco_karpathy_train_567k.jsonl", "coco_karpathy_test.json", "coco_karpathy_test_gt.json"):
        assert (again / "annotations" / name).read_bytes() == (out / "annotations" / name).read_bytes()
    style = Path("style") / "style_captions.jsonl"
    assert (again / style).read_bytes() == (out / style).read_bytes()
    for rel in ("train2014/COCO_train2014_000000000001.jpg", f"val2014/COCO_val2014_{TRAIN + TEST:012d}.jpg",
                "style/images/style_000002.jpg"):
        assert np.array_equal(np.asarray(Image.open(again / rel)), np.asarray(Image.open(out / rel)))
    other = tmp_path / "other"
    make_synthetic_dataset(other, train=TRAIN, test=TEST, seed=4, image_size=SIZE)
    assert (other / "annotations" / "coco_karpathy_test.json").read_bytes() != \
        (out / "annotations" / "coco_karpathy_test.json").read_bytes()


def test_images_not_identical(dataset):
    out, _ = dataset
    pixels = [np.asarray(Image.open(p)) for p in sorted((out / "train2014").glob("*.jpg"))]
    assert len({p.tobytes() for p in pixels}) == len(pixels)


def _nearest(rgb: np.ndarray) -> str:
    return min(PALETTE, key=lambda name: float(np.sum((np.array(PALETTE[name]) - rgb) ** 2)))


def _shape_mask(pixels: np.ndarray, background: str) -> np.ndarray:
    return np.sqrt(((pixels.astype(float) - np.array(PALETTE[background])) ** 2).sum(-1)) > 100


def _components(mask: np.ndarray) -> int:
    """Connected components (4-neighbour) of a boolean mask, ignoring specks."""
    seen = np.zeros_like(mask)
    sizes = []
    for y, x in zip(*np.nonzero(mask)):
        if seen[y, x]:
            continue
        stack, n = [(y, x)], 0
        seen[y, x] = True
        while stack:
            cy, cx = stack.pop()
            n += 1
            for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        sizes.append(n)
    return sum(1 for n in sizes if n > 20)


def _parse(caption: str) -> tuple[int, str, str, str]:
    """(count, colour, shape, background) back from the first reference phrasing "a red circle on a blue background"."""
    m = re.fullmatch(r"(a|two|three) (\w+) (\w+) on a (\w+) background", caption)
    assert m, caption
    singular = {PLURAL[s]: s for s in SHAPES} | {s: s for s in SHAPES}
    return {"a": 1, "two": 2, "three": 3}[m[1]], m[2], singular[m[3]], m[4]


def test_captions_match_pixels(dataset):
    """For every written image, the colours and the count named by its caption are what the pixels show."""
    out, _ = dataset
    lines = _jsonl(out / "annotations" / "coco_karpathy_train_567k.jsonl")
    checked = 0
    for line in lines:
        caption = line["conversations"][1]["value"]
        if not re.fullmatch(r"(a|two|three) \w+ \w+ on a \w+ background", caption):
            continue
        count, colour, _, background = _parse(caption)
        pixels = np.asarray(Image.open(out / line["image"]))
        border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]]).astype(float)
        assert _nearest(np.median(border, axis=0)) == background
        mask = _shape_mask(pixels, background)
        assert _nearest(np.median(pixels[mask].astype(float), axis=0)) == colour
        assert _components(mask) == count, caption
        checked += 1
    assert checked >= 3


def test_scene_rendering_matches_words():
    """Many scenes straight from the generator: colour, count, position and size are visible in the pixels."""
    rng = np.random.default_rng(7)
    areas: dict[str, list[float]] = {"small": [], "large": []}
    for _ in range(60):
        scene = random_scene(rng)
        pixels = np.asarray(render_scene(scene, (128, 128)))
        mask = _shape_mask(pixels, scene.background)
        assert _nearest(np.median(pixels[mask].astype(float), axis=0)) == scene.colour
        assert _components(mask) == scene.count, scene
        assert scene.colour != scene.background and scene.background in BACKGROUNDS
        if scene.count == 1:
            ys, xs = np.nonzero(mask)
            cx, cy = xs.mean() / 128, ys.mean() / 128
            expected = {"left": cx < 0.4, "right": cx > 0.6, "top": cy < 0.4, "bottom": cy > 0.6,
                        "centre": abs(cx - 0.5) < 0.1 and abs(cy - 0.5) < 0.1}
            assert expected[scene.position], (scene.position, cx, cy)
            areas[scene.size].append(mask.mean())
    assert max(areas["small"]) < min(areas["large"])


def test_reference_and_style_captions():
    rng = np.random.default_rng(11)
    for _ in range(50):
        scene = random_scene(rng)
        refs = reference_captions(scene, rng)
        assert len(refs) == 5 and len(set(refs)) == 5 and set(refs) <= set(_reference_templates(scene))
        noun = scene.shape if scene.count == 1 else PLURAL[scene.shape]
        assert all(scene.colour in r and noun in r and scene.background in r for r in refs)
        style = style_caption(scene)
        assert scene.shape in style and scene.colour in style and scene.background in style
        words = re.findall(r"[a-z0-9]+", style.lower())
        style_bigrams = set(zip(words, words[1:]))
        for ref in _reference_templates(scene):
            assert style != ref
            ref_words = ref.split()
            # no phrasing in common: not a single shared bigram
            shared = style_bigrams & set(zip(ref_words, ref_words[1:]))
            assert not shared, (style, ref, shared)


def test_write_style_jsonl(tmp_path):
    jsonl = write_style_jsonl(tmp_path / "pre" / "style.jsonl", tmp_path / "pre" / "img", 5, seed=1,
                              image_size=(64, 64))
    lines = _jsonl(jsonl)
    assert len(lines) == 5 and len({line["image"] for line in lines}) == 5
    for line in lines:
        assert (jsonl.parent / line["image"]).is_file()
        assert line["conversations"][0]["value"] == f"<image>\n{DEFAULT_QUESTION}"
        assert line["conversations"][1]["value"].startswith("The image shows: ")


def test_errors_and_command(tmp_path, capsys):
    with pytest.raises(CaptuneError):
        make_synthetic_dataset(tmp_path / "a", train=0)
    with pytest.raises(CaptuneError):
        make_synthetic_dataset(tmp_path / "a", train=2, test=2, image_size=(10, 10))
    data_synthetic_command(tmp_path / "b", train=2, test=1, image_size=56)
    assert "coco_karpathy_train_567k.jsonl (2 images, 10 training captions)" in capsys.readouterr().out
    with pytest.raises(CaptuneError, match="not empty"):
        data_synthetic_command(tmp_path / "b", train=2, test=1, image_size=56)
    data_synthetic_command(tmp_path / "b", train=3, test=1, image_size=56, force=True)
    assert len(list((tmp_path / "b" / "train2014").iterdir())) == 3


def test_fast(tmp_path):
    import time

    start = time.perf_counter()
    make_synthetic_dataset(tmp_path / "d", train=100, test=25)
    assert time.perf_counter() - start < 10  # 125 images at 448x448; 500 take a few seconds
