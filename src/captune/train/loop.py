"""`captune train`: LoRA fine-tuning with the tutorial's recipe, from one CPU to many GPUs, resumable.

    captune train --model data/InternVL2-2B --data data/coco --out runs/coco-lora
    torchrun --nproc-per-node 8 -m captune train --model data/InternVL2-2B --data data/coco --out runs/coco-lora

One optimizer step sees `global_batch_size` captions: `per_device_batch_size` per micro-batch and process,
accumulated over `global / (per_device x processes)` micro-batches. The loss of a step is the mean
cross-entropy over all of its supervised tokens (every process, every micro-batch), so it does not depend on
how the captions are split into micro-batches.
"""

from __future__ import annotations

import gc
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from captune import distributed
from captune.errors import CaptuneError, Interrupted
from captune.train import config as cfg
from captune.train import start
from captune.train.collate import Collate, TrainBatch
from captune.train.dataset import CaptionDataset, iter_batches, load_training_data
from captune.train.interrupts import Interrupts
from captune.train.loss import (
    CaptionLoss,
    compile_model,
    enable_gradient_checkpointing,
    should_compile,
)
from captune.train.parallel import load_shards, trainable_to_float32, wrap_for_processes
from captune.train.runlog import RunLog
from captune.train.saving import restore_checkpoint, restore_rng, save_checkpoint
from captune.train.schedule import Schedule
from captune.train.state import BEST, checkpoint_name, checkpoint_step


def _optimizer(model: nn.Module, config: cfg.TrainConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.learning_rate, betas=tuple(config.adam_betas), eps=config.adam_eps)


def _scheduler(optimizer, config: cfg.TrainConfig, total_steps: int):
    from transformers import (
        get_constant_schedule_with_warmup,
        get_cosine_schedule_with_warmup,
        get_linear_schedule_with_warmup,
    )

    warmup = math.ceil(total_steps * config.warmup_ratio)
    if config.lr_scheduler == "cosine":
        return get_cosine_schedule_with_warmup(optimizer, warmup, total_steps)
    if config.lr_scheduler == "linear":
        return get_linear_schedule_with_warmup(optimizer, warmup, total_steps)
    return get_constant_schedule_with_warmup(optimizer, warmup)


def _apply_hyperparameters(optimizer, scheduler, config: cfg.TrainConfig) -> None:
    """A restored optimizer and scheduler hold the checkpoint's hyper-parameters; a resumed run uses the configured
    ones (the same, unless --allow-changes) and its learning-rate schedule over its configured length."""
    for group, decay in zip(optimizer.param_groups, (config.weight_decay, 0.0), strict=True):
        group.update(weight_decay=decay, betas=tuple(config.adam_betas), eps=config.adam_eps,
                     initial_lr=config.learning_rate)
    scheduler.base_lrs = [config.learning_rate] * len(optimizer.param_groups)
    for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True):
        group["lr"] = base * factor(scheduler.last_epoch)  # as LambdaLR computes it: bit for bit when unchanged


@dataclass
class _Run:
    """How far a run got: what `train` needs to undo a failed start and to say where an interrupted run stopped."""

    interrupts: Interrupts
    start: start.Start | None = None
    log: RunLog | None = None
    batches: Any = None  # the DataLoader's iterator: dropped on the way out, which stops its workers
    training: bool = False  # past the start-up
    step: int = 0  # optimizer steps done
    checkpoint: tuple[int, Path] | None = None  # the newest checkpoint: step, folder

    def stopped(self, config: cfg.TrainConfig) -> str:
        where = f"stopped at step {self.step}" if self.training else "stopped while starting"
        if self.checkpoint is not None:
            step, path = self.checkpoint
            return f"{where}; the last checkpoint is {path} (step {step}); run the same command again to resume"
        if self.training:
            return (f"{where}, before the first checkpoint (--save-every {config.save_every}); run the same command "
                    "again to start again")
        return f"{where}, before any training; nothing was kept"


def train(config: cfg.TrainConfig) -> Path:
    """Run (or resume) a LoRA fine-tuning; return the folder of the final adapter.

    Every input is checked before anything is written (`start.check`); a start that fails leaves nothing behind.
    Ctrl-C stops it with `Interrupted`, saying where it stopped and what was kept."""
    ctx = distributed.init(config.device)
    run, finished = _Run(Interrupts()), False
    with run.interrupts:
        try:
            final = _train(config, ctx, run)
            finished = True
            return final
        except BaseException as e:
            if run.log is not None:
                run.log.close()
                run.log = None
            if run.start is not None and not run.training:
                start.undo(run.start, ctx)
            if isinstance(e, KeyboardInterrupt) or run.interrupts.requested:
                raise Interrupted(run.stopped(config)) from None
            raise
        finally:
            run.batches = None
            gc.unfreeze()
            if run.log is not None:
                run.log.close()  # on every path, before the teardown: flushes the logs, joins TensorBoard's thread
            # A barrier first when this process finished, none after an error (see distributed.shutdown).
            distributed.shutdown(ctx, finished=finished)


def _check_everywhere(config: cfg.TrainConfig, ctx: distributed.Context) -> start.Start:
    """`start.check` in every process, one outcome for all: on several nodes, where --out is not one shared folder,
    they would resume from different steps (or one fail while the others wait forever); then all raise one error."""
    try:
        plan, error = start.check(config, ctx), None
        seen = (f"resumes from {plan.resume_from.name}" if plan.resume_from else
                "starts again from step 0" if plan.run_folder else "starts a new run")
    except CaptuneError as e:
        seen, error = f"error: {e}", e
    distributed.same_everywhere(ctx, seen, error)
    return plan


def _train(config: cfg.TrainConfig, ctx: distributed.Context, run: _Run) -> Path:
    from tqdm import tqdm

    from captune.devices import resolve_dtype
    from captune.internvl.load import load
    from captune.internvl.lora import add_lora, count_parameters, init_lora_weights

    torch_dtype = resolve_dtype(None if config.dtype == "auto" else config.dtype, ctx.device)
    plan = _check_everywhere(config, ctx)  # every process has looked at OUT before the main one changes it
    run.start = plan
    if plan.resume_from is not None:
        run.checkpoint = (checkpoint_step(plan.resume_from), plan.resume_from)
    start.begin(plan, config, ctx)
    out, processor = plan.out, plan.processor
    log = run.log = RunLog(out, enabled=ctx.is_main, tensorboard=False)  # TensorBoard once the start has succeeded
    log.info(f"training {config.model} on {config.data} -> {out}" + (f" ({ctx.world_size} processes)" if ctx.distributed else ""))
    sharded = config.fsdp and ctx.distributed
    if config.fsdp and not sharded:
        log.info("warning: --fsdp shards the model over torchrun's processes; in one process it trains unsharded")
    data = load_training_data(config, processor, log, ctx)  # the data before the model
    shared = data.shared
    schedule = Schedule(data.lengths, data.groups.sizes, config, ctx.world_size, shared)
    log.info(f"{len(data.table):,} captions of {len(data.table.images):,} images, "
             f"{schedule.steps_per_epoch:,} steps per epoch, {schedule.total_steps:,} steps, "
             + (f"shared prefixes: {len(data.groups):,} image groups packed into rows of <= {config.token_budget} "
                "tokens" if shared else f"gradient accumulation {schedule.accumulation}"))
    # Under FSDP2 the model is built on the meta device and each rank loads only its shard of every weight.
    model, _ = load(config.model, dtype=torch_dtype, device="meta" if sharded else ctx.device)
    model = add_lora(model, config.lora_rank, config.lora_alpha, config.lora_dropout, config.lora_vision,
                     config.train_projector)
    if not sharded:
        init_lora_weights(model, config.seed)
    trainable_to_float32(model)
    torch.manual_seed(config.seed + ctx.rank)  # LoRA dropout: each rank draws its own numbers
    trainable, total = count_parameters(model)
    log.info(f"trainable params: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)")
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(model.base_model.model)
    model.train()

    if shared and ctx.device.type == "cuda":
        # FlexAttention skips the masked-out blocks; on the CPU (no FlexAttention backward) SDPA takes the mask dense
        model.base_model.model.model.language_model.set_attn_implementation("flex_attention")
    compiled = should_compile(config, ctx.device, shared, sharded)
    if compiled:
        log.info("compiling the model (torch.compile; the first steps take a few minutes)")
        compile_model(model.base_model.model, static_rows=shared)
    loss_module = CaptionLoss(model)
    wrapped = wrap_for_processes(loss_module, ctx, config, torch_dtype)
    if sharded:
        load_shards(loss_module, config, ctx.device)
    optimizer = _optimizer(wrapped, config)
    scheduler = _scheduler(optimizer, config, schedule.total_steps)
    if math.ceil(schedule.total_steps * config.warmup_ratio) >= schedule.total_steps:
        log.info(f"warning: all {schedule.total_steps} steps warm the learning rate up (--warmup-ratio "
                 f"{config.warmup_ratio:g}): it starts at 0 and never reaches --learning-rate {config.learning_rate:g}")
    start_step, best, state = 0, {"cider": -1.0}, None
    if plan.resume_from is not None:
        state = restore_checkpoint(plan.resume_from, loss_module, wrapped, optimizer, scheduler, ctx, config)
        _apply_hyperparameters(optimizer, scheduler, config)
        start_step, best = state["step"], state.get("best", best)
        log.info(f"resumed from {plan.resume_from} at step {start_step}")
        if plan.changes:
            log.info(f"changed since the run was last started: {plan.changes}")

    dataset = CaptionDataset(data.table, data.groups, processor, config.max_tiles, config.max_seq_length)
    collate = Collate(processor.pad_token_id, shared, config.token_budget, static=compiled)
    run.batches = iter_batches(dataset, list(schedule.for_rank(ctx.rank, start_step)), collate, config.num_workers)
    start.commit(plan, config, ctx, start_step, log)
    run.training, run.step = True, start_step
    log.close()
    log = run.log = RunLog(out, enabled=ctx.is_main)
    if state is not None:  # after everything that draws random numbers on the way to the first step
        restore_rng(state, ctx)
    autocast = (torch.autocast(device_type=ctx.device.type, dtype=torch_dtype)
                if torch_dtype != torch.float32 else nullcontext())
    if ctx.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(ctx.device)

    bar = tqdm(total=schedule.total_steps, initial=start_step, desc="training", unit="step",
               disable=not ctx.is_main, dynamic_ncols=True)
    skipped_total, stand_in = 0, None

    def save(at: int) -> None:
        """The checkpoint of step `at`, recorded in `run` (for the message of a stop) once it is complete."""
        saved = out / checkpoint_name(at)
        try:
            save_checkpoint(out, at, loss_module, wrapped, optimizer, scheduler, ctx, config, {"best": best})
        except BaseException:
            if saved.is_dir():  # complete once renamed: stopped while pruning the older ones
                run.checkpoint = (at, saved)
            raise
        run.checkpoint = (at, saved)

    run.interrupts.stop_at_step_end = True
    try:
        for step in range(start_step, schedule.total_steps):
            t0 = time.perf_counter()
            micro: list[TrainBatch | None] = []
            skipped = 0
            for _ in range(schedule.micro_batches(ctx.rank, step)):
                batch, errors = next(run.batches)  # no local name: dropping run.batches stops the workers
                skipped += sum(e.get("captions", 1) for e in errors)
                for e in errors:
                    log.info(f"skipped a sample: {e['error']}")
                micro.append(batch)  # None: every image of the micro-batch failed to load
            usable = [b for b in micro if b is not None]
            counts = torch.tensor([sum(b.num_tokens for b in usable), sum(b.num_captions for b in usable),
                                   sum(b.num_real_tokens for b in usable), skipped, len(micro) - len(usable),
                                   run.interrupts.requested], dtype=torch.float64, device=ctx.device)
            if ctx.distributed:
                dist.all_reduce(counts)
            if counts[5].item():  # Ctrl-C or SIGTERM, here or in another process: all stop here, at step `step`'s end
                if step > (run.checkpoint[0] if run.checkpoint else 0):  # keep what was trained since the last save
                    save(step)
                    distributed.barrier(ctx)  # none stops (and makes torchrun or srun end the rest) mid-write
                run.interrupts.stop()
            skipped_total += int(counts[3].item())
            if counts[4].item():
                log.info(f"step {step + 1}: {int(counts[4].item())} micro-batch(es) without a loadable image; "
                         "ran zero-weight stand-ins")
            n_tokens = max(counts[0].item(), 1.0)
            loss_total = torch.zeros((), device=ctx.device)
            for i, batch in enumerate(micro):
                weight = 1.0
                if batch is None:
                    # Skipping it would leave this process one forward/backward (and its collectives) short
                    # of the others, and DDP/FSDP would wait forever: run a stand-in that counts for nothing.
                    stand_in = stand_in or collate([dataset.stand_in()])[0]
                    batch, weight = stand_in, 0.0
                batch = batch.to(ctx.device, torch_dtype)
                sync = i == len(micro) - 1 or not ctx.distributed or config.fsdp
                with (wrapped.no_sync() if not sync and hasattr(wrapped, "no_sync") else nullcontext()), autocast:
                    loss_sum = wrapped(batch.input_ids, batch.targets, batch.attention_mask, batch.position_ids,
                                       batch.pixel_values, batch.num_tokens)
                # DDP averages gradients over processes; scale so the result is the mean over all tokens.
                (loss_sum * (weight * ctx.world_size / n_tokens)).backward()
                loss_total += weight * loss_sum.detach()
            grad_norm = torch.nn.utils.clip_grad_norm_([p for p in wrapped.parameters() if p.requires_grad],
                                                       config.max_grad_norm)
            lr = optimizer.param_groups[0]["lr"]  # this step's (after the step the scheduler holds the next one's)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if ctx.distributed:
                dist.all_reduce(loss_total)
            loss = loss_total.item() / n_tokens
            done = run.step = step + 1
            elapsed = time.perf_counter() - t0
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
            if done % config.log_every == 0 or done == schedule.total_steps:
                record = {"loss": loss, "lr": lr, "grad_norm": float(grad_norm),
                          "samples_per_s": counts[1].item() / elapsed, "tokens_per_s": counts[2].item() / elapsed,
                          "skipped": skipped_total}
                if ctx.device.type == "cuda":
                    record["gpu_memory_gb"] = torch.cuda.max_memory_allocated(ctx.device) / 2**30
                log.scalars(done, record)
            if config.eval_every > 0 and done % config.eval_every == 0:
                best = _evaluate_during_training(done, loss_module, wrapped, optimizer, scheduler, processor, ctx,
                                                 config, log, best)
            if done % config.save_every == 0 or done == schedule.total_steps:
                save(done)
    finally:
        run.interrupts.stop_at_step_end = False
        bar.close()  # a message that follows (an interrupt) starts on a line of its own
    # Rank 0 may still be writing the last checkpoint, which the others must not look for yet.
    distributed.barrier(ctx)
    if ctx.device.type == "cuda":
        log.info(f"peak GPU memory {torch.cuda.max_memory_allocated(ctx.device) / 2**30:.1f} GB")
    final = run.checkpoint[1]
    log.info(f"done: adapter in {final}")
    return final


def _evaluate_during_training(step, loss_module, wrapped, optimizer, scheduler, processor, ctx, config, log, best):
    """Caption `eval_limit` test images with the current weights, log BLEU-4/METEOR/CIDEr, keep the best."""
    import tempfile

    from captune.data.evalsets import resolve_eval_set
    from captune.eval.evaluate import CaptionLog, EvalSettings, generate_captions
    from captune.eval.scoring import score_captions

    improved = False
    if ctx.is_main:
        evalset = resolve_eval_set(config.eval_data or config.data, limit=config.eval_limit)
        net = loss_module.net
        net.eval()
        dtype = next(p.dtype for p in net.model.language_model.parameters() if not p.requires_grad)
        # generation runs eagerly (the compiled LLM is for the training shape) and, like training, under autocast:
        # the float32 LoRA weights meet bf16 activations
        with tempfile.TemporaryDirectory() as tmp, torch.compiler.set_stance("force_eager"), \
                torch.autocast(device_type=ctx.device.type, dtype=dtype, enabled=dtype != torch.float32):
            caption_log = CaptionLog(Path(tmp), 0, False)
            settings = EvalSettings(model=config.model, test_json=str(evalset.gt_path), max_tiles=config.max_tiles)
            generate_captions(net, processor, evalset.images, caption_log, settings, batch_size=8, num_workers=0,
                              progress=False)
            caption_log.close()
            from captune.eval.evaluate import read_jsonl

            results = [{"image_id": r["image_id"], "caption": r["caption"]} for r in read_jsonl(caption_log.captions_path)]
        net.train()
        metrics = score_captions(results, evalset.gt_path).metrics
        log.scalars(step, {k: v for k, v in metrics.items() if k in ("Bleu_4", "METEOR", "CIDEr")}, prefix="eval")
        log.info(f"step {step}: BLEU-4 {metrics['Bleu_4']:.3f} METEOR {metrics['METEOR']:.3f} CIDEr {metrics['CIDEr']:.3f}")
        improved = metrics["CIDEr"] > best["cider"]
        if improved:
            best = {"cider": metrics["CIDEr"], "step": step}
    if ctx.distributed:
        box = [best, improved]
        dist.broadcast_object_list(box)
        best, improved = box
    if improved:
        save_checkpoint(Path(config.out), step, loss_module, wrapped, optimizer, scheduler, ctx, config,
                        {"best": best}, name=BEST)
    return best
