"""One process or many: the same commands run plainly or under `torchrun --nproc-per-node N`."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from captune.devices import resolve_device


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init(device: str | None = "auto") -> Context:
    """Read torchrun's environment; start the process group (NCCL on GPUs, gloo on CPUs) when there are several."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank if dev.index is None else dev.index)
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", device_id=dev if dev.type == "cuda" else None)
    return Context(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def barrier(ctx: Context) -> None:
    if ctx.distributed:
        dist.barrier()


def shutdown(ctx: Context, finished: bool = False) -> None:
    """Tear the process group down.

    `finished`: this process got to the end without an error. It then waits at a barrier for all the others
    first, so that none closes its connections while another is still in a collective, or still writing a
    checkpoint, that it waits for (that collective would fail on the closed connection). Otherwise (after an error)
    no barrier: the others may be inside another collective, which a barrier would be paired with (gloo then
    receives a message of the wrong size and fails an enforce in its event-loop thread, where nothing catches it:
    std::terminate, SIGABRT; NCCL hangs); their collectives fail once this process is gone. A failure of that
    teardown is not raised over the error that ended the run.
    """
    if not (ctx.distributed and dist.is_initialized()):
        return
    if finished:
        dist.barrier()
        dist.destroy_process_group()
        return
    try:
        dist.destroy_process_group()
    except Exception:  # the error propagating from the run is the one to report
        pass
