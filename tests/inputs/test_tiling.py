"""captune.inputs.tiling against the original InternVL2 tiling (fixtures/tiling/tiling_reference.json)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from captune.errors import CaptuneError
from captune.inputs.tiling import load_image, tile_grid, tile_image

TOL = 1e-5


@pytest.fixture(scope="module")
def reference(fixtures: Path) -> dict:
    return json.loads((fixtures / "tiling" / "tiling_reference.json").read_text())


@pytest.fixture(scope="module")
def scene(fixtures: Path) -> Path:
    return fixtures / "tiling" / "images" / "scene_640x427.jpg"


@pytest.fixture(scope="module")
def scene_case(reference: dict) -> dict:
    return next(c for c in reference["pixel_cases"] if c["image"] == "images/scene_640x427.jpg")


def _sampled(pixels: torch.Tensor, reference: dict) -> np.ndarray:
    """pixel_values[t, c, y_k, x_k] for every sample position k: [n, 3, K]."""
    yx = np.asarray(reference["sample_positions_yx"])
    return pixels.numpy()[:, :, yx[:, 0], yx[:, 1]]


def _check_against_case(pixels: torch.Tensor, case: dict, reference: dict) -> None:
    name = case["image"]
    assert pixels.dtype == torch.float32
    assert pixels.shape[0] == case["num_tiles"], f"{name}: {pixels.shape[0]} tiles, expected {case['num_tiles']}"
    assert tuple(pixels.shape[1:]) == (3, 448, 448)
    expected = np.asarray(case["samples"], dtype=np.float32)
    diff = np.abs(_sampled(pixels, reference) - expected)
    t, c, k = np.unravel_index(diff.argmax(), diff.shape)
    assert diff.max() <= TOL, f"{name}: sample diff {diff.max():.3g} at tile {t} channel {c} position {k}"
    means = pixels.double().mean(dim=(1, 2, 3)).numpy()
    mean_diff = np.abs(means - np.asarray(case["tile_means"]))
    assert mean_diff.max() <= TOL, f"{name}: tile mean diff {mean_diff.max():.3g} at tile {mean_diff.argmax()}"


def test_grids_match_internvl(reference: dict) -> None:
    assert reference["image_size"] == 448 and reference["use_thumbnail"]
    assert len(reference["grids"]) > 0
    wrong = []
    for g in reference["grids"]:
        cols, rows = tile_grid(g["width"], g["height"], max_tiles=g["max_num"])
        tiles = cols * rows + (1 if cols * rows > 1 else 0)
        expected = (g["cols"], g["rows"], g["num_tiles_with_thumbnail"])
        if (cols, rows, tiles) != expected:
            case = f"{g['width']}x{g['height']} max {g['max_num']}"
            wrong.append(f"{case}: got (cols, rows, tiles) {(cols, rows, tiles)}, expected {expected}")
    assert not wrong, "\n".join(wrong)


def test_grid_tile_counts_from_tile_image(reference: dict) -> None:
    wrong = []
    for g in reference["grids"]:
        image = Image.new("RGB", (g["width"], g["height"]), (120, 60, 200))
        n = tile_image(image, max_tiles=g["max_num"]).shape[0]
        if n != g["num_tiles_with_thumbnail"]:
            wrong.append(f"{g['width']}x{g['height']}: {n} tiles, expected {g['num_tiles_with_thumbnail']}")
    assert not wrong, "\n".join(wrong)


def test_pixel_cases_match_internvl(reference: dict, fixtures: Path) -> None:
    assert len(reference["pixel_cases"]) > 0
    for case in reference["pixel_cases"]:
        pixels = tile_image(fixtures / "tiling" / case["image"], max_tiles=case["max_num"])
        _check_against_case(pixels, case, reference)


def test_pixel_values_bit_exact_at_fixture_precision(reference: dict, fixtures: Path) -> None:
    """The fixture stores the float32 values rounded to 6 decimals (in float32); ours round to the same bits."""
    for case in reference["pixel_cases"]:
        pixels = tile_image(fixtures / "tiling" / case["image"], max_tiles=case["max_num"])
        ours = np.round(_sampled(pixels, reference), 6)
        expected = np.asarray(case["samples"], dtype=np.float32)
        assert np.array_equal(ours, expected), f"{case['image']}: {(ours != expected).sum()} samples differ"


@pytest.mark.parametrize("mode", ["RGBA", "P", "L", "CMYK", "I;16"])
def test_modes(scene: Path, mode: str) -> None:
    rgb = Image.open(scene).convert("RGB")
    image = rgb.convert("L").convert("I;16") if mode == "I;16" else rgb.convert(mode)
    assert image.mode == mode
    pixels = tile_image(image)
    assert pixels.dtype == torch.float32
    assert tuple(pixels.shape) == (7, 3, 448, 448)
    assert torch.isfinite(pixels).all()
    if mode in ("RGBA", "CMYK", "P"):
        assert torch.equal(pixels, tile_image(image.convert("RGB")))


def test_rgba_matches_reference(scene: Path, scene_case: dict, reference: dict) -> None:
    _check_against_case(tile_image(Image.open(scene).convert("RGBA")), scene_case, reference)


def test_grayscale_image_matches_reference(reference: dict, fixtures: Path) -> None:
    case = next(c for c in reference["pixel_cases"] if c["image"] == "images/scene_gray_500x375.jpg")
    image = Image.open(fixtures / "tiling" / case["image"])
    assert image.mode == "L"
    _check_against_case(tile_image(image, max_tiles=case["max_num"]), case, reference)


def test_path_same_as_opened_image(scene: Path) -> None:
    opened = tile_image(Image.open(scene))
    assert torch.equal(tile_image(scene), opened)
    assert torch.equal(tile_image(str(scene)), opened)


def test_no_thumbnail(scene: Path, scene_case: dict) -> None:
    with_thumb = tile_image(scene)
    without = tile_image(scene, thumbnail=False)
    assert without.shape[0] == scene_case["num_tiles"] - 1
    assert torch.equal(without, with_thumb[:-1])


def test_single_tile_never_gets_thumbnail(reference: dict, fixtures: Path) -> None:
    case = next(c for c in reference["pixel_cases"] if c["num_tiles"] == 1)
    pixels = tile_image(fixtures / "tiling" / case["image"], max_tiles=case["max_num"], thumbnail=True)
    assert pixels.shape[0] == 1
    _check_against_case(pixels, case, reference)


def test_max_tiles_one(scene: Path) -> None:
    assert tile_grid(640, 427, max_tiles=1) == (1, 1)
    assert tuple(tile_image(scene, max_tiles=1).shape) == (1, 3, 448, 448)
    assert tuple(tile_image(Image.new("RGB", (3000, 500)), max_tiles=1).shape) == (1, 3, 448, 448)


def test_load_image_returns_decoded_rgb(fixtures: Path) -> None:
    image = load_image(fixtures / "tiling" / "images" / "scene_gray_500x375.jpg")
    assert image.mode == "RGB" and image.size == (500, 375)


def test_load_image_missing(tmp_path: Path) -> None:
    path = tmp_path / "nope.jpg"
    with pytest.raises(CaptuneError, match="not found") as err:
        load_image(path)
    assert str(path) in str(err.value)
    with pytest.raises(CaptuneError):
        tile_image(path)


def test_load_image_not_an_image(tmp_path: Path) -> None:
    path = tmp_path / "notes.jpg"
    path.write_text("this is not a picture\n")
    with pytest.raises(CaptuneError, match="cannot decode image") as err:
        load_image(path)
    assert str(path) in str(err.value)


def test_load_image_truncated(tmp_path: Path, scene: Path) -> None:
    data = scene.read_bytes()
    path = tmp_path / "half.jpg"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CaptuneError, match="truncated") as err:
        load_image(path)
    assert str(path) in str(err.value)
    assert err.value.path == path
