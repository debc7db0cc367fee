"""`captune convert`: original -> native -> original is bit-identical; the native folder needs no captune."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers.tiny import all_tensors, assert_bit_identical, write_original_checkpoint
from safetensors import safe_open
from safetensors.torch import load_file

import captune
from captune.cli import main
from captune.errors import CaptuneError


@pytest.mark.parametrize("family,vision,shards", [
    ("internlm2", "300m", 1), ("qwen2", "300m", 2), ("phi3", "300m", 1), ("llama", "6b", 3), ("internlm2", "6b", 2),
])
def test_round_trip_is_bit_identical(tmp_path, family, vision, shards):
    src = write_original_checkpoint(tmp_path / "src", family, vision, shards=shards)
    with pytest.warns(UserWarning, match="no tokenizer"):
        captune.convert_checkpoint(src, tmp_path / "hf", to="hf")
    captune.convert_checkpoint(tmp_path / "hf", tmp_path / "back", to="internvl")
    assert_bit_identical(all_tensors(src), all_tensors(tmp_path / "back"))
    assert json.loads((tmp_path / "back" / "config.json").read_text()) == json.loads((src / "config.json").read_text())
    # the sharding is kept
    assert sorted(p.name for p in (tmp_path / "hf").glob("*.safetensors")) == sorted(p.name for p in src.glob("*.safetensors"))


def test_round_trip_of_the_bf16_miniature(tmp_path, fixtures):
    src = fixtures / "models" / "internvl2_2b_mini"
    captune.convert_checkpoint(src, tmp_path / "hf")
    captune.convert_checkpoint(tmp_path / "hf", tmp_path / "back", to="internvl")
    back = all_tensors(tmp_path / "back")
    assert_bit_identical(all_tensors(src), back)
    assert back["language_model.model.tok_embeddings.weight"].dtype == torch.bfloat16
    assert json.loads((tmp_path / "back" / "config.json").read_text()) == json.loads((src / "config.json").read_text())


def test_python_files_are_carried_to_the_original_layout(tmp_path):
    src = write_original_checkpoint(tmp_path / "src", "qwen2")
    with pytest.warns(UserWarning):
        captune.convert_checkpoint(src, tmp_path / "hf")
    (tmp_path / "hf" / "modeling_internvl_chat.py").write_text("# remote code\n")
    captune.convert_checkpoint(tmp_path / "hf", tmp_path / "back", to="internvl")
    assert (tmp_path / "back" / "modeling_internvl_chat.py").read_text() == "# remote code\n"


FRESH_PROCESS = textwrap.dedent("""
    import sys, torch
    from transformers import AutoModelForImageTextToText
    assert "captune" not in sys.modules
    model = AutoModelForImageTextToText.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
    data = torch.load(sys.argv[2])
    with torch.no_grad():
        logits = model(input_ids=data["input_ids"], pixel_values=data["pixel_values"]).logits
    torch.save(logits[:, -16:], sys.argv[3])
    print(type(model).__name__)
""")


def test_native_folder_loads_with_plain_transformers_in_a_fresh_process(tmp_path, fixtures):
    src = fixtures / "models" / "internvl2_internlm2"
    ref = load_file(src / "reference.safetensors")
    with pytest.warns(UserWarning, match="no tokenizer"):
        captune.convert_checkpoint(src, tmp_path / "hf")
    # A source without a tokenizer does not know the id of <IMG_CONTEXT>; set it as a user would.
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg["image_token_id"] = 1017
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    torch.save({"input_ids": ref["input_ids"], "pixel_values": ref["pixel_values"].float()}, tmp_path / "in.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run([sys.executable, "-c", FRESH_PROCESS, str(tmp_path / "hf"), str(tmp_path / "in.pt"),
                          str(tmp_path / "out.pt")], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "InternVLForConditionalGeneration" in run.stdout
    logits = torch.load(tmp_path / "out.pt")
    err = (logits - ref["logits_last16"]).norm() / ref["logits_last16"].norm()
    assert err < 1e-5  # measured ~4e-7


def test_native_folder_loads_back_through_captune(tmp_path, fixtures):
    src = fixtures / "models" / "internvl2_qwen2"
    with pytest.warns(UserWarning):
        captune.convert_checkpoint(src, tmp_path / "hf")
    with pytest.warns(UserWarning):
        a, _ = captune.load(src, image_token_id=1017)
        b, _ = captune.load(tmp_path / "hf", image_token_id=1017)
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_refuses_non_empty_out_without_force(tmp_path, fixtures):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(CaptuneError, match="not empty"):
        captune.convert_checkpoint(fixtures / "models" / "internvl2_qwen2", out)
    assert (out / "keep.txt").read_text() == "mine"


def test_failed_convert_leaves_no_out(tmp_path, fixtures, monkeypatch):
    import captune.internvl.convert as conv

    calls = {"n": 0}
    real = conv._save_shard

    def dying_save(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # as if the process were killed half-way
        return real(*args, **kwargs)

    monkeypatch.setattr(conv, "_save_shard", dying_save)
    src = write_original_checkpoint(tmp_path / "src", "internlm2", shards=3)
    with pytest.raises(KeyboardInterrupt), pytest.warns(UserWarning):
        captune.convert_checkpoint(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not any(p.name.startswith(".out.tmp") for p in tmp_path.iterdir())


def test_cli_convert_errors_are_one_line(tmp_path, capsys):
    assert main(["convert", str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("captune: error:") and "missing" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_converted_config_has_native_fields(tmp_path, fixtures):
    captune.convert_checkpoint(fixtures / "models" / "internvl2_2b_mini", tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["architectures"] == ["InternVLForConditionalGeneration"]
    assert cfg["tie_word_embeddings"] is False
    assert cfg["image_token_id"] == 92546
    assert cfg["text_config"]["model_type"] == "llama"
    assert cfg["text_config"]["rope_parameters"]["rope_type"] == "dynamic"
    gen = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert gen["eos_token_id"] == 92542
    with safe_open(tmp_path / "hf" / "model.safetensors", "pt") as f:
        assert "model.language_model.layers.0.self_attn.q_proj.weight" in f.keys()
