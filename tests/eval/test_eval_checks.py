"""`captune eval` checks everything its end needs before it starts: a failed start captions nothing and writes
nothing, and it writes only into its own folder (or one it is told to with --force)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from helpers.coco_test_set import write_coco_test_set
from helpers.forbid import forbid

from captune.cli import main

REFS = ["a picture of a scene", "an image with some shapes", "a scene with colours", "a photo", "some objects"]


@pytest.fixture(scope="module")
def data(tmp_path_factory, fixtures) -> Path:
    """The tutorial's data/coco layout with two small images."""
    scene = Image.open(fixtures / "tiling" / "images" / "scene_640x427.jpg").convert("RGB")
    return write_coco_test_set(tmp_path_factory.mktemp("coco"), [(scene.resize((160 * i, 120)), REFS) for i in (1, 2)])


@pytest.fixture
def no_captioning(monkeypatch):
    """Captioning (or loading the model to caption) would be a failure: the start must fail before it."""
    forbid(monkeypatch, ["captune.eval.evaluate.generate_captions", "captune.internvl.load.load"],
           "an image was captioned before the start failed")


def model_without_tokenizer(fixtures: Path, folder: Path) -> Path:
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(fixtures / "models" / "internvl2_2b_mini" / name, folder / name)
    return folder


def test_karpathy_list_as_ground_truth_fails_before_the_first_caption(data, fixtures, tmp_path, no_captioning, capsys):
    """--test-json alone: the Karpathy list is not COCO ground truth, which scoring needs; said at once."""
    out = tmp_path / "out"
    code = main(["eval", str(fixtures / "models" / "internvl2_2b_mini"), "--test-json",
                 str(data / "annotations" / "coco_karpathy_test.json"), "--image-root", str(data), "--out", str(out),
                 "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2
    assert "not COCO caption ground truth" in err and "--gt-json" in err and len(err.splitlines()) == 1
    assert not out.exists()


@pytest.mark.parametrize("case", ["no model", "no tokenizer", "ground truth of other images", "no images",
                                  "out is a file"])
def test_a_failed_start_captions_nothing_and_writes_nothing(case, data, fixtures, tmp_path, monkeypatch,
                                                           no_captioning, capsys):
    """Without --out the run would go to runs/eval-MODEL: a failed start leaves no folder (nor eval.json) there."""
    monkeypatch.chdir(tmp_path)
    model = fixtures / "models" / "internvl2_2b_mini"
    test_json, gt_json = data / "annotations" / "coco_karpathy_test.json", data / "annotations" / "coco_karpathy_test_gt.json"
    image_root, extra, problem = data, [], ""
    if case == "no model":
        model, problem = tmp_path / "not-a-model", "no config.json"
        model.mkdir()
    elif case == "no tokenizer":
        model, problem = model_without_tokenizer(fixtures, tmp_path / "untokenized"), "no tokenizer files"
    elif case == "ground truth of other images":
        gt_json, problem = tmp_path / "other_gt.json", "2 of the 2 test images have no reference captions"
        gt_json.write_text(json.dumps({"images": [{"id": 7}], "annotations": [{"image_id": 7, "caption": "x", "id": 1}]}))
    elif case == "no images":
        image_root, problem = tmp_path / "elsewhere", "none of the 2 test images is there"
        image_root.mkdir()
    else:
        (tmp_path / "out").write_text("a file\n")
        extra, problem = ["--out", str(tmp_path / "out")], "exists and is not a folder"
    code = main(["eval", str(model), "--test-json", str(test_json), "--gt-json", str(gt_json), "--image-root",
                 str(image_root), "--device", "cpu", *extra])
    err = capsys.readouterr().err
    assert code == 2, err
    assert problem in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "runs").exists()
    if case == "out is a file":
        assert (tmp_path / "out").read_text() == "a file\n"


def test_eval_writes_only_into_its_own_folder_unless_forced(data, fixtures, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("captune.eval.evaluate.finish", lambda out, evalset, spice: {})  # no scoring: seconds of java
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")
    argv = ["eval", str(fixtures / "models" / "internvl2_2b_mini"), "--data", str(data), "--out", str(out),
            "--max-tiles", "1", "--num-workers", "0", "--device", "cpu"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "not empty" in err and "--force" in err and len(err.splitlines()) == 1
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]

    assert main([*argv, "--force"]) == 0
    assert (out / "notes.txt").read_text() == "mine\n"
    assert len((out / "captions.jsonl").read_text().splitlines()) == 2 and (out / "eval.json").is_file()
    capsys.readouterr()
    assert main(argv) == 0  # now it is an eval run of its own: the same command resumes it
    assert "2 already captioned" in capsys.readouterr().out


def test_the_default_out_keeps_two_runs_checkpoints_apart(tmp_path):
    from captune.eval.evaluate import default_out

    assert default_out(tmp_path / "pretrained" / "InternVL2-2B") == Path("runs/eval-InternVL2-2B")
    assert default_out(tmp_path / "coco-lora" / "checkpoint-000200") == Path("runs/eval-coco-lora-checkpoint-000200")
    assert default_out(tmp_path / "other" / "checkpoint-000200") == Path("runs/eval-other-checkpoint-000200")
    assert default_out(tmp_path / "coco-lora" / "best") == Path("runs/eval-coco-lora-best")
