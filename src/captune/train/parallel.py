"""One process or many: trainable weights in float32, DDP or FSDP2 wrapping, and FSDP2's sharded loading, where each rank
streams the checkpoint and keeps only its own slice of every weight."""

from __future__ import annotations

import torch
from torch import nn

from captune import distributed
from captune.train import config as cfg
from captune.train.loss import CaptionLoss


def trainable_to_float32(model: nn.Module) -> None:
    # Trainable weights stay in float32 (the master copy); bf16 compute comes from autocast.
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()


def wrap_for_processes(loss_module: CaptionLoss, ctx: distributed.Context, config: cfg.TrainConfig, dtype: torch.dtype) -> nn.Module:
    if not ctx.distributed:
        return loss_module
    if config.fsdp:
        return shard_fsdp2(loss_module, dtype)
    from torch.nn.parallel import DistributedDataParallel

    # broadcast_buffers off: the only buffers (rotary frequencies) are the same everywhere, and a broadcast in
    # every forward would pair up wrongly if processes ran different numbers of micro-batches
    return DistributedDataParallel(loss_module, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
                                   broadcast_buffers=False)


def shard_fsdp2(loss_module: CaptionLoss, dtype: torch.dtype) -> CaptionLoss:
    """FSDP2 over the default process group, in place: each LLM decoder layer and vision layer is its own unit, the
    rest (embeddings, LM head, projector) the root's. Also what `benchmarks/sizes.py` measures, in a world of one."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # Frozen weights stay in the run's dtype, LoRA weights in float32; layers compute in the run's dtype and
    # gradients are reduced in float32.
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    net = loss_module.net
    for layer in list(net.model.language_model.layers) + list(net.model.vision_tower.encoder.layer):
        fully_shard(layer, mp_policy=policy)
    fully_shard(loss_module, mp_policy=policy)
    return loss_module


def load_shards(loss_module: CaptionLoss, config: cfg.TrainConfig, device: torch.device) -> None:
    """Give the meta-device model, already sharded by FSDP2, its weights: each rank streams the checkpoint one
    tensor at a time and keeps only its own slice, so no process ever holds the whole model."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    from captune.internvl.folder import open_checkpoint
    from captune.internvl.load import fill_weights, rebuild_buffers
    from captune.internvl.lora import init_lora_weights

    loss_module.to_empty(device=device)

    def place(param, full: torch.Tensor) -> None:
        full = full.to(device=device, dtype=param.dtype)
        with torch.no_grad():
            if isinstance(param, DTensor):  # src_data_rank=None: slice locally, no communication
                full = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
            param.copy_(full)

    fill_weights(loss_module.model, open_checkpoint(config.model), lambda _name, param, full: place(param, full))
    rebuild_buffers(loss_module.net, device)
    init_lora_weights(loss_module.model, config.seed, place)
