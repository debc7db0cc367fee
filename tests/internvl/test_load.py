"""captune.load against the original InternVL2 code's outputs (fixtures) and independent references."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers.tiny import reference_image_features, write_original_checkpoint
from safetensors.torch import load_file

import captune
from captune.demo.tinymodel import internvl_config
from captune.errors import CaptuneError

# Made by the original InternVL code: InternLM2 (2B/8B/26B), Qwen2 (1B), and Phi-3 with LongRoPE (4B), its prompt
# inside the original window (short factors and the attention scaling) and past it (long factors).
TINY = ["internvl2_internlm2", "internvl2_qwen2", "internvl2_phi3_su_short", "internvl2_phi3_su_long"]
# float32 parity is measured at ~4e-7 relative error; 1e-5 leaves room for BLAS differences and nothing else.
PARITY = 1e-5


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module", params=TINY)
def tiny(request, fixtures):
    path = fixtures / "models" / request.param
    meta = json.loads((path / "reference.json").read_text())
    with pytest.warns(UserWarning, match="no tokenizer"):
        model, processor = captune.load(path, dtype="fp32", image_token_id=meta["image_context_token_id"])
    assert processor is None
    return model, load_file(path / "reference.safetensors"), path


def test_native_class(tiny):
    from transformers import InternVLForConditionalGeneration

    model, _, _ = tiny
    assert type(model) is InternVLForConditionalGeneration
    assert model.config.tie_word_embeddings is False
    assert not torch.equal(model.lm_head.weight, model.get_input_embeddings().weight)


def test_vision_embeddings_match_original(tiny):
    model, ref, _ = tiny
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=ref["pixel_values"].float()).pooler_output
    assert rel_err(feats, ref["vision_embeds"]) < PARITY


def test_logits_match_original(tiny):
    model, ref, _ = tiny
    with torch.no_grad():
        logits = model(input_ids=ref["input_ids"], pixel_values=ref["pixel_values"].float()).logits[:, -16:]
    assert rel_err(logits, ref["logits_last16"]) < PARITY


def test_greedy_tokens_match_original(tiny):
    model, ref, _ = tiny
    n = ref["generated_ids"].shape[1]
    out = model.generate(input_ids=ref["input_ids"], pixel_values=ref["pixel_values"].float(), do_sample=False,
                         max_new_tokens=n, min_new_tokens=n)
    assert out[0, -n:].tolist() == ref["generated_ids"][0].tolist()


def test_reference_vision_path_matches_fixture(fixtures):
    """The hand-written reference used for InternViT-6B below reproduces the original on the 300M fixture."""
    path = fixtures / "models" / "internvl2_internlm2"
    cfg = json.loads((path / "config.json").read_text())
    ref = load_file(path / "reference.safetensors")
    feats = reference_image_features(load_file(path / "model.safetensors"), cfg, ref["pixel_values"].float())
    assert rel_err(feats, ref["vision_embeds"]) < PARITY


def test_internvit_6b_matches_reference(tmp_path):
    """RMSNorm, qk-normalisation over all heads, no qkv bias (InternVL2-26B/40B/76B)."""
    path = write_original_checkpoint(tmp_path / "m", "internlm2", vision="6b")
    model, _ = captune.load(path, dtype="fp32", image_token_id=1017)
    pixels = torch.randn(2, 3, 448, 448)
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=pixels).pooler_output
    expected = reference_image_features(load_file(path / "model.safetensors"), internvl_config("internlm2", "6b"), pixels)
    assert rel_err(feats, expected) < PARITY


@pytest.mark.parametrize("family", ["phi3", "llama", "qwen2"])
def test_llm_families_match_transformers_reference(tmp_path, family):
    """The language model part equals transformers' own class loaded with the original `language_model.*` weights
    (InternVL2-4B's bundled Phi-3 and the Llama releases use exactly these architectures)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from captune.internvl.config import native_text_config

    path = write_original_checkpoint(tmp_path / "m", family)
    model, _ = captune.load(path, dtype="fp32", image_token_id=1017)
    cfg = json.loads((path / "config.json").read_text())
    text = native_text_config(cfg)
    reference = AutoModelForCausalLM.from_config(AutoConfig.for_model(text.pop("model_type"), **text))
    sd = load_file(path / "model.safetensors")
    missing, unexpected = reference.load_state_dict(
        {k.removeprefix("language_model."): v for k, v in sd.items() if k.startswith("language_model.")}, strict=False
    )
    assert not unexpected and all("rotary" in k for k in missing)
    ids = torch.randint(0, 1000, (2, 150))  # past Phi-3's original_max_position_embeddings (64): long factors
    with torch.no_grad():
        ours, theirs = model(input_ids=ids).logits, reference.eval()(input_ids=ids).logits
    assert rel_err(ours, theirs) < 1e-5


def test_sharded_checkpoint_loads_like_single(tmp_path):
    single = write_original_checkpoint(tmp_path / "one", "internlm2")
    sharded = write_original_checkpoint(tmp_path / "three", "internlm2", shards=3)
    a, _ = captune.load(single, dtype="fp32", image_token_id=1017)
    b, _ = captune.load(sharded, dtype="fp32", image_token_id=1017)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)


@pytest.mark.parametrize("layout", ["internvl", "hf"])
def test_meta_model_filled_weight_by_weight_equals_load(tmp_path, layout):
    """The FSDP path: shapes on the meta device, PEFT-wrapped, then every weight streamed into its place."""
    from captune.internvl.folder import open_checkpoint
    from captune.internvl.load import fill_weights, rebuild_buffers
    from captune.internvl.lora import add_lora

    path = write_original_checkpoint(tmp_path / "orig", "qwen2", shards=2)
    if layout == "hf":
        with pytest.warns(UserWarning, match="no tokenizer"):
            path = captune.convert_checkpoint(path, tmp_path / "hf")
    expected, _ = captune.load(path, dtype="fp32", image_token_id=1017)
    model, _ = captune.load(path, dtype="fp32", device="meta", image_token_id=1017)
    assert all(p.is_meta for p in model.parameters())
    model = add_lora(model, rank=4, alpha=8, dropout=0.0, train_projector=True)
    model.to_empty(device="cpu")
    filled = set()

    def put(name, param, tensor):
        filled.add(name)
        with torch.no_grad():
            param.copy_(tensor)

    fill_weights(model, open_checkpoint(path), put)
    rebuild_buffers(model, torch.device("cpu"))
    assert not {n for n, _ in model.named_parameters() if ".lora_" not in n} - filled
    base = model.base_model.model
    ids = torch.randint(3, 1000, (1, 40))
    with torch.no_grad():
        with model.disable_adapter():
            ours = base(input_ids=ids).logits
        theirs = expected(input_ids=ids).logits
    assert torch.equal(ours, theirs)


def test_missing_weight_is_named(tmp_path):
    from safetensors.torch import save_file

    from captune.internvl.folder import open_checkpoint
    from captune.internvl.load import fill_weights

    path = write_original_checkpoint(tmp_path / "orig", "qwen2")
    tensors = load_file(path / "model.safetensors")
    del tensors["mlp1.0.weight"]
    save_file(tensors, path / "model.safetensors")
    model, _ = captune.load(path, dtype="fp32", device="meta", image_token_id=1017)
    with pytest.raises(CaptuneError, match="missing model.multi_modal_projector.layer_norm.weight"):
        fill_weights(model, open_checkpoint(path), lambda *_: None)


def test_dtype_keeps_rotary_frequencies_in_float32(fixtures):
    model, _ = captune.load(fixtures / "models" / "internvl2_internlm2", dtype="bf16", image_token_id=1017)
    assert model.dtype == torch.bfloat16
    assert model.model.language_model.rotary_emb.inv_freq.dtype == torch.float32


# ------------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("config,names", [({"architectures": ["BertModel"]}, "architectures BertModel"),
                                          ({"model_type": "bert"}, "model_type 'bert'"),
                                          ({}, "neither architectures nor model_type")])
def test_not_a_checkpoint(tmp_path, config, names):
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CaptuneError, match=f"not an InternVL checkpoint: config.json names {names}, expected"):
        captune.load(tmp_path)


def test_missing_folder_and_config(tmp_path):
    with pytest.raises(CaptuneError, match="no such folder"):
        captune.load(tmp_path / "nope")
    with pytest.raises(CaptuneError, match="no config.json"):
        captune.load(tmp_path)


def test_missing_shard(tmp_path):
    path = write_original_checkpoint(tmp_path / "m", "internlm2", shards=2)
    (path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CaptuneError, match="missing shard model-00002-of-00002.safetensors"):
        captune.load(path)


def test_unknown_llm_architecture(tmp_path, fixtures):
    path = tmp_path / "m"
    shutil.copytree(fixtures / "models" / "internvl2_internlm2", path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["llm_config"]["architectures"] = ["MambaForCausalLM"]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CaptuneError, match="MambaForCausalLM is not supported"):
        captune.load(path)


def test_ps_version_v1_refused(tmp_path, fixtures):
    path = tmp_path / "m"
    shutil.copytree(fixtures / "models" / "internvl2_internlm2", path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["ps_version"] = "v1"
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CaptuneError, match="ps_version 'v1' is not supported"):
        captune.load(path)


def test_truncated_shard(tmp_path, fixtures):
    path = tmp_path / "m"
    shutil.copytree(fixtures / "models" / "internvl2_internlm2", path)
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CaptuneError, match="model.safetensors"):
        captune.load(path, image_token_id=1017)


def test_wrapping_in_lora_prints_no_transformers_deprecation(tmp_path):
    """PEFT reads `is_gradient_checkpointing`, which recent transformers deprecates with a FutureWarning: nothing a
    captune user can act on, so captune silences that one message (in a fresh process: pytest resets filters)."""
    import subprocess
    import sys

    from captune.demo.demo import base_model_path

    code = ("import captune; from captune.internvl.lora import add_lora; "
            f"m, _ = captune.load({str(base_model_path())!r}); "
            "add_lora(m, rank=4, alpha=8, dropout=0.0, vision=False, train_projector=False)")
    run = subprocess.run([sys.executable, "-W", "default", "-c", code], capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr
    assert "is_gradient_checkpointing" not in run.stderr
