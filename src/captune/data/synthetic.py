"""A synthetic COCO-Caption-like data set that a tiny vision-language model can learn on a CPU in minutes.

Each image is a plain background (one named colour) with 1 to 3 identical shapes (circle, square, triangle, star) of
one named colour. A single shape is "small" or "large" and sits on the left, right, top, bottom or in the middle;
two or three shapes are drawn small, side by side. Shapes are large, saturated and far from the background colour,
so shape, colour and count are visible even in a 56x56 thumbnail; a little geometric and colour jitter and pixel
noise keeps images from being identical.

`make_synthetic_dataset(OUT)` writes the tutorial's layout (what `captune data coco` writes for real COCO):

    OUT/train2014/COCO_train2014_%012d.jpg                 training images (ids 1..train)
    OUT/val2014/COCO_val2014_%012d.jpg                     test images (ids train+1..train+test)
    OUT/annotations/coco_karpathy_train_567k.jsonl         InternVL conversations, one line per caption (5 per image)
    OUT/annotations/coco_karpathy_test.json                [{"image", "caption": [5 references]}]
    OUT/annotations/coco_karpathy_test_gt.json             COCO captions format, for pycocotools / pycocoevalcap
    OUT/annotations/coco_caption.json                      InternVL meta file naming the jsonl (absolute paths)

Every image has five differently worded references, as COCO has ("a red circle on a blue background", "one red
circle in front of a blue wall", ...). A second, terse caption style (`style_caption`: "The image shows: circle,
red. Background colour: blue.") shares the content words but none of the reference phrasings; `write_style_jsonl`
renders a separate set of scenes captioned in it, to pre-train a demo base model that "already captions, in another
style" before it is fine-tuned on the references.

Everything is deterministic for a seed (same files, same pixels).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from captune.data.layout import (
    TUTORIAL_JSONL,
    TUTORIAL_META,
    TUTORIAL_TEST,
    TUTORIAL_TEST_GT,
)
from captune.errors import CaptuneError
from captune.fileio import atomic_dir, write_json_atomic, write_text_atomic
from captune.inputs.processor import DEFAULT_QUESTION

META_NAME = "synthetic_train"
STYLE_JSONL = "style_captions.jsonl"
JPEG_QUALITY = 90
REFERENCES_PER_IMAGE = 5

# Saturated, mutually distant colours; the background never has the shape's colour.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (245, 215, 20),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
SHAPE_COLOURS = ("red", "green", "blue", "yellow")
BACKGROUNDS = ("white", "black", "blue", "green")
SHAPES = ("circle", "square", "triangle", "star")
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars"}
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "centre")
COUNTS = (1, 2, 3)
COUNT_WEIGHTS = (0.5, 0.25, 0.25)

# Shape centres (fractions of width, height) and radii (fraction of the shorter side).
_POSITION_CENTRES = {"left": (0.29, 0.5), "right": (0.71, 0.5), "top": (0.5, 0.29), "bottom": (0.5, 0.71),
                     "centre": (0.5, 0.5)}
_RADIUS = {"small": 0.13, "large": 0.21}
_GROUP_RADIUS = 0.11
_GROUP_LAYOUTS = {
    2: (((0.28, 0.5), (0.72, 0.5)), ((0.5, 0.28), (0.5, 0.72)), ((0.3, 0.3), (0.7, 0.7)), ((0.3, 0.7), (0.7, 0.3))),
    3: (((0.19, 0.5), (0.5, 0.5), (0.81, 0.5)), ((0.5, 0.19), (0.5, 0.5), (0.5, 0.81)),
        ((0.28, 0.3), (0.72, 0.3), (0.5, 0.72)), ((0.28, 0.7), (0.72, 0.7), (0.5, 0.28))),
}
_SHAPE_SCALE = {"circle": 1.0, "square": 0.9, "triangle": 1.12, "star": 1.15}  # similar visible areas
_NOISE_SIGMA = 5.0


@dataclass(frozen=True)
class Scene:
    """What an image shows (the words) and how it is drawn (geometry and jitter, in fractions of the image)."""

    background: str
    colour: str
    shape: str
    count: int
    size: str  # "small" or "large"; groups of 2 or 3 are always "small"
    position: str | None  # one of POSITIONS for a single shape, None for a group
    items: tuple[tuple[float, float, float, float], ...]  # (cx, cy, radius, rotation in degrees) per shape
    colour_shift: tuple[int, int, int]  # jitter of the shape colour
    background_shift: tuple[int, int, int]  # jitter of the background colour
    noise_seed: int


def random_scene(rng: np.random.Generator) -> Scene:
    """Draw one scene: shape, colour, background, count, then size/position and the jittered geometry."""
    shape = SHAPES[rng.integers(len(SHAPES))]
    colour = SHAPE_COLOURS[rng.integers(len(SHAPE_COLOURS))]
    backgrounds = [b for b in BACKGROUNDS if b != colour]
    background = backgrounds[rng.integers(len(backgrounds))]
    count = int(rng.choice(COUNTS, p=COUNT_WEIGHTS))
    scale = _SHAPE_SCALE[shape]
    if count == 1:
        size = SIZES[rng.integers(len(SIZES))]
        position = POSITIONS[rng.integers(len(POSITIONS))]
        centres = [_POSITION_CENTRES[position]]
        radius = _RADIUS[size]
    else:
        size, position = "small", None
        layouts = _GROUP_LAYOUTS[count]
        centres = list(layouts[rng.integers(len(layouts))])
        radius = _GROUP_RADIUS
    items = []
    for cx, cy in centres:
        r = radius * scale * float(rng.uniform(0.93, 1.07))
        items.append((cx + float(rng.uniform(-0.02, 0.02)), cy + float(rng.uniform(-0.02, 0.02)), r,
                      float(rng.uniform(-12, 12))))
    return Scene(background, colour, shape, count, size, position, tuple(items),
                 tuple(int(v) for v in rng.integers(-18, 19, size=3)),
                 tuple(int(v) for v in rng.integers(-12, 13, size=3)),
                 int(rng.integers(2**31)))


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if shape == "square":
        corners = [(45 + 90 * k) for k in range(4)]
        radii = [r * math.sqrt(2)] * 4
    elif shape == "triangle":
        corners = [(-90 + 120 * k) for k in range(3)]
        radii = [r] * 3
        cy += 0.2 * r  # centre the triangle's bounding box, not its centroid
    elif shape == "star":
        corners = [(-90 + 36 * k) for k in range(10)]
        radii = [r if k % 2 == 0 else 0.45 * r for k in range(10)]
    else:
        raise ValueError(shape)
    return [(cx + rad * math.cos(math.radians(a + angle)), cy + rad * math.sin(math.radians(a + angle)))
            for a, rad in zip(corners, radii)]


def _jitter(colour: str, shift: tuple[int, int, int]) -> tuple[int, int, int]:
    return tuple(min(255, max(0, c + s)) for c, s in zip(PALETTE[colour], shift))  # type: ignore[return-value]


def render_scene(scene: Scene, image_size: tuple[int, int] = (448, 448)) -> Image.Image:
    """The scene as an RGB image of `image_size` (width, height), pixel noise included (deterministic)."""
    width, height = image_size
    image = Image.new("RGB", (width, height), _jitter(scene.background, scene.background_shift))
    draw = ImageDraw.Draw(image)
    fill = _jitter(scene.colour, scene.colour_shift)
    unit = min(width, height)
    for cx, cy, r, angle in scene.items:
        x, y, rad = cx * width, cy * height, r * unit
        if scene.shape == "circle":
            draw.ellipse((x - rad, y - rad, x + rad, y + rad), fill=fill)
        else:
            draw.polygon(_polygon(scene.shape, x, y, rad, angle), fill=fill)
    pixels = np.asarray(image, dtype=np.int16)
    return Image.fromarray(np.clip(pixels + _noise(scene.noise_seed, width, height), 0, 255).astype(np.uint8))


_NOISE_MARGIN = 64
_noise_banks: dict[tuple[int, int], np.ndarray] = {}


def _noise(noise_seed: int, width: int, height: int) -> np.ndarray:
    """Gaussian pixel noise, a crop (offset and flips chosen by `noise_seed`) of one fixed field per image size:
    as good as fresh noise to the eye and to a model, and much cheaper than drawing 600k normals per image."""
    bank = _noise_banks.get((width, height))
    if bank is None:
        shape = (height + _NOISE_MARGIN, width + _NOISE_MARGIN, 3)
        field = np.random.default_rng(12345).normal(0.0, _NOISE_SIGMA, shape)
        bank = _noise_banks[(width, height)] = field.round().astype(np.int16)
    dy, dx, flip = noise_seed % _NOISE_MARGIN, (noise_seed // _NOISE_MARGIN) % _NOISE_MARGIN, noise_seed >> 12
    crop = bank[dy:dy + height, dx:dx + width]
    if flip & 1:
        crop = crop[::-1]
    if flip & 2:
        crop = crop[:, ::-1]
    return crop


# ---------------------------------------------------------------------------------------------------------------------
# Captions


_COUNT_A = {1: "a", 2: "two", 3: "three"}
_COUNT_ONE = {1: "one", 2: "two", 3: "three"}
_COUNT_SINGLE = {1: "a single", 2: "two", 3: "three"}
_WHERE = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
          "centre": "in the middle"}


def _noun(scene: Scene) -> str:
    return scene.shape if scene.count == 1 else PLURAL[scene.shape]


def _reference_templates(scene: Scene) -> list[str]:
    """Seven phrasings of the same content; each image gets five of them."""
    n, c, b, s = scene.count, scene.colour, scene.background, _noun(scene)
    be = "is" if n == 1 else "are"
    if n == 1:
        detail = f"{_COUNT_A[n]} {scene.size} {c} {s} {_WHERE[scene.position or 'centre']}"
    else:
        detail = f"{_COUNT_A[n]} small {c} {s} next to each other"
    return [
        f"{_COUNT_A[n]} {c} {s} on a {b} background",
        f"{_COUNT_ONE[n]} {c} {s} in front of a {b} wall",
        f"a {b} picture with {_COUNT_SINGLE[n]} {c} {s}",
        f"{_COUNT_A[n]} {c} {s} on {b}",
        f"there {be} {_COUNT_A[n]} {c} {s} on a {b} background",
        f"{detail} against a {b} backdrop",
        f"a {b} background with {detail}",
    ]


def reference_captions(scene: Scene, rng: np.random.Generator) -> list[str]:
    """Five differently worded references (five of seven phrasings, in a random order)."""
    templates = _reference_templates(scene)
    chosen = rng.choice(len(templates), size=REFERENCES_PER_IMAGE, replace=False)
    return [templates[int(i)] for i in chosen]


def style_caption(scene: Scene) -> str:
    """The base model's own, different style: the same content words, none of the reference phrasings."""
    what = scene.shape if scene.count == 1 else f"{scene.count} x {scene.shape}"
    text = f"The image shows: {what}, {scene.colour}."
    if scene.count == 1:
        text += f" Size: {scene.size}. Placement: {scene.position}."
    return text + f" Background colour: {scene.background}."


# ---------------------------------------------------------------------------------------------------------------------
# Files


def _conversation_line(line_id: int, image: str, caption: str) -> str:
    return json.dumps({"id": line_id, "image": image,
                       "conversations": [{"from": "human", "value": f"<image>\n{DEFAULT_QUESTION}"},
                                         {"from": "gpt", "value": caption}]}, ensure_ascii=False)


def _check_count(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise CaptuneError(f"{name} must be a whole number >= {minimum}, not {value!r}")
    return value


def _check_size(image_size: Any) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in image_size)
    except (TypeError, ValueError):
        raise CaptuneError(f"image_size must be (width, height), not {image_size!r}") from None
    if min(width, height) < 28:
        raise CaptuneError(f"image_size must be at least 28x28 pixels, not {width}x{height}")
    return width, height


def _save_jpeg(image: Image.Image, path: Path) -> None:
    image.save(path, format="JPEG", quality=JPEG_QUALITY)


def make_synthetic_dataset(out: str | Path, train: int = 400, test: int = 100, seed: int = 0,
                           image_size: tuple[int, int] = (448, 448), style: int = 0,
                           force: bool = False) -> dict[str, Any]:
    """Write the synthetic data set under `out` in the tutorial's layout (see the module docstring).

    `style` > 0 also writes `out/style/style_captions.jsonl` with that many more images in `out/style/images/`,
    captioned in `style_caption`'s style (see `write_style_jsonl`). The folder is written beside `out` and renamed
    when complete; a non-empty `out` is refused unless `force`.

    Returns {"out", "train", "test", "test_gt", "meta", "style" (paths; "style" None when not written),
    "train_images", "train_captions", "test_images", "style_images" (counts)}.
    """
    train = _check_count("train", train, 1)
    test = _check_count("test", test, 1)
    style = _check_count("style", style, 0)
    image_size = _check_size(image_size)
    out = Path(out)
    final = Path(os.path.abspath(out))
    ann = "annotations"
    with atomic_dir(out, force) as tmp:
        (tmp / "train2014").mkdir()
        (tmp / "val2014").mkdir()
        train_lines: list[str] = []
        rng = np.random.default_rng([seed, 0])
        for i in range(train):
            image_id = i + 1
            scene = random_scene(rng)
            rel = f"train2014/COCO_train2014_{image_id:012d}.jpg"
            _save_jpeg(render_scene(scene, image_size), tmp / rel)
            for caption in reference_captions(scene, rng):
                train_lines.append(_conversation_line(len(train_lines), rel, caption))
        test_entries: list[dict] = []
        gt: dict[str, Any] = {"info": {"description": "captune synthetic shapes"}, "licenses": [], "type": "captions",
                              "images": [], "annotations": []}
        rng = np.random.default_rng([seed, 1])
        for i in range(test):
            image_id = train + i + 1
            scene = random_scene(rng)
            rel = f"val2014/COCO_val2014_{image_id:012d}.jpg"
            _save_jpeg(render_scene(scene, image_size), tmp / rel)
            captions = reference_captions(scene, rng)
            test_entries.append({"image": rel, "caption": captions})
            gt["images"].append({"id": image_id, "file_name": rel, "width": image_size[0], "height": image_size[1]})
            for caption in captions:
                gt["annotations"].append({"image_id": image_id, "caption": caption, "id": len(gt["annotations"]) + 1})
        write_text_atomic(tmp / ann / TUTORIAL_JSONL, "".join(line + "\n" for line in train_lines))
        write_json_atomic(tmp / ann / TUTORIAL_TEST, test_entries, indent=None)
        write_json_atomic(tmp / ann / TUTORIAL_TEST_GT, gt, indent=None)
        meta = {META_NAME: {"root": str(final), "annotation": str(final / ann / TUTORIAL_JSONL),
                            "data_augment": False, "repeat_time": 1, "length": len(train_lines)}}
        write_json_atomic(tmp / ann / TUTORIAL_META, meta)
        if style:
            write_style_jsonl(tmp / "style" / STYLE_JSONL, tmp / "style" / "images", style, seed, image_size)
    return {"out": out, "train": out / ann / TUTORIAL_JSONL, "test": out / ann / TUTORIAL_TEST,
            "test_gt": out / ann / TUTORIAL_TEST_GT, "meta": out / ann / TUTORIAL_META,
            "style": out / "style" / STYLE_JSONL if style else None,
            "train_images": train, "train_captions": len(train_lines), "test_images": test, "style_images": style}


def write_style_jsonl(out_jsonl: str | Path, images_dir: str | Path, n: int, seed: int = 0,
                      image_size: tuple[int, int] = (448, 448)) -> Path:
    """Render `n` fresh scenes into `images_dir` (style_%06d.jpg) and write `out_jsonl`, one InternVL conversation
    per image captioned by `style_caption`, to pre-train a base model in a style other than the references.

    Image paths in the jsonl are relative to the jsonl's folder (as `captune data check` and `read_training_data`
    find them); the scenes come from a random stream of `seed` disjoint from the train and test streams.
    """
    n = _check_count("n", n, 1)
    image_size = _check_size(image_size)
    out_jsonl, images_dir = Path(out_jsonl), Path(images_dir)
    images_dir.mkdir(parents=True, exist_ok=True)
    out_jsonl.parent.mkdir(parents=True, exist_ok=True)
    root = out_jsonl.parent
    rng = np.random.default_rng([seed, 2])
    lines = []
    for i in range(n):
        scene = random_scene(rng)
        path = images_dir / f"style_{i + 1:06d}.jpg"
        _save_jpeg(render_scene(scene, image_size), path)
        rel = Path(os.path.relpath(os.path.abspath(path), os.path.abspath(root))).as_posix()
        lines.append(_conversation_line(i, rel, style_caption(scene)))
    write_text_atomic(out_jsonl, "".join(line + "\n" for line in lines))
    return out_jsonl


def data_synthetic_command(out: str | Path, train: int = 400, test: int = 100, seed: int = 0, style: int = 0,
                           image_size: int = 448, force: bool = False) -> None:
    """`captune data synthetic OUT [--train-images N] [--test-images M] [--seed S] [--style K] [--image-size PX] [--force]`."""
    info = make_synthetic_dataset(out, train=train, test=test, seed=seed, image_size=(image_size, image_size),
                                  style=style, force=force)
    print(f"wrote {info['train']} ({info['train_images']} images, {info['train_captions']} training captions)")
    print(f"wrote {info['test']} ({info['test_images']} images, {REFERENCES_PER_IMAGE} references each)")
    print(f"wrote {info['test_gt']}")
    print(f"wrote {info['meta']}")
    if info["style"] is not None:
        print(f"wrote {info['style']} ({info['style_images']} images captioned in the base model's style)")
