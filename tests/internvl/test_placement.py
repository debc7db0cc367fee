"""One model over K GPUs: the placement of each of the seven releases (config-only folders in tests/internvl/releases/),
checked against the native model's modules (built on the meta device) and `captune plan`'s memory figures; and a tiny
model loaded onto a placement (the GPUs of the map stood in for by the CPU) captions as the unplaced one."""

from __future__ import annotations

import inspect
import json
import warnings
from functools import cache
from pathlib import Path

import pytest
import torch

import captune
from captune.errors import CaptuneError
from captune.internvl import placement as L
from captune.internvl import plan as P
from captune.internvl.config import native_config

RELEASES = Path(__file__).resolve().parent / "releases"
NAMES = ["InternVL2-1B", "InternVL2-2B", "InternVL2-4B", "InternVL2-8B", "InternVL2-26B", "InternVL2-40B",
         "InternVL2-Llama3-76B"]
USABLE = 80 * P.USABLE_FRACTION  # an 80 GB GPU, as `captune plan --gpu-memory 80`
# The fewest 80 GB GPUs per model at batch 8 (what `auto` plans for) and at batch 64 (captune eval's default).
PLANNED = {"InternVL2-1B": (1, 1), "InternVL2-2B": (1, 1), "InternVL2-4B": (1, 1), "InternVL2-8B": (1, 1),
           "InternVL2-26B": (1, 2), "InternVL2-40B": (2, 3), "InternVL2-Llama3-76B": (3, 5)}
DEMO_BASE = Path(captune.__file__).resolve().parent / "demo" / "assets" / "demo_base"


def shape(name: str) -> P.Shape:
    return P.model_shape(json.loads((RELEASES / name / "config.json").read_text()))


@cache
def meta_model(name: str):
    from transformers import InternVLForConditionalGeneration

    config = json.loads((RELEASES / name / "config.json").read_text())
    with torch.device("meta"):
        return InternVLForConditionalGeneration(native_config(config, 5))


def cases() -> list[tuple[str, int]]:
    out = []
    for name in NAMES:
        ks = sorted({*PLANNED[name], 2, 4, 8})
        out += [(name, k) for k in ks if k <= shape(name).layers]
    return out


def layer_cost_gb(s: P.Shape, batch: int) -> float:
    costs = L.Costs.of(s, batch)
    return (costs.layer + costs.kv) / P.GB


@pytest.mark.parametrize("name", NAMES)
def test_fewest_gpus_per_release(name):
    """40B needs 2 GPUs of 80 GB and 76B 3 at batch 8, as `captune plan` says (its even split and this placement
    agree); at batch 64, 26B needs 2, 40B 3 and 76B 5. One GPU fewer never fits."""
    s = shape(name)
    for batch, expected in zip((8, 64), PLANNED[name]):
        found = L.fewest_gpus(s, USABLE, batch)
        assert found is not None and found.gpus == expected, (batch, found and found.layers)
        assert found.fits and found.batch == batch
        if expected > 1:
            assert not L.place(s, [USABLE] * (expected - 1), batch).fits
    plan = P.choose_eval(s, 1, USABLE)  # `captune plan --gpus 1 --gpu-memory 80`: what one GPU fits, or needs
    assert (1 if plan["fits"] else plan["gpus_per_model"]) == PLANNED[name][0]


@pytest.mark.parametrize("name,k", cases(), ids=[f"{n}-K{k}" for n, k in cases()])
def test_device_map_places_every_module_once_and_splits_no_layer(name, k):
    """First GPU: vision tower, projector, embeddings (+ rotary frequencies) and the first layers; last GPU: final
    norm and LM head; the layers in order, each whole (a decoder layer, transformers' no-split unit), every GPU at
    least one; every parameter and buffer of the native model under exactly one entry."""
    s, model = shape(name), meta_model(name)
    placement = L.place(s, [USABLE] * k, 8)
    dmap = placement.device_map()
    assert sum(placement.layers) == s.layers and min(placement.layers) >= 1 and len(placement.layers) == k
    layers = [dmap[L.LAYER.format(j)] for j in range(s.layers)]
    assert layers == sorted(layers) and set(layers) == set(range(k))
    assert [layers.count(g) for g in range(k)] == list(placement.layers)
    assert all(dmap[m] == 0 for m in L.FIRST) and all(dmap[m] == k - 1 for m in L.LAST)
    assert len(dmap) == len(L.FIRST) + s.layers + len(L.LAST)
    modules = dict(model.named_modules())
    assert set(dmap) <= set(modules)
    no_split = set(model._no_split_modules)
    for key in dmap:
        if key.startswith("model.language_model.layers."):
            assert type(modules[key]).__name__ in no_split
    names = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]
    for n in names:
        assert sum(n.startswith(key + ".") for key in dmap) == 1, n


@pytest.mark.parametrize("name,k", cases(), ids=[f"{n}-K{k}" for n, k in cases()])
def test_memory_is_the_plans_and_balanced(name, k):
    """The GPUs' weights add up to the model's and their KV caches to the plan's; one GPU is exactly
    `plan.eval_memory`. Balance, the stated tolerance: every GPU's total is within one LLM layer (its weights and
    KV cache) of the balanced share, and at most one layer above the plan's even per-GPU figure (eval_memory over K
    GPUs, which counts the vision tower's activations on every GPU: below it by at most that excess over the LLM's),
    except the first (or last) GPU when it holds a single layer because its vision tower (or LM head) alone is over
    the share (26B and 40B on 4 or 8 GPUs, 1B/2B on 8): it is then above, and the others are within one layer of the
    share."""
    s, batch = shape(name), 8
    placement = L.place(s, [USABLE] * k, batch)
    mem, even, layer = placement.memory_gb, P.eval_memory(s, batch, k), layer_cost_gb(s, batch)
    costs = L.Costs.of(s, batch)
    vision_excess = max(0.0, costs.vision_act - costs.llm_act) / P.GB
    assert sum(m["weights"] for m in mem) == pytest.approx(P.parameter_counts(s)["total"] * 2 / P.GB, rel=1e-9)
    assert sum(m["kv_cache"] for m in mem) == pytest.approx(even["kv_cache"] * k, rel=1e-9)
    if k == 1:
        assert mem[0] == pytest.approx(P.eval_memory(s, batch, 1), rel=1e-9)
    share = placement.level * USABLE
    held = [i for i, (m, n) in enumerate(zip(mem, placement.layers)) if n == 1 and m["total"] > share + layer]
    assert set(held) <= {0, k - 1}, held  # only the GPUs with fixed parts (vision tower, LM head) can be held
    for i, m in enumerate(mem):
        if i in held:
            continue
        assert abs(m["total"] - share) <= layer + 1e-9, (i, m["total"], share, layer)
        if not held:
            assert even["total"] - layer - vision_excess - 1e-9 <= m["total"] <= even["total"] + layer + 1e-9, \
                (i, m["total"], even["total"])


# LLM layers per GPU at batch 8 on 80 GB GPUs. The first GPU holds the vision tower (InternViT-6B: 11 GB for 26B and
# up) and its activations, the last the LM head (1B's and 2B's vocabularies outweigh several of their small layers).
LAYERS = {
    "InternVL2-1B": {2: (1, 23), 4: (1, 10, 10, 3), 8: (1, 4, 3, 4, 4, 3, 4, 1)},
    "InternVL2-2B": {2: (9, 15), 4: (1, 8, 9, 6), 8: (1, 4, 3, 4, 3, 4, 4, 1)},
    "InternVL2-4B": {2: (14, 18), 4: (5, 9, 9, 9), 8: (1, 4, 5, 4, 5, 4, 5, 4)},
    "InternVL2-8B": {2: (15, 17), 4: (6, 9, 9, 8), 8: (2, 4, 5, 4, 5, 4, 5, 3)},
    "InternVL2-26B": {2: (15, 33), 4: (1, 16, 16, 15), 8: (1, 7, 7, 7, 7, 7, 7, 5)},
    "InternVL2-40B": {2: (24, 36), 4: (6, 18, 18, 18), 8: (1, 9, 8, 9, 8, 9, 8, 8)},
    "InternVL2-Llama3-76B": {3: (21, 30, 29), 2: (36, 44), 4: (14, 22, 23, 21), 8: (3, 11, 11, 11, 12, 11, 11, 10)},
}


@pytest.mark.parametrize("name", NAMES)
def test_layers_per_gpu(name):
    s = shape(name)
    for k, layers in LAYERS[name].items():
        assert L.place(s, [USABLE] * k, 8).layers == layers, k
    assert L.fewest_gpus(s, USABLE, 8).layers == LAYERS[name].get(PLANNED[name][0], (s.layers,))


def test_split_model_shape_first_gpu_takes_fewer_layers():
    """As InternVL's `split_model`: the first GPU, which also holds the vision tower, takes fewer layers."""
    for name in ("InternVL2-26B", "InternVL2-40B", "InternVL2-Llama3-76B"):
        layers = L.place(shape(name), [USABLE] * 2, 8).layers
        assert layers[0] < layers[1], (name, layers)


def test_unequal_gpus_are_filled_to_the_same_fraction():
    s = shape("InternVL2-40B")
    placement = L.place(s, [USABLE, USABLE / 2, USABLE], 8)
    fill = [m["total"] / c for m, c in zip(placement.memory_gb, placement.capacity_gb)]
    assert placement.layers[1] < placement.layers[2]
    layer = layer_cost_gb(s, 8)
    for m, c in zip(placement.memory_gb, placement.capacity_gb):
        assert abs(m["total"] - placement.level * c) <= layer
    assert max(fill) - min(fill) < 2 * layer / (USABLE / 2)


def test_device_map_on_real_devices():
    placement = L.place(shape("InternVL2-40B"), [USABLE] * 2, 8)
    devices = [torch.device("cuda", 6), torch.device("cuda", 7)]
    dmap = placement.device_map(devices)
    assert dmap["model.vision_tower"] == devices[0] and dmap["lm_head"] == devices[1]
    assert set(dmap.values()) == set(devices)
    with pytest.raises(ValueError):
        placement.device_map(devices[:1])


def test_more_gpus_than_layers_is_refused():
    s = shape("InternVL2-1B")
    with pytest.raises(CaptuneError, match="1 to 24 GPUs, not 25"):
        L.place(s, [USABLE] * 25, 8)


# ------------------------------------------------------------------------------------------- loading onto a placement


def cpu_map(path: Path, k: int = 2) -> dict:
    """The placement's map over K GPUs with every GPU stood in for by the CPU."""
    s = P.model_shape(P.read_config(path))
    return L.place(s, [1.0] * k, 2).device_map(["cpu"] * k)


def scenes(n: int = 6) -> list:
    """Rendered scenes of different sizes (so different tile counts in one left-padded batch)."""
    import numpy as np

    from captune.data.synthetic import random_scene, render_scene

    rng = np.random.default_rng(3)
    return [render_scene(random_scene(rng), (112 * (1 + i % 3), 112 * (1 + i % 2))) for i in range(n)]


@pytest.fixture(scope="module")
def demo_models(tmp_path_factory):
    """The demo's trained base model (original layout), plain, and placed over two stand-in GPUs from its original
    folder and from the same converted to the native layout."""
    from captune.internvl.convert import convert_checkpoint

    native = tmp_path_factory.mktemp("native") / "hf"
    convert_checkpoint(DEMO_BASE, native, to="hf")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain, processor = captune.load(DEMO_BASE, dtype="fp32")
        placed = {layout: captune.load(path, dtype="fp32", device_map=cpu_map(path))[0]
                  for layout, path in (("internvl", DEMO_BASE), ("hf", native))}
    return plain, processor, placed


@pytest.mark.parametrize("layout", ["internvl", "hf"])
def test_placed_model_is_dispatched_as_its_map_says(demo_models, layout):
    """Every placed module carries accelerate's hook with the map's device; the model's own hook sends outputs back
    to the inputs' device, which is `model.device` (the vision tower's); the weights are the plain model's."""
    plain, _, placed = demo_models
    model = placed[layout]
    dmap = cpu_map(DEMO_BASE)
    assert model.hf_device_map == {k: torch.device(v) for k, v in dmap.items()}
    for name in dmap:
        hook = model.get_submodule(name)._hf_hook
        assert hook.execution_device == torch.device("cpu"), name
    assert model._hf_hook.io_same_device and model.device == torch.device("cpu")
    plain_state = plain.state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(value, plain_state[key]), key


@pytest.mark.parametrize("layout", ["internvl", "hf"])
def test_placed_model_captions_as_the_plain_one(demo_models, layout):
    """Greedy captions (captune's batched path and transformers' `generate`) of a left-padded batch of scenes."""
    from captune.eval.generate import GenerationSettings, generate_ids

    plain, processor, placed = demo_models
    settings = GenerationSettings(max_new_tokens=16, min_new_tokens=4)
    images = scenes()
    expected = captune.caption_images(plain, processor, images, batch_size=3, settings=settings)
    assert captune.caption_images(placed[layout], processor, images, batch_size=3, settings=settings) == expected
    assert len(set(expected)) > 1
    batch = processor(images[:3], max_tiles=6)
    assert torch.equal(generate_ids(placed[layout], processor, batch, settings),
                       generate_ids(plain, processor, batch, settings))


def test_placed_forward_with_a_static_cache(demo_models):
    """A prompt, then two single-token steps, through transformers' StaticCache: the logits of the plain model."""
    from transformers import StaticCache

    from captune.inputs.tiling import normalize

    plain, processor, placed = demo_models
    batch = processor(scenes(2), max_tiles=2)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
              "pixel_values": normalize(batch["pixel_values"])}
    name = "cache" if "cache" in inspect.signature(plain.forward).parameters else "past_key_values"
    logits = []
    for model in (plain, placed["internvl"]):
        cache = StaticCache(config=model.config, max_cache_len=inputs["input_ids"].shape[1] + 4)
        with torch.inference_mode():
            steps = [model(**inputs, **{name: cache}, use_cache=True).logits[:, -1]]
            ids, mask = inputs["input_ids"], inputs["attention_mask"]
            for _ in range(2):
                ids = torch.cat([ids, steps[-1].argmax(-1, keepdim=True)], 1)
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
                out = model(input_ids=ids[:, -1:], attention_mask=mask, **{name: cache},
                            cache_position=torch.tensor([ids.shape[1] - 1]), use_cache=True)
                steps.append(out.logits[:, -1])
        logits.append(torch.stack(steps))
    assert torch.equal(logits[0], logits[1])


def test_adapter_is_placed_and_merged(demo_models, tmp_path):
    """An adapter folder: its base placed over the map, the adapter merged in memory, the same logits as unplaced."""
    from captune.inputs.tiling import normalize
    from captune.internvl.lora import add_lora

    plain, processor, _ = demo_models
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base, _ = captune.load(DEMO_BASE, dtype="fp32")
        peft = add_lora(base, rank=4, alpha=8, dropout=0.0)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, p in peft.named_parameters():
                if "lora_B" in name:
                    p.copy_(0.1 * torch.randn(p.shape, generator=g))
        peft.peft_config["default"].base_model_name_or_path = str(DEMO_BASE)
        peft.save_pretrained(str(tmp_path / "adapter"))
        merged, _ = captune.load(tmp_path / "adapter", dtype="fp32")
        placed, _ = captune.load(tmp_path / "adapter", dtype="fp32", device_map=cpu_map(DEMO_BASE))
    batch = processor(scenes(2), max_tiles=2)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
              "pixel_values": normalize(batch["pixel_values"])}
    with torch.inference_mode():
        expected, got, base_logits = (m(**inputs).logits for m in (merged, placed, plain))
    assert not torch.equal(expected, base_logits)  # the adapter changes something
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("broken,message", [
    ({"model.vision_tower.encoder": "cpu"}, "places no module holding model.vision_tower.embeddings"),
    ({"model.no_such_module": "cpu"}, "does not have: model.no_such_module"),
    ({"model.vision_tower.encoder.layer.0": "cpu"}, "inside another placed module"),
])
def test_a_device_map_that_misses_or_invents_modules_is_refused(broken, message):
    dmap = cpu_map(DEMO_BASE)
    if "model.vision_tower.encoder" in broken:
        del dmap["model.vision_tower"]
    dmap.update(broken)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(CaptuneError, match=message):
            captune.load(DEMO_BASE, dtype="fp32", device_map=dmap)
