"""One process or many: the same commands run plainly or under `torchrun --nproc-per-node N`, on one node or on
several (`--nnodes`); `rank` is the global rank, the one that decides what is written, `local_rank` only picks the
GPU."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from captune.devices import resolve_device
from captune.errors import CaptuneError


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
    """Read torchrun's environment; start the process group (NCCL on GPUs, gloo on CPUs) when there are several.

    Several Slurm tasks without torchrun's environment (`srun -N 2 captune train ...`) are refused: each would be
    a whole run of its own, all writing the same folder; torchrun is started once per node instead."""
    tasks = int(os.environ.get("SLURM_STEP_NUM_TASKS", "1") or "1")
    if tasks > 1 and "WORLD_SIZE" not in os.environ:
        raise CaptuneError(f"started as {tasks} Slurm tasks without torchrun: each would run alone; start torchrun "
                           "once per node (srun torchrun --nnodes ...; see examples/slurm/captune.sbatch)")
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


def disagreement(ctx: Context, value: str) -> str | None:
    """Every process's `value` compared: None when all are the same (or there is one process), else which ranks
    have which ("rank 0: A; rank 1 and 6 more: B"), for one error that every process then raises. For what each
    process reads from files that must be the same everywhere (the run folder, the data): on several nodes they
    differ when a folder is not shared, and processes that decide differently would train different runs or wait
    for each other forever."""
    if not ctx.distributed:
        return None
    values: list = [None] * ctx.world_size
    dist.all_gather_object(values, value)
    ranks: dict[str, list[int]] = {}
    for rank, seen in enumerate(values):
        ranks.setdefault(seen, []).append(rank)
    if len(ranks) == 1:
        return None
    return "; ".join(f"rank {r[0]}" + (f" and {len(r) - 1} more" if len(r) > 1 else "") + f": {seen}"
                     for seen, r in ranks.items())


def same_everywhere(ctx: Context, seen: str, error: BaseException | None = None) -> None:
    """Go on only if every process found the same at its start (`seen`: what it read, or its error): else every
    process raises one error saying which ranks saw what. Then this process's own `error`, if any, is raised."""
    differ = disagreement(ctx, seen)
    if differ:
        raise CaptuneError(f"the processes see different files ({differ}): on several nodes every node must see "
                           "the same model and data, and the output folder must be one folder that all of them share")
    if error is not None:
        raise error


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
