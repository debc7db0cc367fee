"""Real kills: `kill -9` at exact points of `captune convert`, `captune merge` and a training checkpoint save.

Raising an exception inside the process (as tests/test_convert.py, test_merge.py and test_train.py do) lets the
cleanup handlers run; SIGKILL runs none. Each case runs the command in a child process (KILLER) with one function
hooked to write a marker and then SIGKILL its own process, before or after the n-th call matching a pattern (a
shard write, a rename, the `torch.save` of the trainer state, a prune's rmtree). Afterwards the previous output or
checkpoint is whole and loadable, OUT is absent or complete, the next run of the same command succeeds (a resumed
training gives the loss curve of an uninterrupted one) and no temporary folder is left over. Ctrl-C (SIGINT to the
whole process group, as a terminal sends it) stops a training in one line, under torchrun too, and it resumes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest
import torch
from helpers.tiny import (
    IMAGE_TOKEN_ID,
    all_tensors,
    assert_bit_identical,
    write_original_checkpoint,
)
from helpers.tiny_captions import write_tiny_captions

import captune
from captune.cli import main
from captune.errors import CaptuneError
from captune.internvl.folder import open_checkpoint
from captune.train.runlog import read_log
from captune.train.state import (
    TRAINER_STATE,
    latest_checkpoint,
    list_checkpoints,
    write_checkpoint,
)

KILLER = textwrap.dedent("""
    import importlib, os, re, signal, sys
    from pathlib import Path

    module, _, attr = spec["target"].rpartition(".")
    owner = importlib.import_module(module)
    real, seen = getattr(owner, attr), [0]

    def die():
        Path(spec["marker"]).write_text(spec["point"])
        os.kill(os.getpid(), signal.SIGKILL)  # no finally, no atexit, no context manager exit

    def hooked(*args, **kwargs):
        paths = [str(a) for a in args[:2] if isinstance(a, (str, os.PathLike))]
        hit = re.search(spec["match"], " -> ".join(paths)) is not None
        if hit and spec.get("inside"):  # only calls on a folder that holds this file
            hit = (Path(paths[0]) / spec["inside"]).is_file()
        seen[0] += hit
        if hit and seen[0] == spec["nth"]:
            if spec["when"] == "before":
                die()
            if spec["when"] == "partial":  # a recursive delete that got as far as one file
                (Path(paths[0]) / spec["partial"]).unlink()
                die()
            real(*args, **kwargs)
            die()
        return real(*args, **kwargs)

    setattr(owner, attr, hooked)
    if "code" in spec:
        exec(spec["code"])
    else:
        from captune.cli import main
        sys.exit(main(spec["argv"]))
""")

# Importing torch, transformers and peft takes seconds on 2 cores, so one process imports them once and forks a
# fresh child per kill (before any torch op has started a thread pool); the server only reports how it ended.
FORK_SERVER = textwrap.dedent("""
    import json, os, sys, traceback
    import captune.train.state, captune.cli, captune.internvl.convert, captune.merge.merge, captune.train.loop, peft, transformers
    for line in sys.stdin:
        spec = json.loads(line)
        pid = os.fork()
        if pid == 0:
            log = os.open(spec["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(log, 1)
            os.dup2(log, 2)
            os.chdir(spec["cwd"])
            code = 70
            try:
                exec(sys.argv[1], {"spec": spec, "__name__": "__main__"})
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush(), sys.stderr.flush()
                os._exit(code)  # the hook never fired: the command ran to its end
        _, status = os.waitpid(pid, 0)
        print(json.dumps(-os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)), flush=True)
""")


@pytest.fixture(scope="module")
def killer():
    server = subprocess.Popen([sys.executable, "-c", FORK_SERVER, KILLER], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)

    def kill(tmp_path: Path, point: str, target: str, match: str, nth: int = 1, when: str = "before",
             **spec) -> None:
        """Run a command in a child that SIGKILLs itself at `point` (writing its marker just before)."""
        marker, log = tmp_path / f"killed-{point}", tmp_path / f"killed-{point}.log"
        spec = {"point": point, "target": target, "match": match, "nth": nth, "when": when, "marker": str(marker),
                "log": str(log), "cwd": str(tmp_path), **spec}
        server.stdin.write(json.dumps(spec) + "\n")
        server.stdin.flush()
        line = server.stdout.readline()
        assert line, "the fork server died"
        returncode = json.loads(line)
        assert returncode == -signal.SIGKILL, log.read_text()[-3000:]
        assert marker.read_text() == point
        marker.unlink()
        log.unlink()

    yield kill
    server.stdin.close()
    server.wait(timeout=60)


def hidden_folders(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") and p.is_dir())


# --------------------------------------------------------------------------------------------- convert and merge


@pytest.fixture(scope="module")
def writers(tmp_path_factory):
    """A 3-shard original release (no tokenizer), an adapter for it, and complete convert and merge outputs."""
    from captune.internvl.lora import add_lora
    from captune.merge.merge import merge

    root = tmp_path_factory.mktemp("writers")
    base = write_original_checkpoint(root / "base", "internlm2", shards=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, _ = captune.load(base, dtype="fp32", image_token_id=IMAGE_TOKEN_ID)
        peft = add_lora(model, rank=4, alpha=8, dropout=0.0)
        with torch.no_grad():  # non-zero B: the merge changes the weights
            for name, p in peft.named_parameters():
                if "lora_B" in name:
                    p.copy_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
        peft.peft_config["default"].base_model_name_or_path = str(base.resolve())
        peft.save_pretrained(str(root / "adapter"))
        captune.convert_checkpoint(base, root / "convert")
        merge(root / "adapter", root / "merge", dtype="fp32", verify=False)
    return root


def command(root: Path, name: str, out: Path, force: bool) -> list[str]:
    """`captune convert BASE OUT` or `captune merge ADAPTER OUT` (float32, without the logits check)."""
    options = ["--dtype", "fp32", "--no-verify"] if name == "merge" else []
    source = root / ("base" if name == "convert" else "adapter")
    return [name, str(source), str(out), *options, *(["--force"] if force else [])]


def main_or_raise(argv: list[str]) -> None:
    """The CLI's code path, raising its CaptuneError instead of printing it."""
    from captune import cli

    args = cli.build_parser().parse_args(argv)
    args.func(args)


TMP_TO_OUT = r"/\.out\.tmp-[^/]* -> .*/out$"  # the rename that gives OUT its content
OUT_TO_OLD = r"/out -> .*/\.out\.old-[^/]*$"  # replacing: the previous OUT set aside first

WRITER_POINTS = {  # point: (OUT exists before, hooked function, call pattern, nth call, before/after it)
    "before-any-shard": (False, "captune.internvl.convert._save_shard", "", 1, "before"),
    "mid-shards": (False, "captune.internvl.convert._save_shard", "", 2, "before"),  # 1 of 3 shards written
    "complete-before-rename": (False, "os.replace", TMP_TO_OUT, 1, "before"),
    "after-rename": (False, "os.replace", TMP_TO_OUT, 1, "after"),
    "replace-before-renames": (True, "os.replace", OUT_TO_OLD, 1, "before"),
    "replace-between-renames": (True, "os.replace", TMP_TO_OUT, 1, "before"),  # OUT missing, old and new aside
    "replace-after-renames": (True, "os.replace", TMP_TO_OUT, 1, "after"),  # the old one not yet deleted
}
WRITER_CASES = [("convert", p) for p in WRITER_POINTS] + [
    ("merge", p) for p in ("mid-shards", "complete-before-rename", "replace-between-renames", "replace-after-renames")]


@pytest.mark.parametrize("name,point", WRITER_CASES, ids=[f"{n}-{p}" for n, p in WRITER_CASES])
def test_killed_writer_leaves_out_absent_or_complete(killer, writers, tmp_path, name, point):
    replacing, target, match, nth, when = WRITER_POINTS[point]
    expected = all_tensors(writers / name)

    def is_complete(folder: Path) -> bool:
        open_checkpoint(folder)
        assert_bit_identical(all_tensors(folder), expected)
        return True

    work = tmp_path / "work"
    out = work / "out"
    if replacing:  # the previous output, told apart from the new one by a file of its own
        shutil.copytree(writers / name, out)
        (out / "PREVIOUS").write_text("the previous output")
    killer(tmp_path, point, target, match, nth, when, argv=command(writers, name, out, force=replacing))

    assert not out.exists() or is_complete(out)  # never half-written
    assert out.exists() == (point in ("after-rename", "replace-before-renames", "replace-after-renames"))
    if replacing:  # the previous output is whole: still OUT, or set aside beside it
        previous = [p for p in work.iterdir() if (p / "PREVIOUS").is_file()]
        assert len(previous) == 1 and is_complete(previous[0])
        # the next run without --force puts a set-aside previous output back, and refuses to replace it
        with pytest.raises(CaptuneError, match="not empty"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            main_or_raise(command(writers, name, out, force=False))
        assert (out / "PREVIOUS").is_file() == (point != "replace-after-renames") and is_complete(out)

    with warnings.catch_warnings():  # the same command again: it succeeds and tidies what the kill left
        warnings.simplefilter("ignore")
        if point == "after-rename":  # killed with its work done: refused like after any finished run, unless --force
            with pytest.raises(CaptuneError, match="not empty"):
                main_or_raise(command(writers, name, out, force=False))
        main_or_raise(command(writers, name, out, force=replacing or point == "after-rename"))
    assert sorted(p.name for p in work.iterdir()) == ["out"]
    assert is_complete(out) and not (out / "PREVIOUS").exists()


# --------------------------------------------------------------------------------------------- training checkpoints

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """Tiny model and captions (as tests/train/test_loop.py), and an uninterrupted 3-step run: its loss curve."""
    root, model, _ = write_tiny_captions(tmp_path_factory.mktemp("train"))
    args = ["train", "--model", str(model), "--data", str(root / "train.jsonl"), "--recipe", "tiny_cpu_lora",
            "--max-steps", "3", "--save-every", "1", "--log-every", "1", "--global-batch-size", "4",
            "--per-device-batch-size", "4", "--lora-dropout", "0.1"]
    assert main([*args, "--out", str(root / "straight")]) == 0
    return args, root / "straight"


def curve(out: Path) -> list[tuple[int, float, float]]:
    return [(r["step"], r["loss"], r["grad_norm"]) for r in read_log(out)]


SAVE_2 = r"/\.checkpoint-000002\.tmp-\d+"
TRAIN_POINTS = {  # point: (hooked function, call pattern, before/after/partial, extra options, checkpoints left)
    "mid-save": ("torch.save", SAVE_2 + "/trainer_state.pt$", "before", [], [1]),  # adapter written, state not
    "complete-before-rename": ("os.replace", SAVE_2 + " -> ", "before", [], [1]),
    "after-rename": ("os.replace", SAVE_2 + " -> ", "after", [], [1, 2]),  # before pruning
    # pruning checkpoint-000001 once checkpoint-000002 is saved; rmtree got as far as the adapter weights
    "mid-prune": ("shutil.rmtree", r"checkpoint-000001", "partial", ["--keep-checkpoints", "1"], [2]),
}


@pytest.mark.parametrize("point", TRAIN_POINTS)
def test_killed_checkpoint_save_resumes_to_the_same_loss_curve(killer, tiny_run, tmp_path, point):
    args, straight = tiny_run
    target, match, when, options, left = TRAIN_POINTS[point]
    out = tmp_path / "run"
    killer(tmp_path, point, target, match, when=when, inside="trainer_state.pt" if when == "partial" else None,
           partial="adapter_model.safetensors", argv=[*args, *options, "--out", str(out)])

    found = list_checkpoints(out)  # what a resume sees (after tidying the leftovers)
    assert [s for s, _ in found] == left
    assert hidden_folders(out) == []
    for _, path in found:  # every checkpoint it could pick is whole
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            captune.load(path)
    assert main([*args, *options, "--out", str(out)]) == 0
    assert f"resumed from {out / f'checkpoint-{left[-1]:06d}'}" in (out / "train.log").read_text()
    assert curve(out) == curve(straight)  # bit for bit
    assert [s for s, _ in list_checkpoints(out)] == ([3] if options else [2, 3]) and hidden_folders(out) == []


WRITE_BEST = textwrap.dedent("""
    import shutil, torch
    from captune.train.state import write_checkpoint
    new, out = Path(spec["new"]), Path(spec["out"])
    write_checkpoint(out, "best", lambda folder: [shutil.copy2(f, folder) for f in new.glob("adapter_*")],
                     torch.load(new / "trainer_state.pt", weights_only=False), None)
""")
BEST_POINTS = {  # point: (call pattern, before/after, which best/ is left)
    "before-renames": (r"/best -> .*/\.best\.old-\d+$", "before", "old"),
    "between-renames": (r"/\.best\.tmp-\d+ -> .*/best$", "before", "old"),  # best/ missing until recovered
    "after-renames": (r"/\.best\.tmp-\d+ -> .*/best$", "after", "new"),  # .best.old-PID not yet deleted
}


@pytest.mark.parametrize("point", BEST_POINTS)
def test_killed_replacement_of_best_keeps_a_whole_best(killer, tiny_run, tmp_path, point):
    """`best/` is replaced by write_checkpoint (new into .best.tmp-PID, old aside to .best.old-PID, new renamed in,
    old deleted), as a `--resume false` rerun replaces checkpoint-N. Once the next run starts, one whole `best/`."""
    from safetensors.torch import load_file

    _, straight = tiny_run
    old, new = straight / "checkpoint-000002", straight / "checkpoint-000003"
    out = tmp_path / "run"
    shutil.copytree(old, out / "best")
    match, when, left = BEST_POINTS[point]
    killer(tmp_path, point, "os.replace", match, when=when, code=WRITE_BEST, new=str(new), out=str(out))

    latest_checkpoint(out)  # what `captune train` does first
    assert hidden_folders(out) == []
    expected = {"old": old, "new": new}[left]
    assert_bit_identical(load_file(out / "best" / "adapter_model.safetensors"),
                         load_file(expected / "adapter_model.safetensors"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        captune.load(out / "best")
    write_checkpoint(out, "best", lambda folder: [shutil.copy2(f, folder) for f in new.glob("adapter_*")],
                     torch.load(new / "trainer_state.pt", weights_only=False), None)  # the next save succeeds
    assert sorted(p.name for p in out.iterdir()) == ["best"]


# --------------------------------------------------------------------------------------------- the recovery rules


def test_recovery_touches_only_leftovers_of_gone_writers(tmp_path):
    """Beside an output folder, only leftovers of writers that are gone are tidied (a dead process, or this one's PID
    reused): another process may be writing OUT now, and older captune's names without a PID are left alone. In a
    run's folder every leftover is stale, whoever wrote it: checkpoints are recovered only while none is written."""
    from captune.fileio import check_output_dir
    from captune.train.state import list_checkpoints

    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True).stdout)
    live, own = os.getppid(), os.getpid()

    def leftover(folder: Path, name: str, mark: str = "") -> None:
        (folder / name).mkdir(parents=True)
        if mark:
            (folder / name / mark).write_text(mark)

    work = tmp_path / "work"
    leftover(work, f".out.old-{dead}", "PREVIOUS")  # killed between the renames: the only copy of OUT
    for name in (f".out.tmp-{live}", f".out.tmp-{own}", f".out.tmp-{dead}-x1y2", ".out.tmp", f".other.tmp-{dead}"):
        leftover(work, name)
    with pytest.raises(CaptuneError, match="not empty"):
        check_output_dir(work / "out")
    assert (work / "out" / "PREVIOUS").is_file()
    assert hidden_folders(work) == [f".other.tmp-{dead}", ".out.tmp", f".out.tmp-{live}"]

    run = tmp_path / "run"
    leftover(run, f".checkpoint-000001.old-{live}", TRAINER_STATE)  # NAME missing: put back
    leftover(run, "best", TRAINER_STATE)
    leftover(run, ".best.old", TRAINER_STATE)  # older captune's name; NAME exists: deleted
    for name in (f".checkpoint-000002.tmp-{live}", ".checkpoint-000003.tmp", f".checkpoint-000004.deleting-{dead}"):
        leftover(run, name, TRAINER_STATE)
    assert [s for s, _ in list_checkpoints(run)] == [1]
    assert sorted(p.name for p in run.iterdir()) == ["best", "checkpoint-000001"]


# --------------------------------------------------------------------------------------------- Ctrl-C while training

PROGRESS = re.compile(r"^[\w ]+: .*\[\d+:\d\d")  # a tqdm bar: "training:  0%|...| 5/100000 [00:02<...]"
STOPPED = re.compile(r"captune: interrupted: stopped at step (\d+); the last checkpoint is (\S+) \(step (\d+)\); "
                     r"run the same command again to resume")


def ctrl_c(cmd: list[str], cwd: Path, out: Path, at: int, env: dict | None = None,
           sig: int = signal.SIGINT) -> tuple[int, str]:
    """Run `cmd` as a terminal runs a foreground job (a process group of its own, Ctrl-C not ignored), and once
    OUT/checkpoint-`at` exists, send SIGINT to the whole group, as Ctrl-C does: the command, its DataLoader workers
    (and under torchrun the launcher and every process); or `sig` (SIGTERM: as Slurm signals a job's processes at its
    time limit). Returns the exit status and stderr; fails on a hang."""
    log = cwd / "stderr.txt"
    # A shell's background jobs ignore SIGINT, and so would the command: it starts with the default action.
    unignored = [sys.executable, "-c", ("import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
                                        "os.execv(sys.argv[1], sys.argv[1:])")]
    with open(log, "w") as err:
        proc = subprocess.Popen([*unignored, *cmd], cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=err,
                                start_new_session=True)
        try:
            deadline = time.monotonic() + 300
            while not (out / f"checkpoint-{at:06d}").is_dir():
                assert proc.poll() is None, f"ended before checkpoint {at}:\n{log.read_text()[-3000:]}"
                assert time.monotonic() < deadline, "no checkpoint after 300 s"
                time.sleep(0.05)
            os.killpg(proc.pid, sig)
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running 90 s after Ctrl-C (a hang?):\n{log.read_text()[-3000:]}")
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return proc.returncode, log.read_text()


def said(stderr: str) -> list[str]:
    """stderr without the progress bars."""
    return [line for line in re.split(r"[\r\n]", stderr) if line.strip() and not PROGRESS.match(line)]


def resumes(args: list[str], out: Path, stopped: str) -> None:
    """The stop's message names the newest checkpoint, the step it stopped at (saved then, nothing trained is lost),
    and the run goes on from it (two steps more)."""
    step, checkpoint, kept = STOPPED.fullmatch(stopped).groups()
    assert Path(checkpoint) == out / f"checkpoint-{int(kept):06d}" == latest_checkpoint(out)
    assert int(kept) == int(step) and hidden_folders(out) == []
    assert main([*args, "--max-steps", str(int(kept) + 2), "--out", str(out)]) == 0
    assert f"resumed from {checkpoint} at step {kept}" in (out / "train.log").read_text()
    assert latest_checkpoint(out) == out / f"checkpoint-{int(kept) + 2:06d}"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_stops_training_in_one_line_and_the_rerun_resumes(tiny_run, tmp_path, sig):
    """Ctrl-C (or SIGTERM) to `captune train` and its DataLoader workers: no traceback (the workers leave the signal to
    the main process), the step it stopped at saved, one line saying so and what to do, exit status 130; then the run
    resumes."""
    args, _ = tiny_run
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "captune", *args, "--max-steps", "100000", "--save-every", "3", "--num-workers", "2",
           "--out", str(out)]
    code, stderr = ctrl_c(cmd, tmp_path, out, at=3, sig=sig)
    lines = said(stderr)
    assert code == 130 and len(lines) == 1 and STOPPED.fullmatch(lines[0]), stderr[-3000:]
    resumes(args, out, lines[0])


def test_ctrl_c_under_torchrun_stops_every_process(tiny_run, tmp_path):
    """All processes get the signal (from the terminal, and again from torchrun): each stops in order within
    seconds, none waits forever on a collective of another that has stopped, and none prints a traceback of its
    own (torchrun's launcher prints its own); the checkpoint they name resumes (here in one process)."""
    args, _ = tiny_run
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "captune",
           *args, "--max-steps", "100000", "--save-every", "2", "--global-batch-size", "8", "--num-workers", "1",
           "--out", str(out)]
    code, stderr = ctrl_c(cmd, tmp_path, out, at=4, env=env)
    stops = [m.group(0) for m in STOPPED.finditer(stderr)]  # one per process (their lines may interleave)
    assert code != 0 and len(stops) == 2 and stops[0] == stops[1], stderr[-3000:]
    assert "forcefully exiting" not in stderr  # torchrun did not have to SIGKILL a process that hung
    assert stderr.count("Traceback") <= 1 and "SignalException" in stderr  # the launcher's, not a worker's
    resumes([*args, "--global-batch-size", "8"], out, stops[0])
