"""One model over K GPUs (`captune eval/caption --gpus-per-model K`): which GPU holds which module, and which GPUs.

InternVL2-40B (75 GB in bf16) does not fit one 80 GB GPU and 76B (142 GB) fits none, so a model is cut between
decoder layers, as InternVL's own `split_model` does: the vision tower, the projector and the embeddings stay with
the first LLM layers on the first GPU (where the inputs go), the final norm and the LM head go on the last, and the
LLM layers are spread so that every GPU is filled to the same fraction of what it can hold, counting on each its
weights, its layers' KV cache and its activations (`captune plan`'s figures, `plan.eval_memory`: the first GPU also
holds the vision tower's weights and its activations, so it gets fewer layers). A layer is never split.

`Placement.device_map` names the modules of transformers' native `InternVLForConditionalGeneration`;
`captune.internvl.load.load(..., device_map=...)` streams each weight to its GPU and dispatches the model.
`assign_gpus` picks this process's GPUs (K consecutive ones per torchrun process) and refuses, before anything
loads, what cannot work.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from captune.devices import dtype_name, resolve_device, resolve_dtype
from captune.errors import CaptuneError
from captune.internvl import plan as P
from captune.internvl.lora import model_folder

# Modules of the native class: those that run before the LLM's layers, and after them.
FIRST = ("model.vision_tower", "model.multi_modal_projector", "model.language_model.embed_tokens",
         "model.language_model.rotary_emb")
LAST = ("model.language_model.norm", "lm_head")
LAYER = "model.language_model.layers.{}"
MIN_BATCH = 8  # the smallest batch `auto` plans for, as `captune plan`'s "needs N GPUs" (smaller ones waste the GPUs)


@dataclass(frozen=True)
class Costs:
    """Bytes of one model's parts at a batch: weights before, in and after the LLM's layers; the KV cache of one
    layer; activations of the LLM's prefill (on every GPU) and of the vision tower (on the first, beside its KV)."""

    first: float
    layer: float
    last: float
    kv: float
    llm_act: float
    vision_act: float

    @classmethod
    def of(cls, s: P.Shape, batch: int, bytes_per_param: int = 2) -> Costs:
        counts, scale = P.parameter_counts(s), bytes_per_param / 2  # the plan's figures are bf16
        llm_act, vision_act = P.eval_activations(s, batch)
        kv = batch * P.EVAL_KV_TOKENS * P.kv_bytes_per_token(s) / s.layers
        first = counts["vision_tower"] + counts["projector"] + counts["llm_embeddings"]
        return cls(first=first * bytes_per_param, layer=P.llm_layer_parameters(s) * bytes_per_param,
                   last=(counts["lm_head"] + s.hidden) * bytes_per_param, kv=kv * scale, llm_act=llm_act * scale,
                   vision_act=vision_act * scale)

    def fixed(self, gpu: int, k: int) -> float:
        return (self.first if gpu == 0 else 0.0) + (self.last if gpu == k - 1 else 0.0)

    def memory(self, gpu: int, k: int, layers: int) -> dict[str, float]:
        """GB on GPU `gpu` of `k` holding `layers` LLM layers: as `plan.eval_memory` for the whole model."""
        kv = layers * self.kv
        act = max(self.llm_act, self.vision_act) if gpu == 0 else self.llm_act
        out = {"weights": (self.fixed(gpu, k) + layers * self.layer) / P.GB, "kv_cache": kv / P.GB,
               "activations": act / P.GB}
        out["total"] = sum(out.values())
        return out

    def layers_within(self, gpu: int, k: int, budget: float) -> float:
        """The (fractional) number of layers GPU `gpu` of `k` can hold within `budget` bytes."""
        act = max(self.llm_act, self.vision_act) if gpu == 0 else self.llm_act
        return (budget - self.fixed(gpu, k) - act) / (self.layer + self.kv)


@dataclass(frozen=True)
class Placement:
    """One model over K GPUs: LLM layers per GPU (in order), each GPU's memory (GB: weights, kv_cache, activations,
    total) against what it may hold (`capacity_gb`), and the balanced fill `level`: each GPU's total is within one
    layer's weights and KV cache of `level` x its capacity, except the first (last) GPU when its vision tower (LM head)
    alone is over that share; it then holds a single layer."""

    layers: tuple[int, ...]
    memory_gb: tuple[dict[str, float], ...]
    capacity_gb: tuple[float, ...]
    level: float
    batch: int

    @property
    def gpus(self) -> int:
        return len(self.layers)

    @property
    def fits(self) -> bool:
        return all(m["total"] <= c for m, c in zip(self.memory_gb, self.capacity_gb))

    def device_map(self, devices: Sequence | None = None) -> dict:
        """Module name -> device (`devices[i]` for GPU i; default: 0 ... K-1), every module of the model once."""
        devices = list(range(self.gpus)) if devices is None else list(devices)
        if len(devices) != self.gpus:
            raise ValueError(f"{self.gpus} devices needed, {len(devices)} given")
        out = dict.fromkeys(FIRST, devices[0])
        start = 0
        for gpu, n in enumerate(self.layers):
            out.update({LAYER.format(j): devices[gpu] for j in range(start, start + n)})
            start += n
        out.update(dict.fromkeys(LAST, devices[-1]))
        return out


def place(s: P.Shape, capacities_gb: Sequence[float], batch: int, bytes_per_param: int = 2) -> Placement:
    """Spread a model (its `Shape`) over GPUs that may hold `capacities_gb` each, at `batch` images.

    The layers go where every GPU ends up filled to the same fraction of its capacity (found by bisection on that
    fraction, each GPU taking the fractional number of layers it holds there, at least one), then whole layers are
    handed out by rounding the running total, so no GPU is more than one layer off its balanced share, and moved
    between neighbours where that lowers the fuller one. The result may not fit (`fits`); `fewest_gpus` looks for the
    smallest K that does.
    """
    k, total = len(capacities_gb), s.layers
    if not 1 <= k <= total:
        raise CaptuneError(f"a model of {total} LLM layers can be spread over 1 to {total} GPUs, not {k}")
    costs = Costs.of(s, batch, bytes_per_param)
    caps = [c * P.GB for c in capacities_gb]

    def share(level: float) -> list[float]:
        return [min(max(costs.layers_within(i, k, level * caps[i]), 1.0), total) for i in range(k)]

    low, high = 0.0, 1.0
    while sum(share(high)) < total:
        high *= 2
    for _ in range(100):
        mid = (low + high) / 2
        low, high = (mid, high) if sum(share(mid)) < total else (low, mid)
    shares, counts, running, taken = share(high), [], 0.0, 0
    for x in shares:
        running += x
        counts.append(min(round(running), total) - taken)
        taken += counts[-1]
    counts[-1] += total - taken
    counts = _even_out(counts, costs, caps)
    memory = tuple(costs.memory(i, k, n) for i, n in enumerate(counts))
    return Placement(tuple(counts), memory, tuple(capacities_gb), high, batch)


def _even_out(counts: list[int], costs: Costs, caps: list[float]) -> list[int]:
    """Rounding may leave a GPU a layer fuller than it need be: move a layer to a neighbour while that lowers the
    fuller of the two (as a fraction of capacity)."""
    k = len(counts)

    def fill(i: int, n: int) -> float:
        return costs.memory(i, k, n)["total"] * P.GB / caps[i]

    moved = True
    while moved:
        moved = False
        for i in range(k - 1):
            for give, take in ((i, i + 1), (i + 1, i)):
                if counts[give] > 1 and max(fill(give, counts[give] - 1), fill(take, counts[take] + 1)) \
                        < max(fill(give, counts[give]), fill(take, counts[take])) - 1e-12:
                    counts[give] -= 1
                    counts[take] += 1
                    moved = True
    return counts


def fewest_gpus(s: P.Shape, capacity_gb: float, batch: int, bytes_per_param: int = 2,
                most: int | None = None) -> Placement | None:
    """The placement over the fewest GPUs of `capacity_gb` each that fits (at most `most`, default one per layer)."""
    for k in range(1, min(most or s.layers, s.layers) + 1):
        placement = place(s, [capacity_gb] * k, batch, bytes_per_param)
        if placement.fits:
            return placement
    return None


# ------------------------------------------------------------------------------------------------- this process's GPUs


@dataclass(frozen=True)
class ModelGPUs:
    """Where this process's model goes: `device` (its inputs' device, the first GPU, or the CPU), `device_map` (None:
    the whole model on `device`) and the batch planned to fit (None: not planned, on the CPU)."""

    device: torch.device
    device_map: dict | None = None
    batch: int | None = None
    placement: Placement | None = None


def gpu_memory(index: int) -> tuple[float, float]:
    """(total, free) GB of GPU `index`."""
    free, total = torch.cuda.mem_get_info(index)
    return total / P.GB, free / P.GB


def usable_gb(total: float, free: float) -> float:
    """What a GPU may hold: its free memory less the share of the card `captune plan` keeps free."""
    return free - (1 - P.USABLE_FRACTION) * total


def parse_gpus_per_model(value: int | str) -> int | None:
    """"auto" -> None; a whole number at least 1 -> it; else a CaptuneError."""
    if value in (None, "auto"):
        return None
    text = str(value).strip()
    if not text.isdigit() or int(text) < 1:
        raise CaptuneError(f"--gpus-per-model must be auto or a whole number at least 1, not {value!r}")
    return int(text)


def model_name(s: P.Shape) -> str:
    total = P.parameter_counts(s)["total"]
    size = P.release_size(total)
    return P.release_name(size) if size else f"the model ({total / 1e9:.1f} B parameters)"


def assign_gpus(model: str | Path, gpus_per_model: int | str = "auto", device: str = "auto",
                batch_size: int | None = None, default_batch: int = 64, dtype: str = "auto",
                processes: int | None = None) -> ModelGPUs:
    """This process's GPUs for `model` (a checkpoint or adapter folder; only config.json is read) and the batch.

    `gpus_per_model` K, or "auto": the fewest that fit (from the config and the GPUs' memory) among those that divide
    this process's share of the GPUs (visible / processes), so that the models tile the GPUs as `captune plan` lays
    them out (InternVL2-76B on 8 x 80 GB: 4 per model, two processes). Under torchrun (`processes`, default
    LOCAL_WORLD_SIZE) local rank r takes GPUs r*K ... r*K+K-1 (from `device`'s index). The batch is `batch_size`, else
    the largest of `plan.EVAL_BATCHES` up to `default_batch` that fits (at least 8: `auto` plans for 8). Refused with
    one CaptuneError, before anything loads: K more than the GPUs visible, processes x K more than the GPUs visible, K
    not dividing the GPUs visible, a model that does not fit (saying what would). On the CPU: K must be auto or 1.
    """
    asked = parse_gpus_per_model(gpus_per_model)
    dev = resolve_device(device)
    if dev.type != "cuda":
        if asked not in (None, 1):
            raise CaptuneError(f"--gpus-per-model {asked} spreads a model over CUDA GPUs: "
                               + ("none is visible" if not torch.cuda.is_available() else f"--device is {device}"))
        return ModelGPUs(dev, batch=batch_size)
    first, procs = dev.index or 0, processes or int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    visible = torch.cuda.device_count() - first
    rank = int(os.environ.get("LOCAL_RANK", "0")) if procs > 1 else 0
    where = f"{visible} GPU{'s are' if visible != 1 else ' is'} visible" + (f" from cuda:{first}" if first else "")
    if asked is not None and asked > visible:
        raise CaptuneError(f"--gpus-per-model {asked}: {where}")
    if asked is not None and procs * asked > visible:
        raise CaptuneError(f"--gpus-per-model {asked} for each of {procs} processes (torchrun --nproc-per-node "
                           f"{procs}) needs {procs * asked} GPUs; {where}: use --nproc-per-node {visible // asked}")
    if asked is not None and procs > 1 and visible % asked:
        fit = ", ".join(str(k) for k in range(1, visible + 1) if visible % k == 0)
        raise CaptuneError(f"--gpus-per-model {asked} does not divide the GPUs: {where}, so {visible - procs * asked} "
                           f"would hold no model; use one of {fit} (or CUDA_VISIBLE_DEVICES)")
    s = P.model_shape(P.read_config(model_folder(model)))
    torch_dtype = resolve_dtype(dtype, dev)
    width, floor = torch_dtype.itemsize, batch_size or min(MIN_BATCH, default_batch)
    batches = [batch_size] if batch_size else [b for b in (default_batch, *P.EVAL_BATCHES)
                                                if floor <= b <= default_batch]
    # One process reads the free memory of the GPUs it would take. Several would disturb each other (a CUDA context
    # on every GPU, free memory read while another process loads), so they plan from the cards' size, then each
    # checks its own GPUs' free memory.
    free, memory = procs == 1, {}

    def capacities(k: int, read_free: bool) -> list[float]:
        gpus = range(first + rank * k, first + rank * k + k)
        for i in gpus:
            if (i, read_free) not in memory:
                total, left = gpu_memory(i) if read_free else (card_gb(i),) * 2
                memory[i, read_free] = (total, usable_gb(total, left))
        return [memory[i, read_free][1] for i in gpus]

    share = visible // procs
    fitting = (p for k in ([asked] if asked else [k for k in range(1, min(share, s.layers) + 1) if share % k == 0])
               if (p := place(s, capacities(k, free), floor, width)).fits)
    chosen = next(fitting, None)
    if chosen is None:
        card, usable = memory[first + rank, free][0], capacities(1, free)[0]
        raise CaptuneError(_does_not_fit(s, asked, floor, torch_dtype, procs, visible, where, usable, card))
    k = chosen.gpus
    if not free:
        chosen = place(s, capacities(k, True), floor, width)
        if not chosen.fits:
            gpus = f"cuda:{first + rank * k}" + (f" to cuda:{first + rank * k + k - 1}" if k > 1 else "")
            raise CaptuneError(f"{model_name(s)} over {gpus} (local rank {rank}) needs {_gb(chosen.memory_gb)} GB "
                               f"per GPU at batch {floor}; free now: {_gb(chosen.capacity_gb)} GB (other processes?)")
    chosen = next(p for b in batches if (p := place(s, list(chosen.capacity_gb), b, width)).fits)
    if procs > 1 and visible // k > procs and os.environ.get("RANK", "0") == "0":
        warnings.warn(f"{procs} processes x {k} GPU{'s' if k > 1 else ''} per model use {procs * k} of the {visible} GPUs visible; "
                      f"torchrun --nproc-per-node {visible // k} would use {visible // k * k}", stacklevel=2)
    devices = [torch.device("cuda", first + rank * k + i) for i in range(k)]
    return ModelGPUs(devices[0], chosen.device_map(devices) if k > 1 else None, chosen.batch, chosen)


def card_gb(index: int | torch.device) -> float:
    """Total GB of a GPU (2^30 bytes, as `captune plan --gpu-memory`; no CUDA context is made for it)."""
    return torch.cuda.get_device_properties(index).total_memory / P.GB


def _gb(values) -> str:
    numbers = [v["total"] if isinstance(v, dict) else v for v in values]
    return ", ".join(f"{v:.0f}" for v in numbers)


def _does_not_fit(s: P.Shape, asked: int | None, batch: int, dtype: torch.dtype, procs: int, visible: int,
                  where: str, usable: float, card: float) -> str:
    """What would fit: GPUs of this size per model (and processes per node), or a smaller batch."""
    width = dtype.itemsize
    name, weights = model_name(s), P.parameter_counts(s)["total"] * width / P.GB
    need = fewest_gpus(s, usable, batch, width)
    size = f"{card:.0f} GB" + (f" ({usable:.0f} GB usable now)" if usable < 0.85 * card else "")
    plural = "s" if need and need.gpus > 1 else ""
    fact = (f"{name} needs {need.gpus} GPU{plural} of {size} per model at batch {batch}" if need
            else f"{name} does not fit GPUs of {size} at batch {batch}, however many")
    fact += f" ({weights:.0f} GB of weights in {dtype_name(dtype)})"
    if asked is not None:
        smaller = next((b for b in (*P.EVAL_BATCHES, 1) if b < batch and asked <= s.layers
                        and place(s, [usable] * asked, b, width).fits), None)
        return f"{fact}; --gpus-per-model {asked} given" + (f" (--batch-size {smaller} fits {asked})" if smaller
                                                             else "")
    if need and procs > 1 and need.gpus <= visible:
        return (f"{fact}; {procs} processes (torchrun --nproc-per-node {procs}) need {procs * need.gpus}, {where}: "
                f"use --nproc-per-node {visible // need.gpus}")
    return f"{fact}; {where}"
