"""Captioning the miniature InternVL2-2B exactly as the original `model.chat()`, batched or not."""

from __future__ import annotations

import json

import pytest
from PIL import Image

import captune
from captune.cli import main
from captune.eval.generate import GenerationSettings


@pytest.fixture(scope="module")
def mini(fixtures):
    return captune.load(fixtures / "models" / "internvl2_2b_mini", dtype="fp32")


def test_cli_caption_prints_the_reference_caption(fixtures, capsys):
    ref = json.loads((fixtures / "models" / "internvl2_2b_mini" / "chat_reference.json").read_text())
    image = fixtures / "tiling" / "images" / ref["image"]
    code = main(["caption", str(fixtures / "models" / "internvl2_2b_mini"), str(image),
                 "--max-tiles", str(ref["max_tiles"]), "--question", ref["question"], "--device", "cpu"])
    assert code == 0
    assert capsys.readouterr().out == ref["caption"] + "\n"


def test_prompt_has_the_reference_tile_count(mini, fixtures):
    ref = json.loads((fixtures / "models" / "internvl2_2b_mini" / "chat_reference.json").read_text())
    _, processor = mini
    batch = processor([fixtures / "tiling" / "images" / ref["image"]], max_tiles=ref["max_tiles"])
    assert batch["pixel_values"].shape[0] == ref["num_tiles"]


def test_batched_equals_batch_one(mini, fixtures, tmp_path):
    """Images of different tile counts (7, 5, 1, 3) in one left-padded batch give the batch-1 captions."""
    model, processor = mini
    images = [Image.open(p).convert("RGB") for p in sorted((fixtures / "tiling" / "images").iterdir())]
    images += [images[0].resize((640, 640)), images[0].resize((640, 360)), images[1].rotate(90)]
    counts = {processor.tile(im, 6).shape[0] for im in images}
    assert len(counts) >= 3, counts
    settings = GenerationSettings(max_new_tokens=12, min_new_tokens=4)
    one_by_one = [captune.caption_images(model, processor, [im], batch_size=1, settings=settings)[0] for im in images]
    batched = captune.caption_images(model, processor, images, batch_size=len(images), settings=settings)
    assert batched == one_by_one
    assert len(set(one_by_one)) > 1  # different images give different captions, so the check has teeth


def test_cli_caption_bad_image(fixtures, tmp_path, capsys):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes((fixtures / "tiling" / "images" / "scene_640x427.jpg").read_bytes()[:2000])
    code = main(["caption", str(fixtures / "models" / "internvl2_2b_mini"), str(bad), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2
    assert str(bad) in err and "Traceback" not in err


def test_cli_caption_not_a_checkpoint(tmp_path, fixtures, capsys):
    code = main(["caption", str(tmp_path), str(fixtures / "tiling" / "images" / "scene_640x427.jpg")])
    assert code == 2
    assert "no config.json" in capsys.readouterr().err


def test_cli_caption_keeps_one_line_per_image(fixtures, monkeypatch, capsys):
    """A caption with line breaks still prints as one line: a newline as the two characters \\n, a backslash
    doubled (so the line reads back unambiguously)."""
    captions = ["a cat\non a mat", "a dog\\n and a \\ slash\r\n", "plain"]
    monkeypatch.setattr("captune.internvl.load.load", lambda *args, **kwargs: (None, object()))
    monkeypatch.setattr("captune.eval.generate.caption_images", lambda *args, **kwargs: captions)
    image = str(fixtures / "tiling" / "images" / "scene_640x427.jpg")
    assert main(["caption", "some-model", image, image, image]) == 0
    out = capsys.readouterr().out
    assert out.splitlines() == ["a cat\\non a mat", "a dog\\\\n and a \\\\ slash\\r\\n", "plain"]
    assert [line.encode().decode("unicode_escape") for line in out.splitlines()] == captions
