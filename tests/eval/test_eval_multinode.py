"""`captune eval` on two nodes, simulated by two torchrun launches on this machine (one CPU process each, gloo,
rendezvous on 127.0.0.1): the captions of one process, gathered and scored once (by global rank 0)."""

from __future__ import annotations

import json

import pytest
from helpers.coco_test_set import write_coco_test_set
from helpers.multinode import succeeded, two_nodes
from helpers.tiny_captions import write_tiny_captions

from captune.cli import main
from captune.eval.captions import read_jsonl


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny InternVL2 and the tutorial's data/coco layout around five of its drawings and a truncated JPEG; returns
    (model folder, data folder)."""
    root, model, rows = write_tiny_captions(tmp_path_factory.mktemp("tiny"))
    images = []
    for i in range(6):
        jpeg = (root / "images" / f"{i}.jpg").read_bytes()
        images.append((jpeg if i < 5 else jpeg[:300], [r["caption"] for r in rows if r["image"] == f"images/{i}.jpg"]))
    return model, write_coco_test_set(root / "coco", images)


def captions(out) -> list[dict]:
    """Every caption row written to OUT, by any process, in image order."""
    rows = [row for path in out.glob("captions*.jsonl") for row in read_jsonl(path)]
    return sorted(rows, key=lambda r: r["image_id"])


@pytest.mark.slow
def test_eval_on_two_nodes_gives_the_captions_of_one_process_gathered_once(tiny, tmp_path, monkeypatch):
    """Each node captions its share (the truncated image falls to node 1); global rank 0 alone gathers every node's
    captions and skipped images into results.json, scores them, writes the report and prints."""
    from captune.eval.scoring import ScoreReport

    model, coco = map(str, tiny)
    args = ["--data", coco, "--max-tiles", "2", "--batch-size", "3", "--num-workers", "0", "--device", "cpu"]
    nodes = (tmp_path / "node0", tmp_path / "node1")
    for node in nodes:
        node.mkdir()
    two = tmp_path / "two"
    runs = succeeded(two_nodes(["eval", model, *args, "--out", str(two)], nodes))

    def no_scoring(results, gt, spice=False, progress=False):  # the reference's captions are what is compared
        return ScoreReport({"CIDEr": 0.0}, {}, len(results))

    monkeypatch.setattr("captune.eval.scoring.score_captions", no_scoring)
    one = tmp_path / "one"
    assert main(["eval", model, *args, "--out", str(one)]) == 0

    assert sorted(p.name for p in two.glob("captions*.jsonl")) == ["captions.rank0.jsonl", "captions.rank1.jsonl"]
    assert captions(two) == captions(one)
    assert [r["image_id"] for r in captions(two)] == [1, 2, 3, 4, 5]
    assert json.loads((two / "results.json").read_text()) == json.loads((one / "results.json").read_text())
    assert (two / "skipped.jsonl").read_text() == (one / "skipped.jsonl").read_text()
    metrics = json.loads((two / "metrics.json").read_text())
    assert metrics["num_images"] == 5 and metrics["num_skipped"] == 1 and "CIDEr" in metrics
    assert (two / "report.html").is_file()
    printed = [r.stdout.count("captune eval: report in") for r in runs]
    assert printed == [1, 0], printed  # --node-rank 0 holds global rank 0


@pytest.mark.slow
def test_an_output_folder_that_is_not_shared_is_refused_on_every_node(tiny, tmp_path, monkeypatch):
    """--out relative to each node's own folder, and node 0's already holds an evaluation: the nodes would split
    different lists of images (or wait for each other). Every node stops with the same one-line error; nothing is
    written on either."""
    from captune.eval.scoring import ScoreReport

    model, coco = map(str, tiny)
    args = ["--data", coco, "--max-tiles", "2", "--batch-size", "3", "--num-workers", "0", "--device", "cpu"]
    nodes = (tmp_path / "node0", tmp_path / "node1")
    for node in nodes:
        node.mkdir()
    monkeypatch.setattr("captune.eval.scoring.score_captions",
                        lambda results, gt, spice=False, progress=False: ScoreReport({"CIDEr": 0.0}, {}, len(results)))
    assert main(["eval", model, *args, "--out", str(nodes[0] / "run")]) == 0
    before = {p.name: p.read_bytes() for p in (nodes[0] / "run").iterdir() if p.is_file()}
    runs = two_nodes(["eval", model, *args, "--out", "run"], nodes)
    for run in runs:
        assert run.returncode != 0, run.stderr[-3000:]
        assert "captune: error: the processes see different files (rank 0: 6 images, 5 captioned in run; " \
               "rank 1: 6 images, 0 captioned in run)" in run.stderr, run.stderr[-3000:]
    assert {p.name: p.read_bytes() for p in (nodes[0] / "run").iterdir() if p.is_file()} == before
    assert list(nodes[1].iterdir()) == []
