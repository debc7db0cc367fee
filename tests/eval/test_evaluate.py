"""`captune eval` end to end on the miniature InternVL2-2B, on the CPU: results, metrics, report, resume."""

from __future__ import annotations

import json
import shutil

import pytest
from helpers.coco_test_set import write_coco_test_set
from PIL import Image

from captune.cli import main
from captune.data.evalsets import coco_image_id, resolve_eval_set
from captune.errors import CaptuneError

REFS = ["a picture of a scene", "an image with some shapes", "a scene with colours", "a photo", "some objects"]


@pytest.fixture(scope="module")
def coco_dir(tmp_path_factory, fixtures):
    """The tutorial's data/coco layout with 5 readable images (different tile counts) and a corrupt one."""
    sources = sorted((fixtures / "tiling" / "images").iterdir())
    pictures = [Image.open(p).convert("RGB") for p in sources]
    pictures += [pictures[0].resize((640, 360)), pictures[1].resize((300, 600))]
    truncated = sources[1].read_bytes()[:1500]
    return write_coco_test_set(tmp_path_factory.mktemp("coco"), [(p, REFS) for p in pictures + [truncated]])


@pytest.fixture(scope="module")
def first_run(coco_dir, fixtures, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "run"
    code = main(["eval", str(fixtures / "models" / "internvl2_2b_mini"), "--data", str(coco_dir), "--out", str(out),
                 "--batch-size", "3", "--num-workers", "0", "--device", "cpu"])
    return code, out


def test_eval_writes_results_metrics_and_report(first_run):
    code, out = first_run
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert [r["image_id"] for r in results] == [1, 2, 3, 4, 5]
    assert all(isinstance(r["caption"], str) and r["caption"] for r in results)
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"Bleu_1", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"} <= set(metrics)
    assert metrics["num_images"] == 5 and metrics["num_skipped"] == 1
    skipped = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert [s["image_id"] for s in skipped] == [6] and "COCO_val2014_000000000006.jpg" in skipped[0]["reason"]
    html = (out / "report.html").read_text()
    assert all(r["caption"] in html for r in results)


def test_eval_resumes_after_an_interruption(first_run, coco_dir, fixtures, capsys):
    _, out = first_run
    resumed = out.parent / "resumed"
    shutil.copytree(out, resumed)
    for f in ("results.json", "metrics.json", "report.html"):
        (resumed / f).unlink()
    lines = (resumed / "captions.jsonl").read_text().splitlines(keepends=True)
    # two complete captions survive, the third was being written when the process died
    (resumed / "captions.jsonl").write_text("".join(lines[:2]) + lines[2][:10])
    code = main(["eval", str(fixtures / "models" / "internvl2_2b_mini"), "--data", str(coco_dir), "--out", str(resumed),
                 "--batch-size", "2", "--num-workers", "0", "--device", "cpu"])
    assert code == 0
    assert "2 already captioned" in capsys.readouterr().out
    assert json.loads((resumed / "results.json").read_text()) == json.loads((out / "results.json").read_text())


def test_eval_refuses_to_mix_settings(first_run, coco_dir, fixtures, capsys):
    _, out = first_run
    code = main(["eval", str(fixtures / "models" / "internvl2_2b_mini"), "--data", str(coco_dir), "--out", str(out),
                 "--max-tiles", "2", "--device", "cpu"])
    assert code == 2
    assert "max_tiles 6 -> 2" in capsys.readouterr().err


def test_resume_takes_another_ground_truth_file(first_run, coco_dir, fixtures, tmp_path, monkeypatch, capsys):
    """The ground truth only scores the captions: a rerun naming it (or another copy of it) resumes the run."""
    monkeypatch.setattr("captune.eval.evaluate.finish", lambda out, evalset, spice: {})  # no scoring: seconds of java
    _, out = first_run
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    gt = shutil.copy(coco_dir / "annotations" / "coco_karpathy_test_gt.json", tmp_path / "my_gt.json")
    code = main(["eval", str(fixtures / "models" / "internvl2_2b_mini"), "--test-json",
                 str(coco_dir / "annotations" / "coco_karpathy_test.json"), "--gt-json", str(gt), "--image-root",
                 str(coco_dir), "--out", str(resumed), "--num-workers", "0", "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    assert "5 already captioned" in capsys.readouterr().out


def test_skipped_images_captioned_by_a_rerun_are_no_longer_listed(first_run, coco_dir, fixtures, tmp_path,
                                                                  monkeypatch):
    """The corrupt image 6, repaired, is captioned by the rerun: skipped.jsonl and metrics.json both say none is
    skipped now."""
    from captune.eval.scoring import ScoreReport

    def fake_score(results, gt, spice=False, progress=False):  # the scorers' numbers do not matter here
        return ScoreReport({"CIDEr": 1.0}, {r["image_id"]: {"CIDEr": 1.0} for r in results}, len(results))

    monkeypatch.setattr("captune.eval.scoring.score_captions", fake_score)
    _, out = first_run
    rerun, images = tmp_path / "rerun", tmp_path / "images"
    shutil.copytree(out, rerun)
    shutil.copytree(coco_dir, images)
    shutil.copy(coco_dir / "val2014" / "COCO_val2014_000000000001.jpg", images / "val2014" / "COCO_val2014_000000000006.jpg")
    code = main(["eval", str(fixtures / "models" / "internvl2_2b_mini"), "--data", str(coco_dir), "--image-root",
                 str(images), "--out", str(rerun), "--num-workers", "0", "--device", "cpu"])
    assert code == 0
    assert [r["image_id"] for r in json.loads((rerun / "results.json").read_text())] == [1, 2, 3, 4, 5, 6]
    assert json.loads((rerun / "metrics.json").read_text())["num_skipped"] == 0
    assert not (rerun / "skipped.jsonl").exists() or not (rerun / "skipped.jsonl").read_text().strip()


def test_cli_score_matches_eval(first_run, coco_dir, capsys):
    _, out = first_run
    code = main(["score", str(out / "results.json"), str(coco_dir / "annotations" / "coco_karpathy_test_gt.json")])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    printed = capsys.readouterr().out
    assert f"CIDEr: {metrics['CIDEr']:.3f}" in printed


def test_flickr_style_test_set(tmp_path, coco_dir):
    data = {"images": [{"id": 7, "file_name": "a.jpg"}, {"id": 9, "image": "b.jpg"}], "annotations": []}
    (tmp_path / "flickr30k_test_karpathy.json").write_text(json.dumps(data))
    evalset = resolve_eval_set(test_json=tmp_path / "flickr30k_test_karpathy.json")
    assert [(im.image_id, im.path.name) for im in evalset.images] == [(7, "a.jpg"), (9, "b.jpg")]
    assert evalset.gt_path == tmp_path / "flickr30k_test_karpathy.json"


def test_coco_image_id_from_file_name():
    assert coco_image_id("val2014/COCO_val2014_000000391895.jpg") == 391895


def test_missing_annotation_file(tmp_path):
    with pytest.raises(CaptuneError, match="coco_karpathy_test.json"):
        resolve_eval_set(data=tmp_path)


# ------------------------------------------------------------------- the settings of InternVL's evaluate_caption.py


@pytest.fixture(scope="module")
def reference_eval(fixtures, tmp_path_factory):
    """`captune eval` on the 2B miniature and the fixture's own image file, default settings, with every call of
    the decoder recorded: what the evaluation path really feeds the model."""
    from captune.eval.greedy import GreedyDecoder

    ref = json.loads((fixtures / "models" / "internvl2_2b_mini" / "chat_reference.json").read_text())
    images = fixtures / "tiling" / "images"
    root = tmp_path_factory.mktemp("reference-eval")
    (root / "test.json").write_text(json.dumps({"images": [{"id": 1, "file_name": ref["image"]}]}))
    (root / "gt.json").write_text(json.dumps({"images": [{"id": 1}], "annotations": [
        {"image_id": 1, "id": k, "caption": c} for k, c in enumerate(REFS)]}))
    calls = []
    real_start = GreedyDecoder.start

    def recording_start(self, padded=None, **inputs):
        calls.append({**{k: v.clone() for k, v in inputs.items()},
                      "settings": (self.stop, self.min_new, self.max_new)})
        return real_start(self, padded=padded, **inputs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(GreedyDecoder, "start", recording_start)
        code = main(["eval", str(fixtures / "models" / "internvl2_2b_mini"), "--test-json", str(root / "test.json"),
                     "--gt-json", str(root / "gt.json"), "--image-root", str(images), "--out", str(root / "out"),
                     "--num-workers", "0", "--device", "cpu"])
    assert code == 0
    return ref, calls, json.loads((root / "out" / "results.json").read_text())


def test_eval_path_writes_the_original_caption(reference_eval):
    """The caption the original `model.chat()` wrote (greedy, 8-30 tokens, 6 tiles + thumbnail, float32)."""
    ref, _, results = reference_eval
    assert results == [{"image_id": 1, "caption": ref["caption"]}]


def test_eval_prompt_is_the_original_query(reference_eval, fixtures):
    """The question, the template and 6 tiles + thumbnail: the prompt ids equal the original's, token for token."""
    _, calls, _ = reference_eval
    original = json.loads((fixtures / "tokenization_reference.json").read_text())["chat_queries"]["internlm2-chat"]
    assert len(calls) == 1
    ids, mask = calls[0]["input_ids"], calls[0]["attention_mask"]
    assert ids[mask.bool()].tolist() == original["input_ids"]
    assert calls[0]["pixel_values"].shape[0] == 7  # 3 x 2 tiles of 640x427 + the thumbnail


def test_eval_decodes_as_the_original(reference_eval, fixtures):
    """InternVL's evaluate_caption.py: greedy (the decoder's tokens are `generate`'s with do_sample=False, one beam:
    tests/eval/test_greedy.py), 8 to 30 new tokens, stop at <|im_end|>."""
    _, calls, _ = reference_eval
    stop, min_new, max_new = calls[0]["settings"]
    assert (min_new, max_new) == (8, 30)
    assert stop == 92542  # <|im_end|> in InternLM2's vocabulary
