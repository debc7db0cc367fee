"""`captune plan`: what an InternVL2 model needs, from its config.json alone (no weights).

The exact parameter count per part; the memory per GPU of evaluation (bf16 weights, KV cache, activations) and of
LoRA training (frozen weights or their FSDP2 shard, LoRA weights + gradients + AdamW state in float32, activations at
the token budget with and without gradient checkpointing); the strategy for N GPUs of G GB (one GPU, DDP or FSDP2;
GPUs per model and batch for evaluation; checkpointing and token budget for training) and the time it would take.

GB are 2^30 bytes, what `torch.cuda.max_memory_allocated` reports and docs/benchmarks.md records. The constants
below are fitted to measured peaks and speeds (bf16, SDPA/FlexAttention); each says which. Times assume an
H100/H200-class GPU (989 TFLOP/s dense bf16) and are estimates (within 20% of the calibration runs).
"""

from __future__ import annotations

import json as jsonlib
import math
from collections import namedtuple
from dataclasses import dataclass, fields, replace
from pathlib import Path

from captune.errors import CaptuneError
from captune.fileio import read_json
from captune.internvl import config as cfg
from captune.internvl.folder import INTERNVL_CONFIG_NAME, detect_layout

GB = 2**30
USABLE_FRACTION = 0.90  # 10% of a card kept free: CUDA context, cuBLAS workspaces, allocator fragmentation
PEAK_FLOPS = 989e12  # H100/H200 dense bf16
BANDWIDTH = 4.8e12  # H200 bytes/s (the calibration GPU): a decoding step reads every weight once
# Evaluation as `captune eval` and the 2B-76B runs: 7 tiles (6 + thumbnail), a 1,851-token prompt, 30 tokens.
EVAL_TILES, EVAL_PROMPT, EVAL_NEW_TOKENS, EVAL_IMAGES = 7, 1851, 30, 5000
EVAL_KV_TOKENS = -(-(EVAL_PROMPT + EVAL_NEW_TOKENS) // 64) * 64  # the decoder's static cache (the prompt writes into it)
EVAL_BATCHES = (64, 32, 16, 8, 4, 2, 1)  # 64: captune eval's default on a GPU (128 gains 3% for 2B at twice the KV)
# Prefill activations per prompt token, in bf16 elements per unit of MLP width (gate, up, their product, ...): fitted to
# `generate`'s peaks (2B at batch 64/128, 26B/40B at 16; docs/benchmarks.md, sixth session).
EVAL_ACT_PER_MLP = 4.5
# The vision tower's activations per patch token, in bf16 elements per unit of its MLP width, plus 3 hidden vectors:
# fitted (from above) to captune's decoder on the 2B at batch 64 (27.9 GB; H200, 2026-12-01, seventh session), whose
# cache is allocated before the vision tower runs. The larger sizes were not measured again since.
EVAL_VISION_ACT_PER_MLP = 2.9
# Evaluation speed with captune's decoder, fitted to 2B 29.3 images/s (batch 64), 8B 12.0, 26B 2.81, 40B 2.13, 76B 1.39
EVAL_MFU = 0.51  # (batch 16; H200, docs/benchmarks.md): prefill compute efficiency; all five within 5.3%
DECODE_LAYER_S = 0.25e-3  # per decoder layer per new token (a graph replay: attention over the cache), above bandwidth
EVAL_HOST_S = 0.008  # per image: the data path and what runs between batches
# --compile auto from this many images per process, one GPU per model: ~20 s to compile, 5 ms saved per image
COMPILE_FROM_IMAGES, EVAL_COMPILED_PREFILL = 4_000, 0.81  # prefill 1.699 -> 1.380 s per batch of 64 (2B, H200)
SPLIT_EFFICIENCY = 0.95  # one model over K GPUs runs its layers in turn, hidden states hop GPUs (not measured)
# Training on COCO Karpathy train with shared prefixes: one row segment per image and its ~5 captions.
COCO_IMAGES, COCO_CAPTIONS = 113_287, 566_747
GROUP_TOKENS = 1915  # a 6-tile image + its captions: 7,661 tokens per 4 (docs/benchmarks.md, profile)
TRAIN_BUDGETS = (65536, 32768, 16384, 8192, 4096, 2048)
# Saved activations per token of one LLM layer without checkpointing, in bf16 elements: ACT_H x hidden + ACT_I x MLP
# width + one rank-r intermediate per LoRA layer. The total (157 kB per layer for 2B) is fitted to the 2B eager peaks,
# 32.7 GB at 7.7k tokens and 58.8 GB at 15.3k (docs/benchmarks.md); the split between hidden and MLP width follows a
# LoRA'd Llama layer's saved tensors (norm inputs, q/k/v/o and gate/up/down inputs with their dropout copies, ...).
ACT_H, ACT_I = 16, 5.5
COMPILE_FACTOR = 0.78  # compiled layers save less: 2B compiled 29.1 GB at 8,192, 51.8 GB at 16,384 (padded rows)
# Per token outside the layers (embeddings, vision features, final norm, loss), bytes per hidden unit, fitted to 2B with
# checkpointing: 8.4 GB at 7.7k tokens, 10.5 GB at 15.3k. With checkpointing each layer keeps its input (2 bytes per
# hidden unit) and one layer is live at a time, which predicts the 26B/40B r128 steps on 7.2k tokens with
# checkpointing (68/100 GB) at -5%/-1%.
MISC_PER_H = 25
LOGIT_BYTES = 10  # full logits (the tutorial's loss): bf16 + float32 copy + float32 gradient; captune's: supervised only
LORA_STATE_BYTES = 16  # float32 weight, gradient, AdamW m and v; DDP adds a float32 gradient bucket
# Model FLOPs utilisation at 16,384-token rows: compiled 2B 38.7k tokens/s (1.56 h per epoch); eager 2B 19.5-27.7k
# tokens/s, 26B 4.7 s and 40B 6.1 s per 7.2k-token step with checkpointing (25-30%).
TRAIN_MFU = {True: 0.36, False: 0.28}
# Wider layers use the GPU better: per doubling of the LLM's width over 2B's (2,048), 40% more, fitted to one LoRA step
# of 8B, 26B, 40B and 76B (eager, FSDP2, checkpointing; benchmarks/sizes.py, H200, 2026-12-02): all four within 4%.
# Applied to the compiled efficiency as well, where it is not measured above 2B; narrower models (1B) keep 2B's.
WIDTH_GAIN, BASE_WIDTH = 0.40, 2048
# By images per micro-batch: 4 (8,192-token rows) 7-9% slower than 8 (16,384) for 2B; fewer: extrapolated.
IMAGES_EFFICIENCY = {8: 1.0, 4: 0.92, 2: 0.85, 1: 0.75}
PARALLEL_EFFICIENCY = {"one GPU": 1.0, "DDP": 0.95, "FSDP2": 0.90}  # not measured at scale
RELEASES = {"1b": 0.938e9, "2b": 2.206e9, "4b": 4.147e9, "8b": 8.075e9, "26b": 25.51e9, "40b": 40.07e9,
            "76b": 76.26e9}
LLM_NAMES = {"internlm2": "InternLM2", "qwen2": "Qwen2", "phi3": "Phi-3", "llama": "Llama"}


def release_name(size: str) -> str:
    return "InternVL2-Llama3-76B" if size == "76b" else f"InternVL2-{size.upper()}"


# The sizes that count: InternViT's (v_*; patches per tile, channels x patch^2, the pixel shuffle's width into the
# projector) and the LLM's.
Shape = namedtuple("Shape", "family v_hidden v_inter v_layers v_qkv_bias v_qk_norm v_rms patches patch_dim shuffled "
                            "hidden inter layers heads kv_heads head_dim vocab qkv_bias o_bias")


def model_shape(config: dict) -> Shape:
    """The `Shape` of an original-layout config.json (`InternVLChatConfig`)."""
    cfg.check_supported(config)
    v, llm, family = config["vision_config"], config["llm_config"], cfg.llm_family(config)
    size, patch = config.get("force_image_size") or v.get("image_size", 448), v.get("patch_size", 14)
    heads = llm["num_attention_heads"]
    bias = bool(llm.get("bias" if family == "internlm2" else "attention_bias", False))
    return Shape(family, v["hidden_size"], v["intermediate_size"], v["num_hidden_layers"],
                 bool(v.get("qkv_bias", False)), bool(v.get("qk_normalization", False)),
                 v.get("norm_type", "rms_norm") == "rms_norm", (size // patch) ** 2, v.get("num_channels", 3) * patch**2,
                 int(v["hidden_size"] / config.get("downsample_ratio", 0.5) ** 2), llm["hidden_size"],
                 llm["intermediate_size"], llm["num_hidden_layers"], heads, llm.get("num_key_value_heads") or heads,
                 llm.get("head_dim") or llm["hidden_size"] // heads, llm["vocab_size"], family == "qwen2" or bias, bias)


def read_config(model: str | Path) -> dict:
    """The original config of a folder (or a config.json) that may hold nothing else: original or native layout."""
    path = Path(model)
    config_path = path / "config.json" if path.is_dir() else path
    if not config_path.is_file():
        raise CaptuneError("no config.json: not a checkpoint folder", path)
    config = read_json(config_path)
    if not isinstance(config, dict):
        raise CaptuneError("config.json is not a JSON object", config_path)
    if detect_layout(config, config_path) == "internvl":
        return config
    kept = config_path.parent / INTERNVL_CONFIG_NAME
    return read_json(kept) if kept.is_file() else cfg.internvl_config_from_native(config)


def llm_layer_parameters(s: Shape) -> int:
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    biases = (q + 2 * kv if s.qkv_bias else 0) + (s.hidden if s.o_bias else 0)
    return s.hidden * (q + 2 * kv) + q * s.hidden + biases + 3 * s.hidden * s.inter + 2 * s.hidden


def vision_layer_parameters(s: Shape) -> int:
    h, i = s.v_hidden, s.v_inter
    attention = 4 * h * h + (3 * h if s.v_qkv_bias else 0) + h + (2 * h if s.v_qk_norm else 0)
    return attention + (2 * h if s.v_rms else 4 * h) + 2 * h + 2 * h * i + i + h  # norms, layer scales, MLP


def parameter_counts(s: Shape) -> dict[str, int]:
    """Parameters per part, exactly as transformers' InternVLForConditionalGeneration holds them (never tied)."""
    h, w, d = s.v_hidden, s.shuffled, s.hidden
    counts = {"vision_tower": h + s.patch_dim * h + h + (s.patches + 1) * h + s.v_layers * vision_layer_parameters(s),
              "projector": 2 * w + w * d + d + d * d + d, "llm_embeddings": s.vocab * d,
              "llm_layers": s.layers * llm_layer_parameters(s) + d, "lm_head": s.vocab * d}
    counts["total"] = sum(counts.values())
    return counts


def lora_modules(s: Shape) -> list[tuple[int, int]]:
    """(in, out) of every linear layer of one LLM layer: LoRA goes on each (Phi-3's q/k/v and gate/up are fused)."""
    q, kv, d, i = s.heads * s.head_dim, s.kv_heads * s.head_dim, s.hidden, s.inter
    if s.family == "phi3":
        return [(d, q + 2 * kv), (q, d), (d, 2 * i), (i, d)]
    return [(d, q), (d, kv), (d, kv), (q, d), (d, i), (d, i), (i, d)]


def lora_parameters(s: Shape, rank: int) -> int:
    return s.layers * rank * sum(i + o for i, o in lora_modules(s))


def kv_bytes_per_token(s: Shape) -> int:
    return s.layers * 2 * s.kv_heads * s.head_dim * 2


def vision_flops_per_image(s: Shape, tiles: int) -> float:
    tokens = s.patches + 1
    return 2 * parameter_counts(s)["vision_tower"] * tiles * tokens + 4 * s.v_layers * tiles * tokens**2 * s.v_hidden


# ------------------------------------------------------------------------------------------------- evaluation


def eval_activations(s: Shape, batch: int) -> tuple[float, float]:
    """Bytes of activations: the LLM's prefill (on each GPU of a model) and the vision tower's (on the first GPU)."""
    return (batch * EVAL_PROMPT * EVAL_ACT_PER_MLP * s.inter * 2,
            batch * EVAL_TILES * (s.patches + 1) * (EVAL_VISION_ACT_PER_MLP * s.v_inter + 3 * s.v_hidden) * 2)


def eval_memory(s: Shape, batch: int, gpus_per_model: int = 1) -> dict[str, float]:
    """GB per GPU to caption `batch` images (7 tiles, 1,851-token prompt + 30 tokens), one model over K GPUs."""
    k = gpus_per_model
    kv = batch * EVAL_KV_TOKENS * kv_bytes_per_token(s) / k
    llm, vision = eval_activations(s, batch)
    out = {"weights": parameter_counts(s)["total"] * 2 / k / GB, "kv_cache": kv / GB,
           "activations": max(llm, vision) / GB}
    out["total"] = sum(out.values())
    return out


def eval_seconds_per_image(s: Shape, batch: int, gpus_per_model: int = 1, compiled: bool = False) -> float:
    counts = parameter_counts(s)
    flops = 2 * counts["llm_layers"] * EVAL_PROMPT + 2 * s.layers * EVAL_PROMPT**2 * s.heads * s.head_dim \
        + vision_flops_per_image(s, EVAL_TILES)
    step = max(counts["total"] * 2 / BANDWIDTH, s.layers * DECODE_LAYER_S)
    prefill = flops / (EVAL_MFU * PEAK_FLOPS) * (EVAL_COMPILED_PREFILL if compiled else 1.0)
    seconds = prefill + EVAL_NEW_TOKENS * step / batch + EVAL_HOST_S
    return seconds / (SPLIT_EFFICIENCY if gpus_per_model > 1 else 1.0)


def choose_eval(s: Shape, gpus: int, usable: float) -> dict:
    """GPUs per model (dividing `gpus`) and batch: the fastest that fits; else how many GPUs per model would."""
    best = None
    for k in (k for k in range(1, gpus + 1) if gpus % k == 0):
        batch = next((b for b in EVAL_BATCHES if eval_memory(s, b, k)["total"] <= usable), None)
        if batch is None:
            continue
        compiled = k == 1 and EVAL_IMAGES / (gpus // k) >= COMPILE_FROM_IMAGES  # as --compile auto decides
        rate = gpus // k / eval_seconds_per_image(s, batch, k, compiled)
        if best is None or rate > best["images_per_s"] * 1.001:
            best = {"fits": True, "gpus_per_model": k, "replicas": gpus // k, "batch": batch, "compiled": compiled,
                    "memory_gb": eval_memory(s, batch, k), "images_per_s": rate, "minutes": EVAL_IMAGES / rate / 60}
    if best:
        return best
    need = next(k for k in range(1, 1025) if eval_memory(s, 8, k)["total"] <= usable)
    return {"fits": False, "gpus_per_model": need, "batch": 8, "memory_gb": eval_memory(s, 8, need),
            "message": f"needs {need} GPUs of this size per model (at batch 8), {gpus} given"}


# ------------------------------------------------------------------------------------------------- training


@dataclass(frozen=True)
class RecipeSettings:
    """What the plan reads of a training recipe; defaults as `captune.train.config.TrainConfig` (a test checks)."""

    name: str = "internvl2_2b_coco_lora"
    lora_rank: int = 128
    global_batch_size: int = 512
    token_budget: int = 8192
    gradient_checkpointing: bool = True
    max_tiles: int = 6
    fsdp: bool = False
    compile: str = "auto"
    share_prefix: str = "auto"
    lora_vision: bool = False


def recipe_settings(recipe: str) -> RecipeSettings:
    """A shipped recipe by name (captune/train/recipes/NAME.yaml, read as data) or a YAML file."""
    import yaml

    path, shipped = Path(recipe), Path(__file__).resolve().parents[1] / "train" / "recipes"
    path = path if path.suffix in (".yaml", ".yml") else shipped / f"{recipe}.yaml"
    if not path.is_file():
        names = ", ".join(sorted(p.stem for p in shipped.glob("*.yaml")))
        raise CaptuneError(f"unknown recipe {recipe!r}; shipped recipes: {names}")
    values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    known = {f.name for f in fields(RecipeSettings)} - {"name"}
    return replace(RecipeSettings(name=recipe), **{k: v for k, v in values.items() if k in known})


def coco_tiles(max_tiles: int) -> int:
    """Tiles of a COCO image (640x480: 6 + thumbnail when up to 6 are allowed)."""
    return min(max_tiles, 6) + (1 if max_tiles > 1 else 0)


def group_tokens(max_tiles: int) -> int:
    """Tokens of one COCO image and its five captions in a shared-prefix row."""
    return GROUP_TOKENS + (coco_tiles(max_tiles) - EVAL_TILES) * 256


def train_memory(s: Shape, rank: int, tokens: int, checkpointing: bool, strategy: str = "one GPU", gpus: int = 1,
                 compiled: bool = False, full_logits: bool = False, tiles: int = 7) -> dict[str, float]:
    """GB per GPU of one LoRA step on a `tokens`-token micro-batch (strategy: one GPU, DDP or FSDP2 over `gpus`)."""
    total = parameter_counts(s)["total"]
    weights = total * 2
    if strategy == "FSDP2":  # each layer sharded; the root (embeddings, head, projector, ...) gathered for the step
        root = total - s.layers * llm_layer_parameters(s) - s.v_layers * vision_layer_parameters(s)
        gathered = 2 * max(llm_layer_parameters(s), vision_layer_parameters(s))  # the running layer and the next
        weights = ((total - root) / gpus + root + gathered) * 2
    lora = lora_parameters(s, rank) * (LORA_STATE_BYTES + (4 if strategy == "DDP" else 0))
    lora /= gpus if strategy == "FSDP2" else 1
    layer = 2 * (ACT_H * s.hidden + ACT_I * s.inter + len(lora_modules(s)) * rank) * (COMPILE_FACTOR if compiled else 1)
    logits, misc = (LOGIT_BYTES * s.vocab if full_logits else 0), MISC_PER_H * s.hidden
    if checkpointing:  # each layer keeps its input; one layer (or the logits) live at a time
        per_token = s.layers * 2 * s.hidden + misc + max(layer, logits)
    else:
        per_token = s.layers * layer + misc + logits
    images = max(1, tokens // GROUP_TOKENS)
    vision = images * tiles * (s.patches + 1) * (2 * s.v_inter + 3 * s.v_hidden) * 2  # frozen tower, one layer live
    out = {"weights": weights / GB, "lora_states": lora / GB, "activations": max(tokens * per_token, vision) / GB}
    out["total"] = sum(out.values())
    return out


def train_tokens_per_s(s: Shape, checkpointing: bool, compiled: bool, images: int, group: int, tiles: int = 7) -> float:
    """Tokens per second of one GPU: FLOPs per token (frozen weights: forward and backward through the activations,
    plus the recompute with checkpointing; attention within each image group; the vision tower's forward)."""
    passes = 3 if checkpointing else 2
    flops = 2 * passes * parameter_counts(s)["llm_layers"] + 2 * (passes + 1) * s.layers * s.hidden * group \
        + vision_flops_per_image(s, tiles) / group
    efficiency = max(e for n, e in IMAGES_EFFICIENCY.items() if n <= max(images, 1))
    width = 1 + WIDTH_GAIN * max(0.0, math.log2(s.hidden / BASE_WIDTH))
    return TRAIN_MFU[compiled] * width * efficiency * PEAK_FLOPS / flops


def choose_train(s: Shape, settings: RecipeSettings, gpus: int, usable: float) -> dict:
    """One GPU, DDP or FSDP2; checkpointing; token budget (at most the recipe's): the recipe's strategy and
    checkpointing, as `captune train` runs them, at the largest budget that fits; else the fastest setting that fits.

    With shared prefixes a step is whole images until `global_batch_size` captions (COCO: five per image), spread
    over the processes, so a small global batch also caps the micro-batch."""
    group, tiles = group_tokens(settings.max_tiles), coco_tiles(settings.max_tiles)
    step_images = -(-settings.global_batch_size // 5)
    per_process = max(1, -(-step_images // gpus))
    budgets = [b for b in TRAIN_BUDGETS if group <= b <= settings.token_budget] or [settings.token_budget]
    best, smallest, as_recipe = None, None, None
    recipe = ("one GPU" if gpus == 1 else "FSDP2" if settings.fsdp else "DDP", settings.gradient_checkpointing)
    for strategy in ["one GPU"] if gpus == 1 else ["DDP", "FSDP2"]:
        compiled = settings.compile == "on" or (settings.compile == "auto" and strategy != "FSDP2"
                                                and settings.share_prefix != "off" and not settings.lora_vision)
        for checkpointing in (False, True):
            for budget in budgets:
                images = max(1, min(budget // group, per_process))
                tokens = budget if compiled else images * group  # compiled rows are padded to the budget
                both = {c: train_memory(s, settings.lora_rank, tokens, c, strategy, gpus, compiled, tiles=tiles)
                        for c in (False, True)}
                rate = train_tokens_per_s(s, checkpointing, compiled, images, group, tiles) * gpus \
                    * PARALLEL_EFFICIENCY[strategy]
                option = {"strategy": strategy, "gpus": gpus, "gradient_checkpointing": checkpointing,
                          "token_budget": budget, "images_per_micro_batch": images, "compile": compiled,
                          "memory_gb": both[checkpointing], "tokens_per_s": rate,
                          "total_gb": {"checkpointing_off": both[False]["total"], "checkpointing_on": both[True]["total"]}}
                if smallest is None or option["memory_gb"]["total"] < smallest["memory_gb"]["total"]:
                    smallest = option
                fits = option["memory_gb"]["total"] <= usable
                if fits and (best is None or rate > best["tokens_per_s"] * 1.001):
                    best = option
                if fits and (strategy, checkpointing) == recipe and (
                        as_recipe is None or rate > as_recipe["tokens_per_s"]):
                    as_recipe = option
    notes = [] if step_images >= gpus else [
        f"the recipe's global batch {settings.global_batch_size} captions is ~{step_images} images per step, fewer "
        f"than {gpus} processes: raise --global-batch-size to {5 * gpus} or more"]
    if as_recipe and as_recipe["token_budget"] != settings.token_budget:
        notes.append(f"the recipe's token budget {settings.token_budget:,} does not fit: {_setting(as_recipe, settings)}")
    if as_recipe and best["tokens_per_s"] > 1.05 * as_recipe["tokens_per_s"]:
        notes.append(f"faster, and it fits: {_setting(best, settings)} ({best['memory_gb']['total']:.0f} GB, "
                     f"{best['tokens_per_s'] / as_recipe['tokens_per_s'] - 1:.0%} faster)")
    elif best and not as_recipe:
        notes.append(f"the recipe's {recipe[0]}, checkpointing {'on' if recipe[1] else 'off'} does not fit: "
                     f"{_setting(best, settings)}")
    note, best = "; ".join(notes) or None, as_recipe or best
    if best:
        return {"fits": True, **best, "hours_per_epoch": COCO_IMAGES * group / best["tokens_per_s"] / 3600, "note": note}
    need = next((n for n in range(max(2, gpus + 1), 1025)
                 if train_memory(s, settings.lora_rank, group, True, "FSDP2", n, tiles=tiles)["total"] <= usable), None)
    message = f"does not fit {gpus} GPU{'s' if gpus > 1 else ''} of this size" + \
        (f"; FSDP2 over {need} would (checkpointing, one image per micro-batch)" if need else "")
    return {"fits": False, **smallest, "gpus_needed": need, "message": message, "note": note}


def _setting(option: dict, settings: RecipeSettings) -> str:
    """The options of `captune train` that give `option` over the recipe's."""
    flags = [] if (option["strategy"] == "FSDP2") == settings.fsdp else [
        "--fsdp" if option["strategy"] == "FSDP2" else "--no-fsdp"]
    if option["gradient_checkpointing"] != settings.gradient_checkpointing:
        flags.append("--gradient-checkpointing" if option["gradient_checkpointing"] else "--no-gradient-checkpointing")
    if option["token_budget"] != settings.token_budget:
        flags.append(f"--token-budget {option['token_budget']}")
    return " ".join(flags)


# ------------------------------------------------------------------------------------------------- the command


def release_size(total: int) -> str | None:
    """The InternVL2 release of this size ("1b" ... "76b"), within 5%, or None."""
    size, ref = min(RELEASES.items(), key=lambda kv: abs(kv[1] - total))
    return size if abs(ref - total) <= 0.05 * ref else None


def check_recipe_size(recipe: str, size: str | None) -> None:
    """Refuse a shipped per-size recipe (internvl2_<size>_...) on a model of another size."""
    parts = Path(recipe).name.split("_")
    if size and len(parts) > 1 and parts[0] == "internvl2" and parts[1] in RELEASES and parts[1] != size:
        raise CaptuneError(f"recipe {recipe} is for {release_name(parts[1])}, the model is {release_name(size)}: "
                           f"use --recipe internvl2_{size}_coco_lora")


def plan(model: Path, gpus: int = 1, gpu_memory: float = 80.0, recipe: str | None = None, json: bool = False) -> dict:
    """`captune plan` (its arguments are documented with the command, `cli_sizing.plan`): evaluation and LoRA
    training of a model from its config.json, printed, and returned as a dict: memory per GPU, strategy, time."""
    if gpus < 1 or gpu_memory <= 0:
        raise CaptuneError("--gpus must be at least 1 and --gpu-memory positive")
    config = read_config(model)
    s = model_shape(config)
    counts = parameter_counts(s)
    size = release_size(counts["total"])
    name = recipe or (f"internvl2_{size}_coco_lora" if size else RecipeSettings.name)
    check_recipe_size(name, size)
    settings = recipe_settings(name)
    usable = gpu_memory * USABLE_FRACTION
    result = {
        "model": {"path": str(model), "release": release_name(size) if size else None, "family": s.family,
                  "llm": f"{LLM_NAMES[s.family]} {s.layers} x {s.hidden}", "vocab": s.vocab,
                  "vision": f"InternViT {s.v_layers} x {s.v_hidden}", "template": config.get("template")},
        "parameters": counts, "weights_gb": counts["total"] * 2 / GB,
        "gpus": gpus, "gpu_memory_gb": gpu_memory, "usable_gb": usable,
        "eval": choose_eval(s, gpus, usable),
        "train": {"recipe": name, "lora_rank": settings.lora_rank, "trainable": lora_parameters(s, settings.lora_rank),
                  **choose_train(s, settings, gpus, usable)},
    }
    from captune.internvl.plan_format import format_plan

    print(jsonlib.dumps(result, indent=2) if json else format_plan(result), flush=True)
    return result
