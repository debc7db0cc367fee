"""`captune train` on a tiny model and a tiny caption set, on the CPU: it learns, resumes exactly, survives
a kill while saving, and gives the same losses under torchrun (DDP and FSDP2 over gloo)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.tiny_captions import write_tiny_captions

import captune
from captune.cli import main
from captune.errors import Interrupted
from captune.train import config as cfg
from captune.train.runlog import read_log
from captune.train.state import list_checkpoints


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return write_tiny_captions(tmp_path_factory.mktemp("data"))


def run_config(root: Path, model: Path, out: Path, **overrides) -> cfg.TrainConfig:
    values = {"model": str(model), "data": str(root / "train.jsonl"), "out": str(out), "max_steps": 4,
              "save_every": 2, "log_every": 1, "global_batch_size": 16, "per_device_batch_size": 4,
              "lora_dropout": 0.1, **overrides}
    return cfg.resolve("tiny_cpu_lora", values)


def word_f1(caption: str, reference: str) -> float:
    a, b = caption.split(), reference.split()
    common = sum(min(a.count(w), b.count(w)) for w in set(a))
    return 0.0 if not common else 2 * common / (len(a) + len(b))


def mean_f1(model_dir, rows, root) -> float:
    model, processor = captune.load(model_dir)
    images = sorted({r["image"] for r in rows})
    captions = captune.caption_images(model, processor, [root / i for i in images], max_tiles=1)
    refs = {r["image"]: r["caption"] for r in rows}
    return sum(word_f1(c, refs[i]) for c, i in zip(captions, images)) / len(images)


def test_cli_training_lowers_loss_and_improves_captions(tiny_data, tmp_path, capsys):
    root, model, rows = tiny_data
    out = tmp_path / "run"
    code = main(["train", "--model", str(model), "--data", str(root / "train.jsonl"), "--out", str(out),
                 "--recipe", "tiny_cpu_lora", "--max-steps", "24", "--save-every", "12", "--lora-rank", "16",
                 "--lora-alpha", "32", "--learning-rate", "3e-3", "--global-batch-size", "16", "--log-every", "1"])
    assert code == 0
    assert "trainable params:" in capsys.readouterr().err + (out / "train.log").read_text()
    losses = [r["loss"] for r in read_log(out)]
    assert len(losses) == 24
    assert sum(losses[-4:]) / 4 < 0.5 * sum(losses[:4]) / 4
    resolved = cfg.load_run_config(out)
    assert resolved.lora_rank == 16 and resolved.learning_rate == 3e-3 and resolved.max_tiles == 1
    final = out / "checkpoint-000024"
    assert (final / "adapter_config.json").is_file() and (final / "adapter_model.safetensors").is_file()
    assert json.loads((final / "adapter_config.json").read_text())["base_model_name_or_path"] == str(model.resolve())
    before, after = mean_f1(model, rows, root), mean_f1(final, rows, root)
    assert after > before + 0.3, (before, after)
    assert (out / "tensorboard").is_dir() and any((out / "tensorboard").iterdir())


def test_resume_gives_the_same_loss_curve(tiny_data, tmp_path, monkeypatch):
    from captune.train.loop import train

    root, model, _ = tiny_data
    train(run_config(root, model, tmp_path / "straight"))
    straight = [r["loss"] for r in read_log(tmp_path / "straight")]

    real_step = torch.optim.AdamW.step
    calls = {"n": 0}

    def dying_step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # killed during step 4, after checkpoint-000002
            raise KeyboardInterrupt
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", dying_step)
    resumed = tmp_path / "resumed"
    with pytest.raises(Interrupted) as stopped:
        train(run_config(root, model, resumed))
    assert str(stopped.value) == (f"stopped at step 3; the last checkpoint is {resumed / 'checkpoint-000002'} "
                                  "(step 2); run the same command again to resume")
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    assert [s for s, _ in list_checkpoints(tmp_path / "resumed")] == [2]
    train(run_config(root, model, tmp_path / "resumed"))
    resumed = [r["loss"] for r in read_log(tmp_path / "resumed")]
    assert resumed == straight  # bit for bit: data order, dropout RNG, optimizer and scheduler all restored


def test_kill_while_saving_keeps_the_previous_checkpoint(tiny_data, tmp_path, monkeypatch):
    import captune.train.state as ckpt
    from captune.train.loop import train

    root, model, _ = tiny_data
    real_save = ckpt.torch.save
    calls = {"n": 0}

    def dying_save(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint dies half-written
            raise KeyboardInterrupt
        return real_save(*args, **kwargs)

    monkeypatch.setattr(ckpt.torch, "save", dying_save)
    out = tmp_path / "run"
    with pytest.raises(Interrupted, match=r"^stopped at step 4; the last checkpoint is .*checkpoint-000002 \(step 2\)"):
        train(run_config(root, model, out))
    monkeypatch.setattr(ckpt.torch, "save", real_save)
    assert [s for s, _ in list_checkpoints(out)] == [2]
    captune.load(out / "checkpoint-000002")  # loadable
    train(run_config(root, model, out))  # and the run resumes from it
    assert [s for s, _ in list_checkpoints(out)] == [2, 4]


def test_bad_samples_are_skipped_not_fatal(tiny_data, tmp_path):
    from captune.train.loop import train

    root, model, rows = tiny_data
    data = tmp_path / "data.jsonl"
    lines = [json.dumps({**r, "image": str(root / r["image"])}) for r in rows]
    lines += ["{not json", json.dumps({"image": str(root / "images" / "missing.jpg"), "caption": "a red circle"}),
              json.dumps({"image": str(root / "images" / "0.jpg"), "caption": "  "})]
    data.write_text("\n".join(lines) + "\n")
    train(run_config(root, model, tmp_path / "run", data=str(data), max_steps=2))
    log = (tmp_path / "run" / "train.log").read_text()
    assert "malformed" in log and "missing" in log and "empty" in log


def test_the_logged_learning_rate_is_the_one_each_step_used(tiny_data, tmp_path):
    """Warm-up over 2 of 3 steps (ceil(3 x 0.34)), then cosine: the steps run at 0, half the peak and the peak, and
    the log says so (not the rate the scheduler holds for the next step). A run that is all warm-up is warned about, as
    --fsdp in one process (it shards over torchrun's processes)."""
    from captune.train.loop import train

    root, model, _ = tiny_data
    train(run_config(root, model, tmp_path / "run", max_steps=3, warmup_ratio=0.34, learning_rate=1e-3))
    assert [r["lr"] for r in read_log(tmp_path / "run")] == pytest.approx([0.0, 5e-4, 1e-3], abs=1e-12)
    assert "warning" not in (tmp_path / "run" / "train.log").read_text()
    train(run_config(root, model, tmp_path / "short", max_steps=1, warmup_ratio=0.03, fsdp=True))
    log = (tmp_path / "short" / "train.log").read_text()
    assert ("warning: all 1 steps warm the learning rate up (--warmup-ratio 0.03): it starts at 0 and never reaches "
            "--learning-rate") in log
    assert "warning: --fsdp shards the model over torchrun's processes; in one process it trains unsharded" in log


def test_unknown_override_is_a_clear_error(tiny_data, tmp_path, capsys):
    root, model, _ = tiny_data
    code = main(["train", "--model", str(model), "--data", str(root), "--out", str(tmp_path), "--recipe",
                 str(tmp_path / "nope.yaml")])
    assert code == 2 and "recipe file not found" in capsys.readouterr().err


@pytest.mark.parametrize("option,why", [(["--lora-vision", "true"], "another shape (--lora-vision false -> true)"),
                                        (["--lora-alpha", "8"], "other settings (--lora-alpha 16 -> 8)"),
                                        (["--train-projector", "true"], "another shape (--train-projector false -> true)")])
def test_resuming_with_other_lora_options_is_refused(tiny_data, tmp_path, capsys, option, why):
    """The checkpoint's adapter was built with the recorded options; others would not fit it (or scale it). A
    shape cannot change even with --allow-changes."""
    root, model, _ = tiny_data
    common = ["train", "--model", str(model), "--data", str(root / "train.jsonl"), "--out", str(tmp_path / "run"),
              "--recipe", "tiny_cpu_lora", "--max-steps", "2", "--save-every", "1"]
    assert main(common + ["--max-steps", "1"]) == 0
    capsys.readouterr()
    code = main(common + option)
    err = capsys.readouterr().err
    assert code == 2 and (f"holds a run with {why}" in err or f"holds a run whose adapter has {why}" in err), err
    if "shape" in why:
        assert main(common + option + ["--allow-changes"]) == 2 and "another shape" in capsys.readouterr().err


def test_trainable_parameter_count_of_internvl2_2b_at_rank_128():
    """The issue's figure for separate q/k/v projections (the tutorial's fused wqkv gives 125,829,120)."""
    from transformers import InternVLForConditionalGeneration

    from captune.demo.bench import internvl2_2b_config
    from captune.internvl.config import native_config
    from captune.internvl.lora import add_lora, count_parameters

    with torch.device("meta"):
        model = InternVLForConditionalGeneration(native_config(internvl2_2b_config(), 92546))
        peft = add_lora(model, rank=128, alpha=256, dropout=0.05)
    assert count_parameters(peft)[0] == 138_412_032


def _torchrun(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """`captune train` under torchrun with 2 CPU processes (gloo), run once; fails the test unless it exits with 0.

    Never run again on a failure: a worker once died of SIGABRT in CI, and a rerun that passes hides such a
    crash. The workers run with faulthandler on (PYTHONFAULTHANDLER: a fatal signal prints the Python stack of
    every thread) and with C++ stack traces in torch's errors (TORCH_SHOW_CPP_STACKTRACES); the failure message
    holds the error lines, those stacks and the tail of stderr (`_errors`). A run that hangs is stopped (SIGTERM,
    which torchrun passes on to its workers) and reported the same way.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "TORCH_SHOW_CPP_STACKTRACES": "1",
           "PYTHONFAULTHANDLER": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "captune", "train", *args]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                stdout, stderr = proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                stdout, stderr = proc.communicate()
            pytest.fail(f"torchrun still running after 300 s (a hang?):\n{_errors(stderr)}")
    run = subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
    assert run.returncode == 0, f"torchrun exited with {run.returncode}:\n{_errors(run.stderr)}"
    return run


def _errors(stderr: str) -> str:
    """The lines of a failed torchrun's stderr that name an error, the first faulthandler dumps (a worker killed by
    a signal: the Python stack of every thread) and the tail."""
    keys = ("error", "terminate", "what()", "signal", "exception", "enforce", "abort")
    lines = stderr.splitlines()
    picked = [line for line in lines if any(k in line.lower() for k in keys)][:40]
    dumps = ["\n".join(lines[i : i + 60]) for i, line in enumerate(lines) if "Fatal Python error" in line][:2]
    return "\n".join(picked + ["..."] + dumps + ["..."]) + "\n" + stderr[-3000:]


def _two_processes_and_one(root: Path, model: Path, tmp_path: Path, fsdp: bool) -> None:
    """3 steps of three images (one per micro-batch) under torchrun and in one process; same losses, gradient
    norms and skip counts."""
    from captune.train.loop import train

    args = ["--model", str(model), "--data", str(root / "train.jsonl"), "--recipe", "tiny_cpu_lora", "--max-steps",
            "3", "--save-every", "3", "--global-batch-size", "12", "--token-budget", "64", "--lora-dropout", "0",
            "--log-every", "1", "--out", str(tmp_path / "two"), "--fsdp", str(fsdp).lower()]
    _torchrun(args, tmp_path)
    train(run_config(root, model, tmp_path / "one", max_steps=3, save_every=3, lora_dropout=0.0,
                     global_batch_size=12, token_budget=64))
    for key in ("loss", "grad_norm", "skipped"):
        two = [r[key] for r in read_log(tmp_path / "two")]
        one = [r[key] for r in read_log(tmp_path / "one")]
        assert two == pytest.approx(one, rel=1e-5), key


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp2"])
def test_torchrun_two_processes_match_one(tiny_data, tmp_path, fsdp):
    """Same losses, gradient norms and adapter as one process. FSDP2 builds the model on the meta device and
    loads each rank's shards; both start from the same LoRA initialisation. Steps of three images, one image
    per micro-batch: the processes must still run as many micro-batches each (FSDP would hang otherwise)."""
    from safetensors.torch import load_file

    root, model, _ = tiny_data
    _two_processes_and_one(root, model, tmp_path, fsdp)
    a = load_file(tmp_path / "two" / "checkpoint-000003" / "adapter_model.safetensors")
    b = load_file(tmp_path / "one" / "checkpoint-000003" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6), k
    captune.load(tmp_path / "two" / "checkpoint-000003")


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp2"])
def test_torchrun_survives_micro_batches_whose_images_all_fail(tiny_data, tmp_path, fsdp):
    """Truncated JPEGs pass the up-front header check and fail only when decoded. A micro-batch whose every image
    fails must still take part in the step (a zero-weight stand-in), or the other process waits forever; the
    result equals one process that trained on the good images only."""
    root, model, _ = tiny_data
    data = tmp_path / "data"
    shutil.copytree(root, data, ignore=shutil.ignore_patterns("base"))
    for i in (3, 5, 6):  # with this seed, rank 1's only micro-batch in steps 1 and 2 (and image 3 in rank 0's)
        jpeg = data / "images" / f"{i}.jpg"
        jpeg.write_bytes(jpeg.read_bytes()[: jpeg.stat().st_size // 2])
    _two_processes_and_one(data, model, tmp_path, fsdp)
    assert "1 micro-batch(es) without a loadable image" in (tmp_path / "two" / "train.log").read_text()


def test_torchrun_compiled_matches_one_eager_process(tiny_data, tmp_path):
    """DDP with the LLM and vision tower compiled (rows padded to the budget) == one eager process."""
    from captune.train.loop import train

    root, model, _ = tiny_data
    args = ["--model", str(model), "--data", str(root / "train.jsonl"), "--recipe", "tiny_cpu_lora", "--max-steps",
            "2", "--save-every", "2", "--global-batch-size", "16", "--token-budget", "1024", "--lora-dropout", "0",
            "--log-every", "1", "--compile", "on", "--out", str(tmp_path / "two")]
    _torchrun(args, tmp_path)
    train(run_config(root, model, tmp_path / "one", max_steps=2, save_every=2, lora_dropout=0.0, token_budget=1024))
    for key in ("loss", "grad_norm"):
        two = [r[key] for r in read_log(tmp_path / "two")]
        one = [r[key] for r in read_log(tmp_path / "one")]
        assert two == pytest.approx(one, rel=1e-5), key


def test_fsdp2_resume_gives_the_same_loss_curve(tiny_data, tmp_path):
    root, model, _ = tiny_data
    args = ["--model", str(model), "--data", str(root / "train.jsonl"), "--recipe", "tiny_cpu_lora", "--max-steps",
            "3", "--save-every", "2", "--global-batch-size", "16", "--per-device-batch-size", "4", "--lora-dropout",
            "0.1", "--log-every", "1", "--out", str(tmp_path / "run"), "--fsdp", "true"]
    _torchrun(args, tmp_path)
    def curve():
        return [(r["step"], r["loss"], r["grad_norm"], r["lr"]) for r in read_log(tmp_path / "run")]

    straight = curve()
    shutil.rmtree(tmp_path / "run" / "checkpoint-000003")  # as if killed during step 3
    _torchrun(args, tmp_path)
    assert "resumed from" in (tmp_path / "run" / "train.log").read_text()
    assert curve() == straight  # bit for bit, dropout included


def test_gradient_checkpointing_gives_the_same_gradients_without_a_vision_backward(tiny_data, tmp_path):
    """Checkpointing changes memory, not the result; and it must not make autograd run the frozen vision tower
    backward (transformers' input hooks would, even after checkpointing is turned off again)."""
    from helpers import packed_setup as tp

    from captune.train.collate import collate_shared
    from captune.train.loss import enable_gradient_checkpointing

    samples, processor, peft = tp.build_setup(tmp_path)
    for name, p in peft.named_parameters():
        if "vision_tower" in name:
            p.requires_grad_(False)  # the recipe: LoRA on the LLM only
    batch = collate_shared(tp.image_items(samples, processor), processor.pad_token_id, 4096)
    net = peft.base_model.model
    vision_grad = []
    net.model.vision_tower.register_forward_hook(lambda m, i, out: vision_grad.append(out.last_hidden_state.requires_grad))
    peft.train()
    loss_a, grads_a = tp.loss_and_grads(peft, batch)
    enable_gradient_checkpointing(net)
    loss_b, grads_b = tp.loss_and_grads(peft, batch)
    net.gradient_checkpointing_disable()
    loss_c, _ = tp.loss_and_grads(peft, batch)
    assert vision_grad == [False, False, False]
    assert tp.rel(loss_b, loss_a) < 1e-6 and tp.rel(loss_c, loss_a) < 1e-6
    for name in grads_a:
        assert tp.rel(grads_b[name], grads_a[name]) < 1e-5, name


def test_compiled_training_gives_the_same_losses(tiny_data, tmp_path):
    """--compile on: the LLM compiled for rows padded to the token budget, the vision tower for any tile count
    (on the CPU with the dense mask; tests/test_gpu.py checks FlexAttention)."""
    from captune.train.loop import train

    root, model, _ = tiny_data
    settings = dict(max_steps=2, save_every=2, lora_dropout=0.0, token_budget=1024)
    train(run_config(root, model, tmp_path / "eager", **settings))
    train(run_config(root, model, tmp_path / "compiled", compile="on", **settings))
    assert "compiling the model" in (tmp_path / "compiled" / "train.log").read_text()
    for key in ("loss", "grad_norm"):
        compiled = [r[key] for r in read_log(tmp_path / "compiled")]
        eager = [r[key] for r in read_log(tmp_path / "eager")]
        assert compiled == pytest.approx(eager, rel=1e-5), key


def test_in_training_evaluation_keeps_the_best_checkpoint(tmp_path):
    """--eval-every: captions K test images with the current weights, logs BLEU-4/METEOR/CIDEr, keeps `best/`."""
    from captune.data.synthetic import make_synthetic_dataset
    from captune.demo.demo import base_model_path
    from captune.train.loop import train

    make_synthetic_dataset(tmp_path / "data", train=16, test=4, seed=3)
    out = tmp_path / "run"
    train(cfg.resolve("demo_lora", {"model": str(base_model_path()), "data": str(tmp_path / "data"), "out": str(out),
                                    "max_steps": 2, "eval_every": 1, "eval_limit": 4, "global_batch_size": 20,
                                    "per_device_batch_size": 20}))
    evals = read_log(out, kind="eval")
    assert [e["step"] for e in evals] == [1, 2]
    assert all({"Bleu_4", "METEOR", "CIDEr"} <= set(e) for e in evals)
    best = max(evals, key=lambda e: e["CIDEr"])
    state = torch.load(out / "best" / "trainer_state.pt", weights_only=False)
    assert state["best"]["step"] == best["step"] and state["best"]["cider"] == best["CIDEr"]
    captune.load(out / "best")
