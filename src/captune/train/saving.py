"""Saving and restoring a run's state at a step: the PEFT adapter, optimizer, scheduler and every rank's RNG, under DDP
or FSDP2 (where the trainable weights and optimizer state are gathered on rank 0)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from captune import distributed
from captune.errors import CaptuneError
from captune.fileio import save_safetensors
from captune.train import config as cfg
from captune.train.loss import CaptionLoss
from captune.train.state import (
    checkpoint_name,
    prune_checkpoints,
    rng_state,
    set_rng_state,
    write_checkpoint,
)


def trainable_state(wrapped: nn.Module) -> dict:
    """Under FSDP2: the full (gathered) trainable weights, keyed by parameter name; frozen ones are never gathered."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
    )

    return get_model_state_dict(wrapped, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                  ignore_frozen_params=True))


def adapter_state(model: nn.Module, trainable: dict | None) -> dict:
    from peft import get_peft_model_state_dict

    if trainable is not None:
        return get_peft_model_state_dict(model.model, state_dict={k.removeprefix("model."): v
                                                                   for k, v in trainable.items()})
    return get_peft_model_state_dict(model.model)


def save_checkpoint(out: Path, step: int, loss_module: nn.Module, wrapped: nn.Module, optimizer, scheduler,
                    ctx: distributed.Context, config: cfg.TrainConfig, extra: dict, name: str | None = None) -> None:
    sharded = config.fsdp and ctx.distributed
    trainable = trainable_state(wrapped) if sharded else None
    adapter = adapter_state(loss_module, trainable) if ctx.is_main else None  # gathered on rank 0 only
    if sharded:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
        )

        opt_state = get_optimizer_state_dict(wrapped, optimizer,
                                             options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        opt_state = optimizer.state_dict()
    rngs = [None] * ctx.world_size
    if ctx.distributed:
        dist.all_gather_object(rngs, rng_state())
    else:
        rngs = [rng_state()]
    if not ctx.is_main:
        return
    peft_model = loss_module.model

    def write_adapter(folder: Path) -> None:
        peft_model.peft_config["default"].base_model_name_or_path = str(Path(config.model).resolve())
        peft_model.peft_config["default"].save_pretrained(str(folder))
        save_safetensors({k: v.detach().cpu().contiguous() for k, v in adapter.items()},
                         folder / "adapter_model.safetensors", metadata={"format": "pt"})

    state = {"step": step, "optimizer": opt_state, "scheduler": scheduler.state_dict(), "rng": rngs, **extra}
    if sharded:  # resuming loads these into the shards; the PEFT file's names no longer match the wrapped model
        state["trainable"] = trainable
    write_checkpoint(out, name or checkpoint_name(step), write_adapter, state, out / cfg.RUN_CONFIG)
    if name is None:
        prune_checkpoints(out, config.keep_checkpoints, upto=step)


def restore_checkpoint(path: Path, loss_module: CaptionLoss, wrapped, optimizer, scheduler, ctx, config) -> dict:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=False)
    if config.fsdp and ctx.distributed:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        if "trainable" not in state:
            raise CaptuneError("was not written by an FSDP run (no full trainable state); resume it without --fsdp",
                               path)
        result = set_model_state_dict(wrapped, state["trainable"],
                                      options=StateDictOptions(full_state_dict=True, strict=False))
        trainable = {n for n, p in wrapped.named_parameters() if p.requires_grad}
        missing = sorted(trainable & set(result.missing_keys))
        if missing:
            raise CaptuneError(f"does not hold {missing[0]} ({len(missing)} trainable weights missing): was it "
                               "written with other LoRA options?", path)
        set_optimizer_state_dict(wrapped, optimizer, state["optimizer"],
                                 options=StateDictOptions(full_state_dict=True))
    else:
        set_peft_model_state_dict(loss_module.model, load_file(path / "adapter_model.safetensors"))
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return state


def restore_rng(state: dict, ctx: distributed.Context) -> None:
    rngs = state["rng"]
    set_rng_state(rngs[ctx.rank] if ctx.rank < len(rngs) and rngs[ctx.rank] is not None else rngs[0])
