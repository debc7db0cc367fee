"""`captune.eval.compare.compare`: two eval folders of one test set in one self-contained page, metrics with their
differences, then the changed captions, worst regression first and best improvement first.

Most tests give each caption a fixed CIDEr (`fixed_cider`) so that no Java runs; `test_real_eval_folders...` compares
folders written by `captune eval`'s own code with the real scorer, and the browser test renders the page in headless
Chromium (skipped, saying why, without one: tests/helpers/browser.py).
"""

from __future__ import annotations

import argparse
import html
import json
import re
from pathlib import Path

import pytest
from helpers.browser import find_chromium, render
from PIL import Image

import captune.eval.compare as compare_module
from captune import cli_args
from captune.errors import CaptuneError
from captune.eval.compare import compare, per_image_cider, read_run

TRICKY = 'a <b>bold</b> & "quoted" dog'
REFERENCES = {i: [f"reference {i}.{k} & <{k}>" for k in range(5)] for i in range(1, 7)}
# image -> (caption in A, CIDEr in A, caption in B, CIDEr in B)
CASES = {
    1: ("a cat on a sofa", 1.0, "a cat on a sofa", 1.0),           # unchanged
    2: (TRICKY, 0.9, "a red car", 0.1),                            # the worst regression: -0.8
    3: ("two birds", 0.5, "two small birds", 0.3),                 # a regression: -0.2
    4: ("a boat", 0.2, "a boat on a lake", 1.7),                   # the best improvement: +1.5
    5: ("a man", 0.4, "a man riding a horse", 0.6),                # an improvement: +0.2
    6: ("a plane", 0.7, "an airplane", 0.7),                       # changed, same CIDEr
}
METRICS_A = {"Bleu_1": 0.5, "Bleu_4": 0.25, "METEOR": 0.2, "ROUGE_L": 0.5, "CIDEr": 0.793}
METRICS_B = {"Bleu_1": 0.6, "Bleu_4": 0.25, "METEOR": 0.19, "ROUGE_L": 0.5, "CIDEr": 1.312}


def write_gt(path: Path, references: dict[int, list[str]]) -> Path:
    images = [{"id": i, "file_name": f"{i}.jpg"} for i in references]
    annotations = [{"image_id": i, "id": 10 * i + k, "caption": c} for i, refs in references.items()
                   for k, c in enumerate(refs)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"images": images, "annotations": annotations}))
    return path


def write_images(folder: Path, ids) -> dict[int, Path]:
    """A readable JPEG per image, but for image 3 (its file is missing: a placeholder)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for i in ids:
        paths[i] = folder / f"{i}.jpg"
        if i != 3:
            Image.new("RGB", (300 + 40 * i, 200), (40 * i, 120, 200 - 20 * i)).save(paths[i])
    return paths


def write_run(folder: Path, captions: dict[int, str], gt: Path, images: dict[int, Path], metrics: dict,
              older: bool = False) -> Path:
    """An eval folder as `captune eval` leaves it (eval.json, captions.jsonl, results.json, metrics.json); `older`:
    eval.json as captune wrote it before it had gt_json (the references file was test_json)."""
    folder.mkdir(parents=True)
    gt_json = str(gt.resolve())
    files = {"test_json": gt_json} if older else {"test_json": "/data/test.json", "gt_json": gt_json}
    (folder / "eval.json").write_text(json.dumps({"model": f"/models/{folder.name}", **files, "dtype": "bf16"}))
    (folder / "captions.jsonl").write_text("".join(
        json.dumps({"image_id": i, "image": str(images[i]), "caption": c}) + "\n" for i, c in captions.items()))
    results = [{"image_id": i, "caption": c} for i, c in sorted(captions.items())]
    (folder / "results.json").write_text(json.dumps(results))
    (folder / "metrics.json").write_text(json.dumps({**metrics, "num_images": len(captions), "num_skipped": 0}))
    (folder / "report.html").write_text("<html></html>")
    return folder


def fixed_cider(runs, references):
    """Stands in for per_image_cider: CASES' CIDEr of each run's caption (A first, then B)."""
    return [{i: CASES[i][1 + 2 * k] for i in references} for k in range(len(runs))]


@pytest.fixture
def runs(tmp_path, monkeypatch) -> tuple[Path, Path]:
    monkeypatch.setattr(compare_module, "per_image_cider", fixed_cider)
    gt = write_gt(tmp_path / "data" / "gt.json", REFERENCES)
    images = write_images(tmp_path / "data" / "images", REFERENCES)
    a = write_run(tmp_path / "eval-base", {i: c[0] for i, c in CASES.items()}, gt, images, METRICS_A, older=True)
    b = write_run(tmp_path / "eval-lora", {i: c[2] for i, c in CASES.items()}, gt, images, METRICS_B)
    return a, b


def card_ids(page: str) -> list[int]:
    return [int(i) for i in re.findall(r'<div class="card" id="image-(\d+)">', page)]


def test_metrics_with_deltas_then_regressions_worst_first_then_improvements_best_first(runs, tmp_path, capsys):
    out = compare(*runs, out=tmp_path / "pages" / "compare.html")
    page = out.read_text()

    assert out == tmp_path / "pages" / "compare.html"
    assert "<tr><td>CIDEr</td><td>0.793</td><td>1.312</td><td><span class=\"up\">+0.519</span></td></tr>" in page
    assert "<tr><td>METEOR</td><td>0.200</td><td>0.190</td><td><span class=\"down\">-0.010</span></td></tr>" in page
    assert "<tr><td>Bleu_4</td><td>0.250</td><td>0.250</td><td><span class=\"\">+0.000</span></td></tr>" in page
    assert page.index("<td>Bleu_1</td>") < page.index("<td>METEOR</td>") < page.index("<td>CIDEr</td>")
    assert "num_images" not in page and "num_skipped" not in page

    assert card_ids(page) == [2, 3, 4, 5], "regressions worst first, then improvements best first"
    assert page.index("Regressions, worst first (2 of 2)") < page.index("Improvements, best first (2 of 2)")
    assert "6 images of" in page and "5 captions changed, 2 with a lower CIDEr in B, 2 with a higher one, 1 with the " \
        "same; 1 unchanged" in page

    card = page[page.index('id="image-2"'):page.index('id="image-3"')]
    assert html.escape(TRICKY) in card and TRICKY not in page and "a red car" in card
    assert 'CIDEr 0.900 → 0.100 (<span class="down">-0.800</span>)' in card
    assert all(f"<li>{html.escape(ref)}</li>" in card for ref in REFERENCES[2])
    assert 'CIDEr 0.200 → 1.700 (<span class="up">+1.500</span>)' in page

    said = capsys.readouterr().out
    assert "CIDEr:    0.793 -> 1.312 (+0.519)" in said and "5 captions changed: 2 worse by CIDEr, 2 better, 1 equal" \
        in said and f"wrote {out}" in said


def test_only_the_most_changed_are_shown(runs, tmp_path, monkeypatch):
    monkeypatch.setattr(compare_module, "SHOWN", 1)
    page = compare(*runs, out=tmp_path / "compare.html").read_text()
    assert card_ids(page) == [2, 4]
    assert "Regressions, worst first (1 of 2)" in page and "Improvements, best first (1 of 2)" in page


def test_page_is_one_self_contained_file_written_atomically(runs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = compare(*runs)  # default: compare.html here
    assert out == Path("compare.html") and out.is_file()
    page = out.read_text()
    assert not re.search(r"(src|href)=\"(https?:)?//", page) and "<link" not in page and "@import" not in page
    sources = re.findall(r'<img [^>]*src="([^"]+)"', page)
    assert len(sources) == 3 and all(s.startswith("data:image/jpeg;base64,") for s in sources)
    assert page.count('class="placeholder"') == 1  # image 3's file is missing

    (tmp_path / "eval-lora" / "results.json").write_text(json.dumps(
        [{"image_id": i, "caption": CASES[i][0] if i == 2 else CASES[i][2]} for i in CASES]))
    page = compare(*runs).read_text()  # rewritten in place: image 2's caption no longer changed
    assert card_ids(page) == [3, 4, 5]
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["compare.html"], "no temporary files left"


def test_folders_that_are_not_finished_eval_runs_are_one_line_errors(runs, tmp_path):
    a, b = runs
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    for folder, problem in [(tmp_path / "nowhere", "not a folder"),
                            (model, "not a captune eval output folder (no eval.json")]:
        with pytest.raises(CaptuneError, match=re.escape(problem)) as e:
            compare(a, folder, out=tmp_path / "c.html")
        assert str(folder) in str(e.value) and "\n" not in str(e.value)
    (b / "metrics.json").unlink()
    with pytest.raises(CaptuneError, match=r"an unfinished evaluation \(no metrics.json") as e:
        compare(a, b, out=tmp_path / "c.html")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "c.html").exists()


def test_runs_of_different_test_sets_are_one_line_errors(runs, tmp_path):
    a, _ = runs
    gt = tmp_path / "data" / "gt.json"
    images = write_images(tmp_path / "other-images", REFERENCES)
    limited = write_run(tmp_path / "eval-limit", {i: CASES[i][2] for i in (1, 2, 3)}, gt, images, METRICS_B)
    with pytest.raises(CaptuneError, match=r"evaluated different test sets \(6 images of .*gt.json, 3 of .*gt.json, "
                                           r"3 in common\)") as e:
        compare(a, limited, out=tmp_path / "c.html")
    assert "\n" not in str(e.value)

    other_refs = {**REFERENCES, 4: ["a different reference"] * 5}
    other_gt = write_gt(tmp_path / "other" / "gt.json", other_refs)
    other = write_run(tmp_path / "eval-other", {i: c[2] for i, c in CASES.items()}, other_gt, images, METRICS_B)
    with pytest.raises(CaptuneError, match=r"the same 6 images, but 1 with other references .* e.g. image 4"):
        compare(a, other, out=tmp_path / "c.html")

    copied = write_run(tmp_path / "eval-copy", {i: c[2] for i, c in CASES.items()},
                       write_gt(tmp_path / "copy" / "gt.json", REFERENCES), images, METRICS_B)
    assert card_ids(compare(a, copied, out=tmp_path / "c.html").read_text()) == [2, 3, 4, 5], \
        "the same references in another file are the same test set"

    (tmp_path / "copy" / "gt.json").unlink()
    with pytest.raises(CaptuneError, match="references file of .*eval-copy .* is not found"):
        compare(a, copied, out=tmp_path / "c.html")


def test_the_command_line_is_generated_from_the_signature():
    parser = argparse.ArgumentParser()
    cli_args.add_command(parser.add_subparsers(dest="command"), "compare", compare)
    args = parser.parse_args(["compare", "runs/a", "runs/b", "--out", "x.html"])
    assert (args.run_a, args.run_b, args.out) == (Path("runs/a"), Path("runs/b"), Path("x.html"))
    assert parser.parse_args(["compare", "runs/a", "runs/b"]).out is None


@pytest.mark.slow
def test_real_eval_folders_and_their_per_image_cider(tmp_path, monkeypatch):
    """Two folders written by `captune eval`'s own code (METEOR stubbed: it takes 10 s and compare never reads it);
    compare's per-image CIDEr is exactly what the scorer gave each image in report.html."""
    import pycocoevalcap.meteor.meteor

    import captune.eval.scoring
    from captune.data.evalsets import EvalImage, EvalSet
    from captune.eval.evaluate import EvalSettings, finish, start_run

    class NoMeteor:
        def compute_score(self, gts, res):
            return 0.0, [0.0] * len(gts)

        def method(self):
            return "METEOR"

    scored = []
    real_score = captune.eval.scoring.score_captions

    def recording_score(*args, **kwargs):
        scored.append(real_score(*args, **kwargs))
        return scored[-1]

    monkeypatch.setattr(pycocoevalcap.meteor.meteor, "Meteor", NoMeteor)
    monkeypatch.setattr(captune.eval.scoring, "score_captions", recording_score)
    references = {1: ["a red circle on a white background", "one red circle", "a red round shape on white",
                      "a circle coloured red", "a single red circle on white"],
                  2: ["two blue squares on a green background", "blue squares on green", "two squares, blue, on green",
                      "a pair of blue squares", "two blue boxes on a green field"],
                  3: ["a yellow star on a black background", "one yellow star", "a star, yellow, on black",
                      "a yellow star shape on black", "a single yellow star on a dark background"]}
    gt = write_gt(tmp_path / "gt.json", references)
    images = write_images(tmp_path / "images", references)
    evalset = EvalSet(images=[EvalImage(i, images[i]) for i in references], gt_path=gt)
    captions = [{1: "a red circle on white", 2: "blue squares", 3: "a star"},
                {1: "a red circle on white", 2: "two blue squares on green", 3: "a black background"}]
    folders = []
    for name, by_image in zip(("eval-a", "eval-b"), captions):
        out = tmp_path / name
        start_run(out, EvalSettings(model=str(tmp_path / name), test_json=str(gt)), str(gt), force=False)
        (out / "captions.jsonl").write_text("".join(json.dumps({"image_id": i, "image": str(images[i]),
                                                                "caption": c}) + "\n" for i, c in by_image.items()))
        finish(out, evalset, spice=False)
        folders.append(out)

    run_a, run_b = (read_run(f) for f in folders)
    assert run_a.images == {i: str(p) for i, p in images.items()}
    cider_a, cider_b = per_image_cider([run_a.captions, run_b.captions], references)
    assert cider_a == {i: s["CIDEr"] for i, s in scored[0].per_image.items()}
    assert cider_b == {i: s["CIDEr"] for i, s in scored[1].per_image.items()}

    page = compare(*folders, out=tmp_path / "compare.html").read_text()
    delta = {i: cider_b[i] - cider_a[i] for i in (2, 3)}
    assert card_ids(page) == sorted((2, 3), key=lambda i: (delta[i] >= 0, -abs(delta[i])))
    metrics = [json.loads((f / "metrics.json").read_text()) for f in folders]
    cider_row = f"<td>{metrics[0]['CIDEr']:0.3f}</td><td>{metrics[1]['CIDEr']:0.3f}</td>"
    assert f"<tr><td>CIDEr</td>{cider_row}" in page
    assert f"CIDEr {cider_a[2]:0.3f} → {cider_b[2]:0.3f}" in page


@pytest.mark.slow
def test_chromium_renders_the_page_with_every_thumbnail(runs, tmp_path):
    chromium = find_chromium()
    page = compare(*runs, out=tmp_path / "compare.html")
    # cards 2, 4 and 5 have images; 3's is missing
    assert render(chromium, tmp_path / "profile", page, tmp_path / "shot.png") == 3
