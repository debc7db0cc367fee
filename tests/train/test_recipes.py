"""Every shipped recipe resolves, and each per-size COCO recipe's assumptions about its model's size hold: `captune
plan` on that release's config (tests/internvl/releases) says its settings fit the GPUs of InternVL's own script."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from captune.errors import CaptuneError
from captune.internvl import plan as P
from captune.train.config import TrainConfig, recipe_names, recipe_values, resolve

RELEASES = Path(__file__).resolve().parents[1] / "internvl" / "releases"
SIZES = {"1b": "InternVL2-1B", "2b": "InternVL2-2B", "4b": "InternVL2-4B", "8b": "InternVL2-8B",
         "26b": "InternVL2-26B", "40b": "InternVL2-40B", "76b": "InternVL2-Llama3-76B"}
# GPUs of InternVL's script for each size (80 GB A100s): the LoRA scripts' 2, the 76B's 8, the 2B COCO tutorial's 8.
SCRIPT_GPUS = {"1b": 2, "2b": 8, "4b": 2, "8b": 2, "26b": 2, "40b": 2, "76b": 8}
GPU_GB = 80.0


@pytest.mark.parametrize("name", recipe_names())
def test_every_recipe_resolves(name):
    config = resolve(name, {"model": "m", "data": "d", "out": "o"})
    assert config.recipe == name and config.lora_rank > 0 and config.token_budget > 0


def test_the_plan_reads_recipes_as_train_does():
    """The plan reads recipes as data (it sits below train/); its defaults and values are TrainConfig's."""
    defaults = TrainConfig()
    for field in dataclasses.fields(P.RecipeSettings):
        if field.name != "name":
            assert getattr(P.RecipeSettings(), field.name) == getattr(defaults, field.name), field.name
    for name in recipe_names():
        settings, config = P.recipe_settings(name), recipe_values(name)
        for field in dataclasses.fields(P.RecipeSettings):
            if field.name != "name":
                assert getattr(settings, field.name) == getattr(config, field.name), (name, field.name)


def test_every_size_has_its_recipe():
    assert {f"internvl2_{size}_coco_lora" for size in SIZES} <= set(recipe_names())


@pytest.mark.parametrize("size", [s for s in SIZES if s != "2b"])
def test_values_from_internvls_lora_scripts(size):
    config = recipe_values(f"internvl2_{size}_coco_lora")
    assert (config.lora_rank, config.lora_alpha, config.max_tiles) == (16, 32, 6)
    # the scripts' 16 captions a step; 76B's 8 GPUs need an image per process: 40 captions (8 images of 5)
    assert config.global_batch_size == (40 if size == "76b" else 16)
    assert config.learning_rate == (2e-5 if size in ("26b", "40b", "76b") else 4e-5)
    assert not config.lora_vision and not config.train_projector and config.dtype == "bf16"
    assert config.gradient_checkpointing == (size in ("26b", "40b", "76b"))


@pytest.mark.parametrize("size", SIZES)
def test_recipe_fits_its_release_as_the_plan_says(size):
    name, release = f"internvl2_{size}_coco_lora", SIZES[size]
    s = P.model_shape(json.loads((RELEASES / release / "config.json").read_text()))
    settings, gpus, usable = P.recipe_settings(name), SCRIPT_GPUS[size], GPU_GB * P.USABLE_FRACTION
    group, tiles = P.group_tokens(settings.max_tiles), P.coco_tiles(settings.max_tiles)
    assert P.release_size(P.parameter_counts(s)["total"]) == size
    # FSDP2 exactly when the model cannot be replicated: one checkpointed image does not fit one GPU
    replicated = P.train_memory(s, settings.lora_rank, group, True, "one GPU", 1, tiles=tiles)["total"]
    assert settings.fsdp == (replicated > usable)
    # the recipe's own settings fit the script's GPUs; checkpointing only where its absence would not
    strategy = "FSDP2" if settings.fsdp else "DDP"
    compiled = not settings.fsdp  # compile auto: on without FSDP (shared prefixes, no vision LoRA)
    step_images = -(-settings.global_batch_size // 5)  # a step: whole images until the global batch of captions
    images = max(1, min(settings.token_budget // group, -(-step_images // gpus)))
    tokens = settings.token_budget if compiled else images * group
    memory = {c: P.train_memory(s, settings.lora_rank, tokens, c, strategy, gpus, compiled, tiles=tiles)["total"]
              for c in (False, True)}
    assert memory[settings.gradient_checkpointing] <= usable, memory
    assert settings.gradient_checkpointing == (memory[False] > usable), memory
    assert settings.token_budget >= group  # at least one image and its captions per micro-batch


@pytest.mark.parametrize("size", SIZES)
def test_a_recipe_for_another_size_is_refused(size):
    for other in SIZES:
        if other != size:
            with pytest.raises(CaptuneError, match=f"use --recipe internvl2_{size}_coco_lora"):
                P.check_recipe_size(f"internvl2_{other}_coco_lora", size)
    P.check_recipe_size(f"internvl2_{size}_coco_lora", size)
    P.check_recipe_size("tiny_cpu_lora", size)


def test_default_recipe_is_the_model_sizes(tmp_path):
    """Without --recipe, a release gets its size's recipe (from config.json alone); any other model, or a folder
    that cannot be read, the tutorial's 2B recipe."""
    from captune.train import config as cfg

    releases = Path(__file__).parents[1] / "internvl" / "releases"
    sizes = {"InternVL2-1B": "1b", "InternVL2-2B": "2b", "InternVL2-4B": "4b", "InternVL2-8B": "8b",
             "InternVL2-26B": "26b", "InternVL2-40B": "40b", "InternVL2-Llama3-76B": "76b"}
    for name, size in sizes.items():
        assert cfg.default_recipe(str(releases / name)) == f"internvl2_{size}_coco_lora"
    assert cfg.default_recipe(str(tmp_path)) == cfg.default_recipe(None) == "internvl2_2b_coco_lora"
    resolved = cfg.resolve(None, {"model": str(releases / "InternVL2-8B"), "data": "d", "out": "o"})
    assert (resolved.recipe, resolved.lora_rank) == ("internvl2_8b_coco_lora", 16)
    assert cfg.resolve("internvl2_2b_coco_lora", {"model": str(releases / "InternVL2-8B"), "data": "d",
                                                  "out": "o"}).lora_rank == 128  # --recipe still decides
