"""`captune demo` end to end at a reduced size: every step runs, the merged folder captions with plain
transformers, and fine-tuning raises CIDEr."""

from __future__ import annotations

from captune.cli import main
from captune.demo.demo import demo


def test_demo_end_to_end(tmp_path, capsys):
    result = demo(str(tmp_path / "demo"), train_images=100, test_images=20, epochs=8)
    out = capsys.readouterr().out
    assert result["after"]["CIDEr"] > result["before"]["CIDEr"] + 0.2
    assert "[6/6] caption with plain transformers" in out and "CIDEr" in out
    for f in ("eval-base/report.html", "eval-finetuned/report.html", "merged/config.json", "run/captune.yaml"):
        assert (tmp_path / "demo" / f).is_file(), f


def test_demo_refuses_a_non_empty_out(tmp_path, capsys):
    (tmp_path / "x").write_text("mine")
    assert main(["demo", "--out", str(tmp_path)]) == 2
    assert "not empty" in capsys.readouterr().err
