"""The start of `captune train`: every input checked before anything is written, and the run folder's fate decided.

    check(config, ctx)                  nothing written: the model folder (config.json, weights, tokenizer), the data,
                                        the plan (a recipe of the model's size; on a GPU, a run that fits it by
                                        `captune plan`, from config.json alone, before anything is loaded),
                                        the run folder and what it holds: nothing (a new run), this run (resumed;
                                        what changed since), an earlier run (starting again), or other files
    begin(start, config, ctx)           the run folder made; a new run's captune.yaml written at once
    commit(start, config, ctx, step)    once the start-up (data, model, optimizer) has succeeded: an earlier run's
                                        checkpoints deleted (--resume false --force), captune.yaml written, the
                                        logs cut back to the step the run goes on from
    undo(start, ctx)                    a start that failed: what it made is removed, the folder left as it was

Resuming compares the configuration the run recorded (captune.yaml) with the new one, option by option: the
adapter's shape (`SHAPE`) cannot change, since the checkpoint would not fit; options that define what is trained
(`IDENTITY`) make the resumed run another run, and change only with --allow-changes; how long it runs, how it
runs and what it keeps (`CONTINUABLE`) may change, and the log says how.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from captune import distributed
from captune.errors import CaptuneError
from captune.fileio import delete_dir
from captune.train import config as cfg
from captune.train.state import checkpoint_folders, latest_checkpoint

SHAPE = ("lora_rank", "lora_vision", "train_projector")
IDENTITY = ("model", "data", "image_root", "lora_alpha", "lora_dropout", "learning_rate", "weight_decay", "warmup_ratio",
            "lr_scheduler", "global_batch_size", "per_device_batch_size", "max_grad_norm", "adam_betas", "adam_eps",
            "seed", "max_tiles", "max_seq_length", "group_by_length", "share_prefix", "dtype")
CONTINUABLE = ("recipe", "epochs", "max_steps", "token_budget", "num_workers", "gradient_checkpointing", "fsdp",
               "compile", "device", "save_every", "keep_checkpoints", "log_every", "eval_every", "eval_limit",
               "eval_data")
COMMAND = ("out", "resume", "force", "allow_changes")  # how this command treats the folder, not the run's
TENSORBOARD = "tensorboard"


@dataclass
class Start:
    out: Path
    processor: Any  # the model's processor, read before the model: the data is measured with it first
    resume_from: Path | None  # the checkpoint the run goes on from; None: step 0
    created: Path | None  # the topmost folder this start makes (OUT or a parent); None when OUT exists
    before: frozenset[str]  # what OUT held at the check
    run_folder: bool  # OUT holds a run (captune.yaml)
    stale: list[Path]  # checkpoints of an earlier run, deleted once the start-up has succeeded (--force)
    changes: str = ""  # what changed since the run was last started ("" if nothing)


def check(config: cfg.TrainConfig, ctx: distributed.Context) -> Start:
    """Every input of the run checked, nothing written; every problem one CaptuneError."""
    if config.eval_every > 0 and config.fsdp and ctx.distributed:
        raise CaptuneError("--eval-every needs the whole model in one process; it does not work with --fsdp "
                           "(evaluate a checkpoint with `captune eval` instead)")
    check_data(config.data)
    if config.image_root and not Path(config.image_root).is_dir():
        raise CaptuneError("--image-root: no such folder", config.image_root)
    check_plan(config, ctx)  # config.json alone: before the tokenizer, long before the weights
    processor = check_model(config.model)
    if config.eval_every > 0:
        from captune.data.evalsets import resolve_eval_set

        if not config.eval_data and not Path(config.data).is_dir():
            raise CaptuneError("--eval-every needs a test set in the tutorial's layout (a folder with "
                               "annotations/coco_karpathy_test.json and its images): give --eval-data DIR; --data is "
                               "a file, so it cannot stand in", config.data)
        resolve_eval_set(config.eval_data or config.data, limit=1)  # fail now, not hours into the run
    return _check_out(config, processor)


def check_data(data: str) -> None:
    """The data exists, and a file is readable and not empty (its samples are read by the start-up, before the
    model is loaded: `dataset.load_training_data`)."""
    path = Path(data)
    if not path.exists():
        raise CaptuneError("no such file or folder", path)
    if path.is_dir():
        if not os.access(path, os.R_OK | os.X_OK):
            raise CaptuneError("cannot read this folder", path)
        return
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                if chunk.strip():
                    return
    except OSError as e:
        raise CaptuneError(f"cannot read: {e.strerror or e}", path) from None
    raise CaptuneError("is empty: no training samples", path)


def check_model(model: str):
    """The model folder, its config.json and weights, and its tokenizer; returns the model's processor."""
    from captune.internvl.config import check_supported
    from captune.internvl.folder import has_tokenizer, open_checkpoint
    from captune.internvl.load import processor_for
    from captune.internvl.lora import model_folder
    from captune.internvl.tokenizer import load_tokenizer

    ckpt = open_checkpoint(model_folder(model))  # a captune checkpoint: its base model, the adapter merged in
    if ckpt.layout == "internvl":
        check_supported(ckpt.config, ckpt.path / "config.json")
    if not has_tokenizer(ckpt.path):
        raise CaptuneError("has no tokenizer files (tokenizer.json or tokenizer.model); cannot train", ckpt.path)
    return processor_for(ckpt, load_tokenizer(ckpt.path))


def check_plan(config: cfg.TrainConfig, ctx: distributed.Context) -> None:
    """Refuse, before anything is loaded, a shipped per-size recipe on a model of another size, and (on GPUs, in
    bf16/fp16) a run that `captune plan` says cannot fit this GPU, saying what would fit.

    Only config.json is read; a folder without a readable one is left to `check_model` to report. The run is planned
    as the loop will run it: FSDP2 with --fsdp under torchrun, else DDP or one GPU; compiled as `should_compile`
    decides; shared prefixes unless --share-prefix off (with auto the data decides later; COCO shares).
    """
    import torch

    from captune.devices import resolve_dtype
    from captune.internvl import plan
    from captune.internvl.placement import card_gb

    found = cfg.model_release(config.model)
    if found is None:
        return  # check_model says what is wrong with the folder
    shape, size = found
    plan.check_recipe_size(config.recipe, size)
    if ctx.device.type != "cuda" or resolve_dtype(None if config.dtype == "auto" else config.dtype,
                                                  ctx.device).itemsize != 2:
        return  # no fixed memory on the CPU; the plan counts 16-bit weights
    total = card_gb(ctx.device)
    usable = total * plan.USABLE_FRACTION
    gpus, sharded = ctx.world_size, config.fsdp and ctx.distributed

    def need(checkpointing: bool = config.gradient_checkpointing, budget: int = config.token_budget,
             fsdp: bool = sharded, n: int = gpus) -> float:
        return _planned_gb(shape, config, ctx.device, n, fsdp, checkpointing, budget)

    if need() <= usable:
        return
    options, ckpt = [], config.gradient_checkpointing
    if not ckpt and need(checkpointing=True) <= usable:
        options.append(f"turn on --gradient-checkpointing ({need(checkpointing=True):.1f} GB)")
    group = plan.group_tokens(config.max_tiles)
    lower = [b for b in plan.TRAIN_BUDGETS if group <= b < config.token_budget and need(budget=b) <= usable]
    if config.share_prefix != "off" and lower:
        options.append(f"lower --token-budget to {lower[0]} ({need(budget=lower[0]):.1f} GB)")
    if ctx.distributed and not sharded and need(fsdp=True) <= usable:
        options.append(f"add --fsdp: FSDP2 over the {gpus} processes ({need(fsdp=True):.1f} GB)")
    if not options:
        for checkpointing in dict.fromkeys((ckpt, True)):
            n = next((n for n in range(max(2, gpus + 1), 1025)
                      if need(checkpointing=checkpointing, fsdp=True, n=n) <= usable), None)
            if n is not None:
                flags = "--fsdp" + ("" if checkpointing == ckpt else " --gradient-checkpointing")
                per_node = torch.cuda.device_count() or 8  # more than one node's GPUs: several nodes
                launch = (f"--nproc-per-node {n}" if n <= per_node else
                          f"--nnodes {-(-n // per_node)} --nproc-per-node {per_node}")
                options.append(f"use FSDP2 over {n} GPUs of this size (torchrun {launch} -m captune "
                               f"train ... {flags}; {need(checkpointing=checkpointing, fsdp=True, n=n):.1f} GB each)")
                break
    strategy = "FSDP2" if sharded else "DDP" if ctx.distributed else "one GPU"
    raise CaptuneError(
        f"does not fit this GPU: this run ({strategy}{f' over {gpus}' if gpus > 1 else ''}, LoRA r{config.lora_rank}, "
        f"gradient checkpointing {'on' if ckpt else 'off'}, token budget {config.token_budget:,}) needs "
        f"{need():.1f} GB per GPU by `captune plan`, and {usable:.1f} of this GPU's {total:.1f} GB are usable; "
        + (f"would fit: {'; or '.join(options)}" if options else "nothing the plan tries fits")
        + f" (captune plan {config.model} --gpus {gpus} --gpu-memory {total:.1f} --recipe {config.recipe})",
        config.model)


def _planned_gb(shape, config: cfg.TrainConfig, device, gpus: int, sharded: bool, checkpointing: bool,
                budget: int) -> float:
    """GB per GPU of one micro-batch as `captune plan` computes it (`choose_train`'s token count per micro-batch)."""
    from captune.internvl import plan
    from captune.train.loss import should_compile

    group, tiles = plan.group_tokens(config.max_tiles), plan.coco_tiles(config.max_tiles)
    shared = config.share_prefix != "off"
    compiled = should_compile(config, device, shared, sharded)
    if shared:  # whole images up to the budget or the process's share of a step; compiled rows padded to the budget
        step_images = -(-config.global_batch_size // 5)
        images = max(1, min(budget // group, -(-step_images // gpus)))
        tokens = max(budget, group) if compiled else images * group
    else:  # one caption per row, each with its prompt
        caption = (plan.GROUP_TOKENS - plan.EVAL_PROMPT) // 5
        tokens = config.per_device_batch_size * (group - 4 * caption)
    strategy = "FSDP2" if sharded else "DDP" if gpus > 1 else "one GPU"
    return plan.train_memory(shape, config.lora_rank, tokens, checkpointing, strategy, gpus, compiled,
                             tiles=tiles)["total"]


def _check_out(config: cfg.TrainConfig, processor) -> Start:
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise CaptuneError("exists and is not a folder (--out names the run's folder)", out)
    if not out.exists():
        created = out
        while not created.parent.exists():
            created = created.parent
        parent = created.parent
        if not parent.is_dir():
            raise CaptuneError(f"cannot make the run folder: {parent} is not a folder", out)
        if not os.access(parent, os.W_OK | os.X_OK):
            raise CaptuneError(f"cannot make the run folder: {parent} is not writable", out)
        if config.resume == "true":
            raise CaptuneError("--resume true, but there is no such run folder", out)
        return Start(out, processor, None, created, frozenset(), run_folder=False, stale=[])
    if not os.access(out, os.R_OK | os.W_OK | os.X_OK):
        raise CaptuneError("the run folder is not writable", out)
    before = frozenset(p.name for p in out.iterdir())
    run_folder = (out / cfg.RUN_CONFIG).is_file()
    if not run_folder:
        if before and not config.force:
            raise CaptuneError(f"holds other files and no run (no {cfg.RUN_CONFIG}); use another --out or an empty "
                               "folder, or pass --force to train into it anyway", out)
        if config.resume == "true":
            raise CaptuneError(f"--resume true, but this folder holds no run (no {cfg.RUN_CONFIG})", out)
        return Start(out, processor, None, None, before, run_folder=False, stale=[])
    resume_from = latest_checkpoint(out) if config.resume != "false" else None
    if config.resume == "true" and resume_from is None:
        raise CaptuneError("--resume true, but there is no complete checkpoint to resume from", out)
    if resume_from is not None:
        changes = compare(cfg.load_run_config(out), config, out)
        return Start(out, processor, resume_from, None, before, run_folder=True, stale=[], changes=changes)
    stale = checkpoint_folders(out)
    if stale and not config.force:
        why = "--resume false starts a new run" if config.resume == "false" else "this run starts from step 0"
        raise CaptuneError(f"holds checkpoints of an earlier run ({_names(stale)}) and {why}: pass --force to "
                           "delete them first, or use another --out", out)
    return Start(out, processor, None, None, before, run_folder=True, stale=stale)


def compare(before: cfg.TrainConfig, config: cfg.TrainConfig, out: Path) -> str:
    """Refuse to resume a run with another adapter shape, or (without --allow-changes) with options that make it
    another run; return what changed, "--option old -> new, ..." ("" if nothing)."""
    changed = [f.name for f in fields(config) if f.name not in COMMAND
               and not _same(f.name, getattr(before, f.name), getattr(config, f.name))]
    shape = [k for k in changed if k in SHAPE]
    if shape:
        raise CaptuneError(f"holds a run whose adapter has another shape ({_changes(before, config, shape)}): its "
                           "checkpoints cannot go on with it; use another --out, or --resume false --force to start "
                           "again", out)
    identity = [k for k in changed if k not in CONTINUABLE]  # a field not classified counts as one that defines the run
    if identity and not config.allow_changes:
        raise CaptuneError(f"holds a run with other settings ({_changes(before, config, identity)}): resuming with "
                           "them would make it another run; pass --allow-changes to resume with them anyway, use "
                           "another --out, or --resume false --force to start again", out)
    return _changes(before, config, changed, flagged=identity)


def _same(key: str, old: Any, new: Any) -> bool:
    if old == new:
        return True
    if key in cfg.PATHS and old and new:  # one folder, named otherwise (relative, absolute, through a link)
        try:
            return os.path.samefile(old, new)
        except OSError:
            return False
    return False


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple | list):
        return ",".join(map(str, value))
    return str(value) if value != "" else "''"


def _changes(before: cfg.TrainConfig, config: cfg.TrainConfig, keys: list[str], flagged: list[str] = ()) -> str:
    return ", ".join(f"--{k.replace('_', '-')} {_show(getattr(before, k))} -> {_show(getattr(config, k))}"
                     + (" (--allow-changes)" if k in flagged else "") for k in keys)


def _names(paths: list[Path]) -> str:
    names = [p.name for p in paths]
    return ", ".join(names[:3] + ([f"... ({len(names)} in all)"] if len(names) > 3 else []))


def begin(start: Start, config: cfg.TrainConfig, ctx: distributed.Context) -> None:
    """Make the run folder. A new run writes its captune.yaml at once: a start killed half-way leaves a run folder,
    which the next start treats as its own."""
    if not ctx.is_main:
        return
    start.out.mkdir(parents=True, exist_ok=True)
    if not start.run_folder:
        cfg.save(config, start.out)


def commit(start: Start, config: cfg.TrainConfig, ctx: distributed.Context, step: int, log) -> None:
    """The start-up has succeeded: now the folder becomes this run's. Starting from step 0 in a run folder deletes
    the earlier run's checkpoints (allowed by --force at the check) and TensorBoard logs; the configuration is
    written; the log is cut back to `step` (a resumed run rewrites what the interrupted one logged after its last
    checkpoint)."""
    if not ctx.is_main:
        return
    out = start.out
    if start.stale:
        for path in start.stale:
            delete_dir(path)  # renamed first: a kill half-way leaves no half-deleted checkpoint
        log.info(f"started again: deleted the earlier run's {_names(start.stale)} (--force)")
    if start.run_folder and start.resume_from is None:
        shutil.rmtree(out / TENSORBOARD, ignore_errors=True)
    cfg.save(config, out)
    path = out / "log.jsonl"
    if path.exists():
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows if r["step"] <= step))


def undo(start: Start, ctx: distributed.Context) -> None:
    """After a failed start: remove the folders this start made, or what it added to an existing folder."""
    if not ctx.is_main:
        return
    if start.created is not None:
        shutil.rmtree(start.created, ignore_errors=True)
        return
    if not start.out.is_dir():
        return
    for path in start.out.iterdir():
        if path.name not in start.before:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
