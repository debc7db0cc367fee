"""Ctrl-C during `captune eval`, for real: SIGINT to the whole process group of a `captune eval` running in a child
process (its DataLoader workers included, as a terminal sends it), then the same command again."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from helpers.coco_test_set import write_coco_test_set
from PIL import Image

from captune.cli import main

IMAGES = 40
REFS = ["a picture of a scene", "an image with some shapes", "a scene with colours", "a photo", "some objects"]


def write_test_set(root: Path, fixtures: Path, count: int) -> Path:
    """The tutorial's data/coco layout: `count` small images (different crops of the fixture's scene)."""
    scene = Image.open(fixtures / "tiling" / "images" / "scene_640x427.jpg").convert("RGB")
    return write_coco_test_set(root, [(scene.crop((i * 5, i * 3, i * 5 + 200, i * 3 + 150)), REFS)
                                      for i in range(1, count + 1)])


def complete_lines(path: Path) -> int:
    return path.read_text().count("\n") if path.exists() else 0


def test_ctrl_c_says_what_was_kept_in_one_line_and_the_rerun_resumes(tmp_path, fixtures, monkeypatch, capsys):
    data, out = write_test_set(tmp_path / "coco", fixtures, IMAGES), tmp_path / "out"
    argv = ["eval", str(fixtures / "models" / "internvl2_2b_mini"), "--data", str(data), "--out", str(out),
            "--max-tiles", "1", "--batch-size", "1", "--num-workers", "2", "--device", "cpu"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    child = subprocess.Popen([sys.executable, "-m", "captune", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=env, start_new_session=True)  # its own process group, as a shell's job
    try:
        deadline = time.monotonic() + 240
        while complete_lines(out / "captions.jsonl") < 2 and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert child.poll() is None, f"eval ended before it was interrupted:\n{child.communicate()[1]}"
        os.killpg(child.pid, signal.SIGINT)  # Ctrl-C: the main process and its DataLoader workers
        _, stderr = child.communicate(timeout=120)
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()

    assert child.returncode == 130, stderr
    # The progress bar (redrawn with \r, ended by a newline) aside, stderr is the one line that says what was kept.
    lines = [line for line in stderr.split("\n") if line and not line.lstrip("\r").startswith("captioning")]
    assert len(lines) == 1, stderr
    kept = complete_lines(out / "captions.jsonl")
    assert lines[0] == (f"captune: interrupted: {kept} of {IMAGES} captions kept in {out / 'captions.jsonl'}; "
                        "run the same command again to resume")
    assert 2 <= kept < IMAGES and "Traceback" not in stderr
    captioned = {json.loads(line)["image_id"]: json.loads(line)["caption"]
                 for line in (out / "captions.jsonl").read_text().splitlines()}

    # The same command again (the first kept + 2 images, to be quick; not scored) captions only the images not kept.
    monkeypatch.setattr("captune.eval.evaluate.finish", lambda out, evalset, spice: {})
    assert main([*argv, "--limit", str(kept + 2)]) == 0
    assert f"{kept + 2} images, {kept} already captioned in {out}, 2 to go" in capsys.readouterr().out
    rows = [json.loads(line) for line in (out / "captions.jsonl").read_text().splitlines()]
    assert len(rows) == kept + 2 and {r["image_id"]: r["caption"] for r in rows[:kept]} == captioned
