"""The start of `captune train` (train/start.py): every input checked before anything is written, a failed start
leaves nothing behind, a folder that holds something else is refused, a resumed run says what changed (and refuses
what would make it another run), and starting again never mixes two runs' checkpoints."""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from helpers.tiny_captions import write_tiny_captions
from safetensors.torch import load_file

from captune.cli import main
from captune.errors import CaptuneError
from captune.train import config as cfg
from captune.train.runlog import read_log
from captune.train.state import TRAINER_STATE, list_checkpoints, prune_checkpoints


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return write_tiny_captions(tmp_path_factory.mktemp("data"))


def command(root: Path, model: Path, out: Path, *options: str) -> list[str]:
    return ["train", "--model", str(model), "--data", str(root / "train.jsonl"), "--out", str(out), "--recipe",
            "tiny_cpu_lora", "--max-steps", "2", "--save-every", "1", "--global-batch-size", "16", *options]


PROGRESS = re.compile(r"^[\w ]+: .*\[\d+:\d\d")  # a tqdm bar: "checking images: 100%|...| 8/8 [00:00<00:00, ...]"


def one_error(capsys) -> str:
    """stderr, progress bars aside: one line, the error."""
    err = capsys.readouterr().err
    lines = [line for line in re.split(r"[\r\n]", err) if line.strip() and not PROGRESS.match(line)]
    assert len(lines) == 1 and lines[0].startswith("captune: error: ") and err.endswith("\n"), err
    return lines[0]


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every path under `folder` with the bytes of its files (train.log, which a start may append to, aside)."""
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None
            for p in sorted(folder.rglob("*")) if p.name != "train.log"}


@pytest.fixture
def model_never_loaded(monkeypatch):
    """A start that fails on its data must not have loaded the model first."""
    import captune.internvl.load

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr(captune.internvl.load, "load", refuse)


# ------------------------------------------------------------------------------------------- 1. inputs checked first


def bad_inputs(root: Path, model: Path, tmp: Path) -> dict[str, tuple[dict, str]]:
    """case: (what replaces --model/--data/--out, the error's end)."""
    no_config = tmp / "no-config"
    no_config.mkdir()
    no_tokenizer = tmp / "no-tokenizer"
    shutil.copytree(model, no_tokenizer, ignore=shutil.ignore_patterns("tokenizer*"))
    (tmp / "empty.jsonl").write_text("\n  \n")
    (tmp / "a-file").write_text("not a folder")
    return {
        "model missing": ({"--model": str(tmp / "nope")}, "no such folder"),
        "model without config.json": ({"--model": str(no_config)}, "no config.json: not a checkpoint folder"),
        "model without tokenizer": ({"--model": str(no_tokenizer)}, "has no tokenizer files"),
        "data missing": ({"--data": str(tmp / "nope.jsonl")}, "no such file or folder"),
        "data empty": ({"--data": str(tmp / "empty.jsonl")}, "is empty: no training samples"),
        "out is a file": ({"--out": str(tmp / "a-file")}, "exists and is not a folder"),
        "out under a file": ({"--out": str(tmp / "a-file" / "run")}, "is not a folder"),
        "image root missing": ({"--image-root": str(tmp / "nope")}, "--image-root: no such folder"),
        "eval-every on a jsonl": ({"--eval-every": "1"}, "cannot stand in"),
    }


CASES = ["model missing", "model without config.json", "model without tokenizer", "data missing", "data empty",
         "out is a file", "out under a file", "image root missing", "eval-every on a jsonl"]


@pytest.mark.parametrize("case", CASES)
def test_bad_inputs_are_one_line_and_nothing_is_written(tiny_data, tmp_path, capsys, model_never_loaded, case):
    root, model, _ = tiny_data
    options, message = bad_inputs(root, model, tmp_path)[case]
    argv = command(root, model, tmp_path / "runs" / "run")
    for key, value in options.items():
        if key in argv:
            argv[argv.index(key) + 1] = value
        else:
            argv += [key, value]
    before = snapshot(tmp_path)
    assert main(argv) == 2
    assert message in one_error(capsys)
    assert snapshot(tmp_path) == before  # no runs/, no captune.yaml, logs or tensorboard/ anywhere


def test_data_is_read_before_the_model_and_a_failed_start_is_undone(tiny_data, tmp_path, capsys, model_never_loaded):
    """A data file with no usable sample fails when it is read, after the folder was made and before the model is
    loaded; the folder (and the parents the start made) are removed again. An existing folder is left as it was."""
    root, model, _ = tiny_data
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "nope.jpg", "caption": "a red circle"}\n{not json\n')
    argv = command(root, model, tmp_path / "runs" / "a" / "run", "--data", str(bad))
    assert main(argv) == 2
    assert "no usable training samples" in one_error(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]

    (tmp_path / "empty").mkdir()
    assert main(command(root, model, tmp_path / "empty", "--data", str(bad))) == 2
    assert list((tmp_path / "empty").iterdir()) == []


def test_a_failed_start_leaves_a_run_as_it_was(tiny_data, tmp_path, capsys, monkeypatch):
    """A resume that fails in its start-up (here: loading the model) changes nothing of the run: captune.yaml, the
    checkpoints and the logs are those of the run before."""
    import captune.internvl.load

    root, model, _ = tiny_data
    out = tmp_path / "run"
    assert main(command(root, model, out)) == 0
    before = snapshot(out)

    def broken(*args, **kwargs):
        raise CaptuneError("shard unreadable", model)

    monkeypatch.setattr(captune.internvl.load, "load", broken)
    capsys.readouterr()
    assert main(command(root, model, out, "--max-steps", "3", "--save-every", "2")) == 2
    assert "shard unreadable" in one_error(capsys)
    assert snapshot(out) == before


# ------------------------------------------------------------------------- 2. a folder that holds something else


def test_a_folder_that_holds_something_else_is_refused_unless_force(tiny_data, tmp_path, capsys):
    root, model, _ = tiny_data
    out = tmp_path / "notes"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(command(root, model, out)) == 2
    assert "holds other files and no run (no captune.yaml)" in one_error(capsys)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]

    assert main(command(root, model, out, "--force")) == 0
    assert (out / "notes.txt").read_text() == "mine" and [s for s, _ in list_checkpoints(out)] == [1, 2]
    capsys.readouterr()
    assert main(command(root, model, out, "--max-steps", "3")) == 0  # now it holds this run: resumed, no --force
    assert f"resumed from {out / 'checkpoint-000002'}" in (out / "train.log").read_text()


# ----------------------------------------------------------------------------------------- 3. what a resume changes


def test_every_option_is_classified_for_resuming():
    from captune.train import start

    classes = [start.SHAPE, start.IDENTITY, start.CONTINUABLE, start.COMMAND]
    named = [k for c in classes for k in c]
    assert sorted(named) == sorted(f.name for f in fields(cfg.TrainConfig)), "classify the new option in start.py"


def test_resuming_says_what_changed_and_refuses_another_run(tiny_data, tmp_path, capsys):
    root, model, _ = tiny_data
    out = tmp_path / "run"
    assert main(command(root, model, out)) == 0
    capsys.readouterr()

    assert main(command(root, model, out, "--learning-rate", "1e-3", "--seed", "7", "--max-steps", "3")) == 2
    err = one_error(capsys)
    assert "holds a run with other settings (--learning-rate 0.002 -> 0.001, --seed 42 -> 7)" in err
    assert "pass --allow-changes" in err and [s for s, _ in list_checkpoints(out)] == [1, 2]

    assert main(command(root, model, out, "--max-steps", "3", "--log-every", "2", "--num-workers", "1")) == 0
    log = (out / "train.log").read_text()
    assert f"resumed from {out / 'checkpoint-000002'} at step 2" in log
    assert "changed since the run was last started: --max-steps 2 -> 3, --num-workers 0 -> 1, --log-every 5 -> 2" \
        in log
    assert cfg.load_run_config(out).max_steps == 3


def test_a_run_resumes_from_another_folder_with_its_paths_named_otherwise(tiny_data, tmp_path, monkeypatch, capsys):
    """captune.yaml records absolute paths: the same run, resumed from another working folder (a Slurm job) with
    relative paths, is the same run."""
    root, model, _ = tiny_data
    (tmp_path / "a" / "b").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "a")
    def rel(path: Path) -> Path:
        return Path(os.path.relpath(path))

    assert main(command(rel(root), rel(model), Path("run"))) == 0
    assert cfg.load_run_config(tmp_path / "a" / "run").model == str(model.resolve())
    monkeypatch.chdir(tmp_path / "a" / "b")
    capsys.readouterr()
    assert main(command(rel(root), rel(model), Path("../run"), "--max-steps", "3")) == 0, capsys.readouterr().err
    log = (tmp_path / "a" / "run" / "train.log").read_text()
    assert "changed since the run was last started: --max-steps 2 -> 3" in log


def test_image_paths_relative_to_another_folder_take_image_root(tiny_data, tmp_path, capsys):
    """A jsonl kept apart from its images (paths relative to ROOT): --image-root ROOT, as `captune data check`."""
    root, model, rows = tiny_data
    apart = tmp_path / "annotations"
    apart.mkdir()
    shutil.copy(root / "train.jsonl", apart / "train.jsonl")
    argv = command(root, model, tmp_path / "run")
    argv[argv.index("--data") + 1] = str(apart / "train.jsonl")
    assert main([*argv, "--image-root", str(root)]) == 0, capsys.readouterr().err
    assert f"{len(rows)} captions of 8 images" in (tmp_path / "run" / "train.log").read_text()
    assert cfg.load_run_config(tmp_path / "run").image_root == str(root.resolve())


def test_allowed_changes_take_effect(tiny_data, tmp_path):
    """--allow-changes --learning-rate: the resumed steps use the new rate (the restored optimizer and scheduler
    would keep the checkpoint's), as a run that had it from the start does at those steps."""
    root, model, _ = tiny_data
    options = ["--max-steps", "4", "--save-every", "2", "--log-every", "1"]
    assert main(command(root, model, tmp_path / "straight", *options, "--learning-rate", "1e-3")) == 0
    out = tmp_path / "run"
    assert main(command(root, model, out, *options, "--learning-rate", "3e-3")) == 0
    shutil.rmtree(out / "checkpoint-000004")  # as if stopped during step 3
    assert main(command(root, model, out, *options, "--learning-rate", "1e-3", "--allow-changes")) == 0
    assert "--learning-rate 0.003 -> 0.001 (--allow-changes)" in (out / "train.log").read_text()
    lr = [r["lr"] for r in read_log(out)]
    straight = [r["lr"] for r in read_log(tmp_path / "straight")]
    assert lr[2:] == straight[2:] and lr[:2] == pytest.approx([3 * x for x in straight[:2]], rel=1e-12)


# ------------------------------------------------------------------------------------ 4. starting again, not mixing


def test_starting_again_never_mixes_the_runs_checkpoints(tiny_data, tmp_path, capsys):
    """--resume false over a run with checkpoint-2 and -4: the new run's checkpoint-1 used to be pruned as the
    oldest, its checkpoint-2 replaced the old one, and the old checkpoint-4 was taken for its final adapter. Now it
    is refused, and --force deletes the old checkpoints (and TensorBoard logs) once the new run has started."""
    root, model, _ = tiny_data
    out = tmp_path / "run"
    assert main(command(root, model, out, "--max-steps", "4", "--save-every", "2")) == 0
    old = load_file(out / "checkpoint-000002" / "adapter_model.safetensors")
    capsys.readouterr()
    before = snapshot(out)

    again = command(root, model, out, "--resume", "false", "--seed", "3")
    assert main(again) == 2
    err = one_error(capsys)
    assert "holds checkpoints of an earlier run (checkpoint-000002, checkpoint-000004)" in err and "--force" in err
    assert snapshot(out) == before

    assert main([*again, "--force"]) == 0
    assert [s for s, _ in list_checkpoints(out)] == [1, 2]
    assert "deleted the earlier run's checkpoint-000002, checkpoint-000004 (--force)" in capsys.readouterr().out
    assert [r["step"] for r in read_log(out)] == [2]  # log_every 5: the last step only
    assert cfg.load_run_config(out).seed == 3
    assert torch.load(out / "checkpoint-000002" / TRAINER_STATE, weights_only=False)["step"] == 2
    new = load_file(out / "checkpoint-000002" / "adapter_model.safetensors")
    assert not all(torch.equal(new[k], old[k]) for k in old)  # the new run's (seed 3), not the old one's
    events = list((out / "tensorboard").iterdir())
    assert len(events) == 1  # the old run's event file is gone


def test_pruning_keeps_the_checkpoint_just_written(tmp_path):
    """A checkpoint newer than the one just saved is no part of this run: it never makes the new one the oldest."""
    for step in (1, 2, 4):
        folder = tmp_path / f"checkpoint-{step:06d}"
        folder.mkdir()
        (folder / TRAINER_STATE).write_bytes(b"")
    prune_checkpoints(tmp_path, keep=1, upto=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 4]

