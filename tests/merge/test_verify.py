"""The merge check of a model larger than memory (InternVL2-76B is 305 GB in float32): the logits checks on a
depth-reduced model, every weight written compared shard by shard, the whole model never loaded. Tiny 5-layer
releases in 3 shards, the free memory faked."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from helpers.adapters import make_adapter, plant_wrong_merge
from helpers.forbid import forbid
from helpers.tiny import IMAGE_TOKEN_ID
from safetensors.torch import load_file, save_file

from captune.demo.tinymodel import internvl_config, write_release
from captune.errors import CaptuneError
from captune.internvl import load
from captune.internvl.plan import read_config
from captune.merge import depth
from captune.merge.depth import check_depth
from captune.merge.merge import merge
from captune.merge.verify import verify_merge

LAYERS = 5
RELEASES = Path(__file__).resolve().parents[1] / "internvl" / "releases"
DEEP = "model.language_model.layers.4.mlp.down_proj.weight"  # beyond the depth-reduced model's 2 layers
DEEP_KV = ("model.language_model.layers.3.self_attn.k_proj.weight",
           "model.language_model.layers.3.self_attn.v_proj.weight")


@pytest.fixture(scope="module", params=["internlm2", "qwen2"])
def release(request, tmp_path_factory):
    """A 5-layer release in 3 shards (InternLM2's fused q/k/v, Qwen2's per-layer attention types) and an adapter whose
    changes are as large as the weights."""
    root = tmp_path_factory.mktemp(request.param)
    config = internvl_config(request.param, llm={"num_hidden_layers": LAYERS})
    base = write_release(root / "base", config, init="noise", shards=3)
    return base, make_adapter(base, root / "adapter", image_token_id=IMAGE_TOKEN_ID, rank=8, b_scale=1.0, seed=0)


@pytest.fixture
def little_memory(monkeypatch) -> list:
    """1 MB free on the check's device, and loading a whole model fails the test. Returns the LLM depth of every model
    the check builds."""
    monkeypatch.setattr(depth, "free_bytes", lambda device: 2**20)
    forbid(monkeypatch, ["captune.internvl.load.load_native", "captune.internvl.load.load_original"],
           "the check loaded a whole model")
    built, real = [], load.empty_model

    def spy(*args, **kwargs):
        built.append(kwargs.get("text_layers"))
        return real(*args, **kwargs)

    monkeypatch.setattr(load, "empty_model", spy)
    return built


def quiet_merge(adapter, out, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tiny release has no tokenizer
        return merge(adapter, out, **kwargs)


def test_a_model_larger_than_memory_is_checked_depth_reduced(release, little_memory, tmp_path, monkeypatch):
    _, adapter = release
    lines: list[str] = []
    out = quiet_merge(adapter, tmp_path / "out", format="both", dtype="bf16", log=lines.append)
    text = "\n".join(lines)
    assert "Checking on a depth-reduced model: the model in float32 (" in text
    assert (f"does not fit cpu (0 GB free): its logits are checked with the vision tower, the projector and the first "
            f"2 of its {LAYERS} LLM layers, and every weight written is still compared, shard by shard") in text
    assert "Checked the merge in float32: relative error" in text
    assert little_memory and set(little_memory) == {2}  # every model the check built: 2 LLM layers

    # every weight was compared: as many as the whole check compares, which also accepts this output
    monkeypatch.undo()
    whole: list[str] = []
    assert verify_merge(adapter, out, log=whole.append) > 0
    assert not any("depth-reduced" in line for line in whole)
    noise = next(line for line in whole if "own rounding moves them by" in line).split("moves them by ")[1]
    assert float(noise.rstrip(")")) > 0  # one float32 rounding of the merged weights, simulated: in the tolerance
    for layout in ("hf", "internvl"):
        counted = next(line for line in whole if line.startswith(f"Checked the {layout} output"))
        n = counted.split("its ")[1].split(" weights")[0]
        assert (f"Checked the {layout} output: its {n} weights are the float32 merge rounded to bfloat16, bit for bit, "
                "and its vision tower, projector and first 2 LLM layers load as that model") in text


@pytest.mark.parametrize("error,format,message", [
    ("wrong_scale", "hf", "the merge differs from the adapter: relative error of the float32-merged logits"),
    ("skipped_delta", "hf", (r"\(hf\) is not the float32 merge rounded to bfloat16: 1 of \d+ weights differ "
                             rf".*{DEEP}")),
    ("swapped_k_v", "internvl", (r"\(internvl\) is not the float32 merge rounded to bfloat16: 2 of \d+ weights "
                                 r"differ .*layers\.3\.self_attn\.k_proj.*v_proj")),
])
def test_a_wrong_merge_is_refused_depth_reduced(release, little_memory, tmp_path, monkeypatch, error, format, message):
    _, adapter = release
    plant_wrong_merge(monkeypatch, error, DEEP, DEEP_KV)
    with pytest.raises(CaptuneError, match=message + ".*nothing was written"):
        quiet_merge(adapter, tmp_path / "out", format=format, dtype="bf16")
    assert list(tmp_path.iterdir()) == []
    assert set(little_memory) == {2}


@pytest.mark.parametrize("change", ["tampered", "missing"])
def test_verify_merge_depth_reduced_finds_a_changed_deep_weight(release, tmp_path, monkeypatch, change):
    _, adapter = release
    out = quiet_merge(adapter, tmp_path / "out", dtype="bf16", verify=False)
    shard = next(f for f in sorted(out.glob("*.safetensors")) if DEEP in load_file(f))
    tensors = load_file(shard)
    if change == "tampered":
        tensors[DEEP] = tensors[DEEP].clone()
        tensors[DEEP][0, 0] += 1.0
    else:
        del tensors[DEEP]
    save_file(tensors, shard, metadata={"format": "pt"})
    monkeypatch.setattr(depth, "free_bytes", lambda device: 2**20)
    expected = "1 of .* weights differ" if change == "tampered" else f"does not hold the base model's weights: .*{DEEP}"
    with pytest.raises(CaptuneError, match=expected):
        verify_merge(adapter, out)


@pytest.mark.parametrize("free_gb,whole", [
    (80, ["InternVL2-1B", "InternVL2-2B", "InternVL2-4B", "InternVL2-8B"]),  # an 80 GB GPU: 8B is 39 GB in float32
    (320, ["InternVL2-1B", "InternVL2-26B", "InternVL2-2B", "InternVL2-40B", "InternVL2-4B", "InternVL2-8B"]),
])
def test_the_releases_checked_whole_are_those_whose_float32_copy_fits(free_gb, whole, monkeypatch):
    monkeypatch.setattr(depth, "free_bytes", lambda device: free_gb * 2**30)
    layers = {p.name: check_depth(read_config(p), torch.device("cpu"))[0] for p in RELEASES.iterdir()}
    assert sorted(name for name, n in layers.items() if n is None) == whole
    assert all(n == 2 for name, n in layers.items() if name not in whole)


def test_the_depth_reduced_model_reads_only_its_layers(release, monkeypatch):
    import re

    from captune.internvl import keys
    from captune.merge.verify import load_model

    base, _ = release
    read, real = [], keys.iter_shard

    def spy(shard, wanted=None):
        for key, tensor in real(shard, wanted):
            read.append(key)
            yield key, tensor

    monkeypatch.setattr(keys, "iter_shard", spy)
    model = load_model(base, IMAGE_TOKEN_ID, torch.device("cpu"), layers=2)
    assert len(model.model.language_model.layers) == 2
    llm = [k for k in read if k.startswith("language_model.model.layers.")]
    assert {int(re.match(r"language_model\.model\.layers\.(\d+)\.", k)[1]) for k in llm} == {0, 1}


def test_an_output_sharded_otherwise_is_refused_not_read_whole(tmp_path, monkeypatch):
    """verify-merge of a folder whose shards do not follow the base's (written by another tool): one error once two
    shards' worth of the base are held, not the whole base read into memory."""
    config = internvl_config("qwen2", llm={"num_hidden_layers": LAYERS})
    base = write_release(tmp_path / "base", config, init="noise", shards=6)
    adapter = make_adapter(base, tmp_path / "adapter", image_token_id=IMAGE_TOKEN_ID, rank=8, b_scale=1.0, seed=0)
    out = quiet_merge(adapter, tmp_path / "out", dtype="bf16", verify=False)
    first, *_, last = sorted(out.glob("*.safetensors"))  # their tensors swapped: the output begins with the base's end
    a, b = load_file(first), load_file(last)
    save_file(b, first, metadata={"format": "pt"})
    save_file(a, last, metadata={"format": "pt"})
    index = json.loads((out / "model.safetensors.index.json").read_text())
    swap = {first.name: last.name, last.name: first.name}
    index["weight_map"] = {k: swap.get(v, v) for k, v in index["weight_map"].items()}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    monkeypatch.setattr(depth, "free_bytes", lambda device: 2**20)
    with pytest.raises(CaptuneError, match="its shards do not follow the base's"):
        verify_merge(adapter, out)
