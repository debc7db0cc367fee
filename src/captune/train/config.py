"""Training configuration: a typed dataclass, recipes as small YAML files, `--key value` overrides.

A run folder records the resolved configuration in `captune.yaml` before training starts, so that later
commands (resume, merge, eval of the adapter) need not be told again.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, fields
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from captune.errors import CaptuneError

RUN_CONFIG = "captune.yaml"


@dataclass
class TrainConfig:
    # what to train on
    model: str = ""
    data: str = ""
    out: str = ""
    recipe: str = "internvl2_2b_coco_lora"

    # LoRA, on every linear layer of the LLM (PEFT)
    lora_rank: int = 128
    lora_alpha: int = 256
    lora_dropout: float = 0.05
    lora_vision: bool = False  # also LoRA on the vision tower (the original's use_backbone_lora)
    train_projector: bool = False  # unfreeze the MLP projector (the original's freeze_mlp False)

    # optimisation (AdamW, as the tutorial's DeepSpeed config)
    learning_rate: float = 4e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.03
    lr_scheduler: str = "cosine"
    epochs: float = 1.0
    max_steps: int = -1  # > 0 overrides epochs
    global_batch_size: int = 512  # captions per optimizer step, over all processes
    per_device_batch_size: int = 4  # captions per micro-batch and process
    max_grad_norm: float = 1.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    seed: int = 42

    # data
    image_root: str = ""  # the folder the data's image paths are relative to; default: found from --data
    max_tiles: int = 6
    max_seq_length: int = 4096
    group_by_length: bool = True
    share_prefix: str = "auto"  # auto | on | off: one sequence per image for all of its captions
    token_budget: int = 8192  # shared-prefix packing: tokens per micro-batch (2B: 29 GB; the COCO recipe: 16,384, 52 GB)
    num_workers: int = 4

    # precision and memory
    dtype: str = "auto"  # bf16 on GPU, fp32 on CPU
    gradient_checkpointing: bool = True
    fsdp: bool = False  # shard parameters with FSDP2 (models too large to replicate: 26B and up)
    compile: str = "auto"  # auto | on | off: torch.compile the LLM (rows padded to token_budget) and vision tower;
    #                        auto = on a GPU with shared prefixes, without FSDP or vision LoRA (~3 min to compile)
    device: str = "auto"

    # checkpoints, logs, in-training evaluation
    save_every: int = 200
    keep_checkpoints: int = 2
    log_every: int = 1
    eval_every: int = 0
    eval_limit: int = 500
    eval_data: str = ""  # a folder with the tutorial's test layout; default: the training data folder
    resume: str = "auto"  # auto: continue when OUT has a checkpoint | true | false
    force: bool = False  # train into a non-empty folder that is not a run; --resume false: delete the old checkpoints
    allow_changes: bool = False  # resume although settings that define the run (learning rate, data...) changed

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["adam_betas"] = list(self.adam_betas)
        return d



# One line of help per option of `captune train`; --help shows it beside the value the recipe gives the option.
HELP = {
    "model": "the base model: an InternVL2 release folder (original or native layout)",
    "data": "training data: the tutorial's data/coco folder, an InternVL meta json or jsonl, a COCO captions json, "
            "Karpathy's dataset_coco.json or an {image, caption} jsonl",
    "out": "the run folder (checkpoints, logs, captune.yaml); running the command again resumes",
    "recipe": "a shipped recipe name or a YAML file",
    "lora_rank": "LoRA rank r of every adapted linear layer",
    "lora_alpha": "LoRA alpha: updates are scaled by alpha / r",
    "lora_dropout": "dropout on the input of every LoRA layer",
    "lora_vision": "also LoRA on the vision tower (the original's use_backbone_lora)",
    "train_projector": "also train the MLP projector (the original's freeze_mlp false)",
    "learning_rate": "peak AdamW learning rate",
    "weight_decay": "AdamW weight decay (on matrices)",
    "warmup_ratio": "share of the steps spent warming the learning rate up",
    "lr_scheduler": "cosine, linear or constant after the warm-up",
    "epochs": "passes over the data (fractions allowed)",
    "max_steps": "stop after this many optimizer steps (> 0 overrides --epochs)",
    "global_batch_size": "captions per optimizer step, over all processes",
    "per_device_batch_size": "captions per micro-batch and process (without shared prefixes)",
    "max_grad_norm": "gradient clipping norm",
    "adam_betas": "AdamW betas, as B1,B2",
    "adam_eps": "AdamW epsilon",
    "seed": "seed of the data order, the LoRA initialisation and dropout",
    "image_root": "the folder the data's image paths are relative to (default: found from --data, as `captune data "
                  "check`)",
    "max_tiles": "dynamic tiling: at most this many tiles per image (+ a thumbnail)",
    "max_seq_length": "samples longer than this are left out (and counted in the log)",
    "group_by_length": "micro-batches of similar lengths, as HF Trainer (without shared prefixes)",
    "share_prefix": "auto, on or off: each image and prompt computed once for all of its captions",
    "token_budget": "tokens per packed micro-batch with shared prefixes",
    "num_workers": "data-loader workers per process (image decoding and tiling)",
    "dtype": "auto, bf16, fp16 or fp32 (auto: bf16 on a GPU, fp32 on the CPU)",
    "gradient_checkpointing": "recompute activations in the backward pass: less memory, slower steps",
    "fsdp": "shard the model with FSDP2 under torchrun (for models too large to replicate: 26B and up)",
    "compile": "auto, on or off: torch.compile the LLM and vision tower (auto: on a GPU with shared prefixes)",
    "device": "auto, cpu or cuda",
    "save_every": "write a checkpoint every N steps (and at the end)",
    "keep_checkpoints": "keep the newest N step checkpoints, 0: all (best/ is kept apart)",
    "log_every": "log loss, learning rate and speed every N steps",
    "eval_every": "caption --eval-limit test images every N steps, keep best/ by CIDEr (0: never)",
    "eval_limit": "test images captioned by the in-training evaluation",
    "eval_data": "test data for --eval-every (default: the training data folder)",
    "resume": "auto, true or false: continue from the newest checkpoint in --out",
    "force": "train into a non-empty --out that holds no run; with --resume false, delete its earlier checkpoints",
    "allow_changes": "resume even though options that define the run changed (learning rate, data, seed...)",
}
REQUIRED = ("model", "data", "out")

# The values every numeric option may take, checked by `validate` before any work: field -> (minimum, maximum,
# minimum excluded, maximum excluded); None: no bound. max_steps and adam_betas have rules of their own.
RANGES: dict[str, tuple[float | None, float | None, bool, bool]] = {
    "lora_rank": (1, None, False, False),
    "lora_alpha": (1, None, False, False),
    "lora_dropout": (0, 1, False, True),
    "learning_rate": (0, None, True, False),
    "weight_decay": (0, None, False, False),
    "warmup_ratio": (0, 1, False, False),
    "epochs": (0, None, True, False),
    "global_batch_size": (1, None, False, False),
    "per_device_batch_size": (1, None, False, False),
    "max_grad_norm": (0, None, True, False),
    "adam_eps": (0, None, True, False),
    "seed": (0, None, False, False),
    "max_tiles": (1, None, False, False),
    "max_seq_length": (1, None, False, False),
    "token_budget": (1, None, False, False),
    "num_workers": (0, None, False, False),
    "save_every": (1, None, False, False),
    "keep_checkpoints": (0, None, False, False),
    "log_every": (1, None, False, False),
    "eval_every": (0, None, False, False),
    "eval_limit": (1, None, False, False),
}

_FIELDS = {f.name: f for f in fields(TrainConfig)}


def recipe_names() -> list[str]:
    return sorted(p.name.removesuffix(".yaml") for p in resources.files("captune.train.recipes").iterdir()
                  if p.name.endswith(".yaml"))


def read_recipe(name_or_path: str) -> dict[str, Any]:
    """A shipped recipe by name, or a YAML file."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise CaptuneError("recipe file not found", path)
        text = path.read_text(encoding="utf-8")
        where: str | Path = path
    else:
        candidate = resources.files("captune.train.recipes") / f"{name_or_path}.yaml"
        if not candidate.is_file():
            raise CaptuneError(f"unknown recipe {name_or_path!r}; shipped recipes: {', '.join(recipe_names())}")
        text = candidate.read_text(encoding="utf-8")
        where = f"recipe {name_or_path}"
    try:
        values = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise CaptuneError(f"not valid YAML: {e}", where) from None
    if not isinstance(values, dict):
        raise CaptuneError("a recipe is a mapping of option: value", where)
    return values


def option(name: str) -> str:
    """A field as the user types it: lora_rank -> --lora-rank."""
    return "--" + name.replace("_", "-")


def _coerce(name: str, value: Any, where: str = "") -> Any:
    kind = typing.get_type_hints(TrainConfig)[name]
    try:
        if kind is bool:
            if isinstance(value, str):
                lowered = value.lower()
                if lowered not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                    raise ValueError(value)
                return lowered in ("true", "1", "yes", "on")
            return bool(value)
        if kind is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if kind is float:
            return float(value)
        if typing.get_origin(kind) is tuple:
            items = value.split(",") if isinstance(value, str) else list(value)
            return tuple(float(x) for x in items)
        if kind is str or isinstance(kind, types.UnionType):
            return "" if value is None else str(value)
    except (TypeError, ValueError):
        named = f"{name} in {where}" if where else option(name)  # a recipe's key as written, else the option
        raise CaptuneError(f"{named}: {value!r} is not a valid {getattr(kind, '__name__', kind)}") from None
    return value


def apply(config: TrainConfig, values: dict[str, Any], where: str = "") -> TrainConfig:
    for key, value in values.items():
        name = key.replace("-", "_")
        if name not in _FIELDS:
            close = difflib.get_close_matches(name, _FIELDS, n=3)
            spell = (lambda f: f) if where else option  # a recipe's key as written, else the option as typed
            hint = f"; did you mean {', '.join(map(spell, close))}?" if close else ""
            typed = f"{key!r} in {where}" if where else repr(option(name))
            raise CaptuneError(f"unknown option {typed}{hint}")
        setattr(config, name, _coerce(name, value, where))
    return config


def recipe_values(recipe: str | None) -> TrainConfig:
    """The defaults with a recipe applied, not yet validated: what `captune train --recipe R` starts from."""
    recipe = recipe or TrainConfig.recipe
    config = apply(TrainConfig(), read_recipe(recipe), where=f"recipe {recipe}")
    config.recipe = recipe
    return config


def model_release(model: str):
    """(shape, release size or None) of a model, from its config.json alone (an adapter folder's: its base model's),
    by `captune plan`'s parameter count; None when that cannot be read (the model check that follows says why)."""
    from captune.internvl import plan
    from captune.internvl.lora import model_folder

    try:
        shape = plan.model_shape(plan.read_config(model_folder(model)))
    except (CaptuneError, OSError, KeyError, TypeError, ValueError):
        return None
    return shape, plan.release_size(plan.parameter_counts(shape)["total"])


def default_recipe(model: str | None) -> str:
    """The shipped recipe of the model's InternVL2 release size (InternVL2-8B: internvl2_8b_coco_lora), read from its
    config.json alone (`captune plan`'s parameter count); the tutorial's 2B recipe for any other model, or for a
    folder that cannot be read (the model check then says why)."""
    found = model_release(model) if model else None
    if found and found[1] and f"internvl2_{found[1]}_coco_lora" in recipe_names():
        return f"internvl2_{found[1]}_coco_lora"
    return TrainConfig.recipe


def resolve(recipe: str | None, overrides: dict[str, Any]) -> TrainConfig:
    """Defaults, then the recipe (by default the one for the model's size), then the command line."""
    return validate(apply(recipe_values(recipe or default_recipe(overrides.get("model"))), overrides))


def validate(config: TrainConfig) -> TrainConfig:
    for name in ("model", "data", "out"):
        if not getattr(config, name):
            raise CaptuneError(f"--{name} is required")
    if config.share_prefix not in ("auto", "on", "off"):
        raise CaptuneError(f"--share-prefix must be auto, on or off, not {config.share_prefix!r}")
    if config.compile not in ("auto", "on", "off"):
        raise CaptuneError(f"--compile must be auto, on or off, not {config.compile!r}")
    if config.resume not in ("auto", "true", "false"):
        raise CaptuneError(f"--resume must be auto, true or false, not {config.resume!r}")
    if config.lr_scheduler not in ("cosine", "linear", "constant"):
        raise CaptuneError(f"--lr-scheduler must be cosine, linear or constant, not {config.lr_scheduler!r}")
    for name, bounds in RANGES.items():
        if problem := _out_of_range(getattr(config, name), *bounds):
            raise CaptuneError(f"{option(name)} {problem}, got {getattr(config, name)}")
    if config.max_steps != -1 and config.max_steps < 1:
        raise CaptuneError(f"--max-steps must be -1 (--epochs decides) or at least 1, got {config.max_steps}")
    betas = config.adam_betas
    if len(betas) != 2 or any(_out_of_range(b, 0, 1, False, True) for b in betas):
        raise CaptuneError(f"--adam-betas must be two numbers B1,B2, each at least 0 and less than 1, got "
                           f"{','.join(map(str, betas))}")
    from captune.devices import check_device

    check_device(config.device)
    return config


def _out_of_range(value: float, low: float | None, high: float | None, low_open: bool, high_open: bool) -> str | None:
    """"must be at least 1" (the phrasing of the other commands' options, `cli_args.Range`), or None if allowed."""
    if isinstance(value, float) and not math.isfinite(value):
        return "must be a finite number"
    if (low is None or (value > low if low_open else value >= low)) and \
            (high is None or (value < high if high_open else value <= high)):
        return None
    parts = ([f"{'greater than' if low_open else 'at least'} {low:g}"] if low is not None else []) + \
            ([f"{'less than' if high_open else 'at most'} {high:g}"] if high is not None else [])
    return "must be " + " and ".join(parts)


PATHS = ("model", "data", "eval_data", "image_root")  # folders and files, recorded absolute: a resume may start from another folder


def save(config: TrainConfig, out: Path) -> None:
    """OUT/captune.yaml: the resolved configuration, its paths absolute (a Slurm job resumes from wherever it starts)."""
    from captune.fileio import write_text_atomic

    values = config.to_dict()
    values.update({k: os.path.abspath(values[k]) for k in PATHS if values.get(k)})
    write_text_atomic(out / RUN_CONFIG, yaml.safe_dump(values, sort_keys=False))


def load_run_config(folder: str | Path) -> TrainConfig:
    path = Path(folder) / RUN_CONFIG
    if not path.is_file():
        raise CaptuneError(f"no {RUN_CONFIG}: not a captune run folder", folder)
    values = read_recipe(str(path))
    return apply(TrainConfig(), values, where=str(path))
