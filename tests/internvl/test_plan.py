"""`captune plan` on config-only folders of the seven InternVL2 releases (tests/internvl/releases/*/config.json, the
original release format): parameter counts, the strategy for 1 x 80 GB and 8 x 80 GB, memory predictions against the
measured peaks (docs/benchmarks.md, issue 14), the JSON output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from captune.errors import CaptuneError
from captune.internvl import plan as P
from captune.internvl.config import native_config

RELEASES = Path(__file__).resolve().parent / "releases"
# Published sizes: the model cards' table (InternVL2 README), 1B to the million (938.2M, counted from the release's
# tensors by a third party); the others to the figure the cards give.
PUBLISHED = {"InternVL2-1B": 0.9382e9, "InternVL2-2B": 2.21e9, "InternVL2-4B": 4.15e9, "InternVL2-8B": 8.08e9,
             "InternVL2-26B": 25.5e9, "InternVL2-40B": 40.1e9, "InternVL2-Llama3-76B": 76.3e9}
NAMES = list(PUBLISHED)


def shape(name: str) -> P.Shape:
    return P.model_shape(json.loads((RELEASES / name / "config.json").read_text()))


def run(name: str, capsys, **kwargs) -> dict:
    result = P.plan(RELEASES / name, **kwargs)
    capsys.readouterr()
    return result


def test_release_folders_hold_only_their_config():
    assert sorted(p.name for p in RELEASES.iterdir()) == sorted(NAMES)
    for name in NAMES:
        assert [p.name for p in (RELEASES / name).iterdir()] == ["config.json"]
        config = json.loads((RELEASES / name / "config.json").read_text())
        assert config["model_type"] == "internvl_chat" and config["architectures"] == ["InternVLChatModel"]
        assert config["downsample_ratio"] == 0.5 and config["force_image_size"] == 448 and config["ps_version"] == "v2"


@pytest.mark.parametrize("name", NAMES)
def test_parameter_counts_within_1_percent_of_the_published(name):
    total = P.parameter_counts(shape(name))["total"]
    assert abs(total / PUBLISHED[name] - 1) < 0.01, f"{name}: {total:,} vs {PUBLISHED[name]:,.0f}"


@pytest.mark.parametrize("name", NAMES)
def test_parameter_counts_equal_the_native_model_part_by_part(name):
    """Counted from the config alone, exactly what transformers' class holds (built on the meta device, no memory)."""
    config = json.loads((RELEASES / name / "config.json").read_text())
    from transformers import InternVLForConditionalGeneration

    with torch.device("meta"):
        model = InternVLForConditionalGeneration(native_config(config, 5))
    parts = dict.fromkeys(("vision_tower", "projector", "llm_embeddings", "llm_layers", "lm_head"), 0)
    for key, p in model.named_parameters():
        part = ("vision_tower" if "vision_tower" in key else "projector" if "multi_modal_projector" in key
                else "llm_embeddings" if "embed_tokens" in key else "lm_head" if "lm_head" in key else "llm_layers")
        parts[part] += p.numel()
    counts = P.parameter_counts(P.model_shape(config))
    assert {k: counts[k] for k in parts} == parts
    assert counts["total"] == sum(parts.values())


@pytest.mark.parametrize("name", ["InternVL2-2B", "InternVL2-4B"])
def test_lora_parameters_equal_peft(name):
    """Separate q/k/v (2B, as docs/benchmarks.md's 138,412,032 at rank 128) and Phi-3's fused qkv/gate_up (4B)."""
    from transformers import InternVLForConditionalGeneration

    from captune.internvl.lora import add_lora

    config = json.loads((RELEASES / name / "config.json").read_text())
    with torch.device("meta"):
        model = InternVLForConditionalGeneration(native_config(config, 5))
    peft = add_lora(model, rank=16, alpha=32, dropout=0.0)
    assert P.lora_parameters(P.model_shape(config), 16) == sum(p.numel() for p in peft.parameters() if p.requires_grad)
    if name == "InternVL2-2B":
        assert P.lora_parameters(P.model_shape(config), 128) == 138_412_032


# (eval: fits, GPUs per model, replicas; train: fits, strategy, checkpointing) for 1 x 80 GB and 8 x 80 GB.
STRATEGIES = {
    "InternVL2-1B": [((True, 1, 1), (True, "one GPU", False)), ((True, 1, 8), (True, "DDP", False))],
    "InternVL2-2B": [((True, 1, 1), (True, "one GPU", False)), ((True, 1, 8), (True, "DDP", False))],
    "InternVL2-4B": [((True, 1, 1), (True, "one GPU", False)), ((True, 1, 8), (True, "DDP", False))],
    "InternVL2-8B": [((True, 1, 1), (True, "one GPU", False)), ((True, 1, 8), (True, "DDP", False))],
    "InternVL2-26B": [((True, 1, 1), (True, "one GPU", True)), ((True, 1, 8), (True, "DDP", True))],
    "InternVL2-40B": [((False, 2, None), (False, None, None)), ((True, 2, 4), (True, "FSDP2", True))],
    "InternVL2-Llama3-76B": [((False, 3, None), (False, None, None)), ((True, 4, 2), (True, "FSDP2", True))],
}


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("gpus", [1, 8])
def test_strategy_for_one_and_eight_80gb_gpus(name, gpus, capsys):
    result = run(name, capsys, gpus=gpus, gpu_memory=80.0)
    (fits, per_model, replicas), (trains, strategy, checkpointing) = STRATEGIES[name][0 if gpus == 1 else 1]
    e, t = result["eval"], result["train"]
    assert (e["fits"], e["gpus_per_model"], e.get("replicas")) == (fits, per_model, replicas)
    assert t["fits"] == trains
    if trains:
        assert (t["strategy"], t["gradient_checkpointing"]) == (strategy, checkpointing)
        assert t["memory_gb"]["total"] <= result["usable_gb"] and t["hours_per_epoch"] > 0
    else:
        assert t["gpus_needed"] == (2 if name == "InternVL2-40B" else 3) and "FSDP2 over" in t["message"]
    if fits:
        assert e["memory_gb"]["total"] <= result["usable_gb"] and gpus % per_model == 0 and e["minutes"] > 0
    else:
        assert f"needs {per_model} GPUs" in e["message"]


# Measured peaks (GB = 2^30 bytes): evaluation with 7-tile images, 30 new tokens, captune's decoder (docs/benchmarks.md,
# H200): the 2B at batch 64 (2026-12-01, seventh session); 8B-76B at batch 16 with benchmarks/sizes.py (2026-12-02,
# twelfth session; 76B extrapolated from 10 and 20 of its layers). LoRA steps with r128.
EVAL_PEAKS = [("InternVL2-2B", 64, 27.9), ("InternVL2-8B", 16, 22.5), ("InternVL2-26B", 16, 62.8),
              ("InternVL2-40B", 16, 91.4), ("InternVL2-Llama3-76B", 16, 161.7)]


@pytest.mark.parametrize("name,batch,measured", EVAL_PEAKS)
def test_eval_memory_within_20_percent_of_measured(name, batch, measured):
    assert P.eval_memory(shape(name), batch)["total"] == pytest.approx(measured, rel=0.2)


TRAIN_PEAKS = [
    # issue 14: one LoRA r128 step on a 7.2k-token row (4 images x 7 tiles), gradient checkpointing, H200
    ("InternVL2-26B", {"tokens": 7200, "checkpointing": True}, 68.0),
    ("InternVL2-40B", {"tokens": 7200, "checkpointing": True}, 100.0),
    # docs/benchmarks.md: captune's default (16,384-token rows, compiled, no checkpointing) and the tutorial's way
    # (4 captions of ~1,870 tokens as separate rows, checkpointing, the logits of every position)
    ("InternVL2-2B", {"tokens": 16384, "checkpointing": False, "compiled": True}, 51.8),
    ("InternVL2-2B", {"tokens": 4 * 1870, "checkpointing": True, "full_logits": True}, 14.9),
]


@pytest.mark.parametrize("name,kwargs,measured", TRAIN_PEAKS)
def test_train_memory_within_20_percent_of_measured(name, kwargs, measured):
    assert P.train_memory(shape(name), 128, **kwargs)["total"] == pytest.approx(measured, rel=0.2)


def test_speed_estimates_match_the_calibration_runs():
    """Within 20%: captune eval 2B 29.3 images/s at batch 64; 8B 12.0, 26B 2.81, 40B 2.13 at batch 16 (H200,
    docs/benchmarks.md); 2B 1.56 h per COCO epoch."""
    assert 1 / P.eval_seconds_per_image(shape("InternVL2-2B"), 64) == pytest.approx(29.3, rel=0.2)
    assert 1 / P.eval_seconds_per_image(shape("InternVL2-8B"), 16) == pytest.approx(12.0, rel=0.2)
    assert 1 / P.eval_seconds_per_image(shape("InternVL2-26B"), 16) == pytest.approx(2.81, rel=0.2)
    assert 1 / P.eval_seconds_per_image(shape("InternVL2-40B"), 16) == pytest.approx(2.13, rel=0.2)
    rate = P.train_tokens_per_s(shape("InternVL2-2B"), False, True, 8, P.GROUP_TOKENS)
    assert P.COCO_IMAGES * P.GROUP_TOKENS / rate / 3600 == pytest.approx(1.56, rel=0.2)


@pytest.mark.parametrize("name,seconds", [("InternVL2-8B", 1.037), ("InternVL2-26B", 3.093), ("InternVL2-40B", 4.600),
                                          ("InternVL2-Llama3-76B", 7.848)])
def test_training_step_times_match_the_sizes_benchmark(name, seconds):
    """Within 10%: one LoRA step on a 7,778-token row of 4 images x 7 tiles, checkpointing, FSDP2 in a group of one
    (benchmarks/sizes.py, H200, 2026-12-02; 76B extrapolated from 10 and 20 of its layers)."""
    tokens = 7778
    rate = P.train_tokens_per_s(shape(name), True, False, 4, tokens / 4)
    assert tokens / rate == pytest.approx(seconds, rel=0.1)


def test_evaluation_is_planned_compiled_as_compile_auto_decides():
    """One GPU with all 5,000 images compiles the prompt (2B: 36.9 images/s end to end, batch 64, H200,
    docs/benchmarks.md); eight replicas of 625 images each, or a model over several GPUs, do not."""
    assert 1 / P.eval_seconds_per_image(shape("InternVL2-2B"), 64, compiled=True) == pytest.approx(36.9, rel=0.1)
    one, eight = (P.choose_eval(shape("InternVL2-2B"), gpus, 72.0) for gpus in (1, 8))
    assert one["compiled"] and not eight["compiled"]
    assert one["images_per_s"] == pytest.approx(1 / P.eval_seconds_per_image(shape("InternVL2-2B"), 64, 1, True))
    split = P.choose_eval(shape("InternVL2-40B"), 2, 72.0)
    assert split["gpus_per_model"] == 2 and not split["compiled"]


def test_json_output(capsys):
    result = P.plan(RELEASES / "InternVL2-40B", gpus=8, gpu_memory=80, json=True)
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(json.dumps(result))
    assert set(printed) >= {"model", "parameters", "weights_gb", "gpus", "gpu_memory_gb", "usable_gb", "eval", "train"}
    assert set(printed["parameters"]) == {"vision_tower", "projector", "llm_embeddings", "llm_layers", "lm_head", "total"}
    assert printed["model"]["release"] == "InternVL2-40B" and printed["model"]["template"] == "Hermes-2"
    assert set(printed["eval"]) >= {"fits", "gpus_per_model", "replicas", "batch", "memory_gb", "images_per_s",
                                    "minutes"}
    assert set(printed["eval"]["memory_gb"]) == {"weights", "kv_cache", "activations", "total"}
    assert set(printed["train"]) >= {"recipe", "lora_rank", "trainable", "fits", "strategy", "gradient_checkpointing",
                                     "token_budget", "compile", "memory_gb", "total_gb", "tokens_per_s",
                                     "hours_per_epoch"}
    assert set(printed["train"]["memory_gb"]) == {"weights", "lora_states", "activations", "total"}
    assert set(printed["train"]["total_gb"]) == {"checkpointing_on", "checkpointing_off"}
    assert printed["train"]["recipe"] == "internvl2_40b_coco_lora"


def test_table_output(capsys):
    P.plan(RELEASES / "InternVL2-2B", gpus=1)
    out = capsys.readouterr().out
    for text in ("InternVL2-2B", "2.21 B parameters", "vision tower", "lm head", "Evaluation", "batch 64",
                 "Training (recipe internvl2_2b_coco_lora", "one GPU, checkpointing off, token budget 16,384"):
        assert text in out


def test_native_layout_config(tmp_path, capsys):
    """A folder converted to transformers' layout (no internvl_config.json kept) plans the same model."""
    config = json.loads((RELEASES / "InternVL2-8B" / "config.json").read_text())
    (tmp_path / "config.json").write_text(native_config(config, 92546).to_json_string())
    result = P.plan(tmp_path)
    capsys.readouterr()
    assert result["parameters"] == P.parameter_counts(P.model_shape(config))


def test_refusals(tmp_path, capsys):
    with pytest.raises(CaptuneError, match="recipe internvl2_8b_coco_lora is for InternVL2-8B, the model is "
                                           "InternVL2-40B: use --recipe internvl2_40b_coco_lora"):
        P.plan(RELEASES / "InternVL2-40B", recipe="internvl2_8b_coco_lora")
    with pytest.raises(CaptuneError, match="no config.json"):
        P.plan(tmp_path)
    with pytest.raises(CaptuneError, match="--gpus must be at least 1"):
        P.plan(RELEASES / "InternVL2-2B", gpus=0)
    with pytest.raises(CaptuneError, match="unknown recipe 'no_such_recipe'; shipped recipes: demo_lora, "):
        P.plan(RELEASES / "InternVL2-2B", recipe="no_such_recipe")


@pytest.mark.parametrize("name,gpus,gpu_memory,note", [
    ("InternVL2-2B", 1, 40.0, "the recipe's token budget 16,384 does not fit: --token-budget 8192"),
    ("InternVL2-40B", 8, 80.0, "faster, and it fits: --no-gradient-checkpointing (62 GB, "),
    ("InternVL2-Llama3-76B", 4, 192.0, "faster, and it fits: --no-fsdp (161 GB, "),
])
def test_training_is_planned_as_captune_train_runs_the_recipe(name, gpus, gpu_memory, note, capsys):
    """The recipe's strategy and checkpointing (what `captune train` does), and the flags that give what the plan would
    rather do, or what the recipe needs to fit."""
    settings = P.recipe_settings(f"internvl2_{P.release_size(P.parameter_counts(shape(name))['total'])}_coco_lora")
    t = run(name, capsys, gpus=gpus, gpu_memory=gpu_memory)["train"]
    assert t["gradient_checkpointing"] == settings.gradient_checkpointing
    assert t["strategy"] == ("one GPU" if gpus == 1 else "FSDP2" if settings.fsdp else "DDP")
    assert note in t["note"]
