"""captune's static-cache decoder gives transformers' `generate` tokens: the minimum length, the stop token, padding
after it, left-padded rows of different tile counts, and buffers reused across batches of other shapes."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

import captune
from captune.eval.generate import Captioner, GenerationSettings, model_inputs
from captune.eval.greedy import GreedyDecoder


@pytest.fixture(scope="module")
def mini(fixtures):
    model, processor = captune.load(fixtures / "models" / "internvl2_2b_mini", dtype="fp32")
    images = [Image.open(p).convert("RGB") for p in sorted((fixtures / "tiling" / "images").iterdir())]
    images += [images[0].resize((640, 640)), images[0].resize((640, 360)), images[1].rotate(90)]
    return model, processor, images


def _generate(model, inputs, stop: int, pad: int, max_new: int, min_new: int) -> torch.Tensor:
    out = model.generate(**inputs, do_sample=False, num_beams=1, max_new_tokens=max_new, min_new_tokens=min_new,
                         eos_token_id=stop, pad_token_id=pad)
    return out[:, inputs["input_ids"].shape[1]:]


# The miniature's captions repeat tokens 486 and 267 (its weights are random): taken as the stop token, each row
# stops at its own step, some below the minimum length.
@pytest.mark.parametrize("stop,min_new", [(486, 4), (267, 1), (28, 3)])
def test_decoder_equals_generate(mini, stop, min_new):
    model, processor, images = mini
    inputs = model_inputs(model, processor(images, max_tiles=6))
    assert not bool(inputs["attention_mask"].all())  # rows are left-padded
    expected = _generate(model, inputs, stop, processor.pad_token_id, 12, min_new)
    decoder = GreedyDecoder(model, stop, processor.pad_token_id, 12, min_new)
    got = decoder(**inputs)
    assert torch.equal(got, expected)
    assert (expected == processor.pad_token_id).any()  # some rows stopped early: padding is checked


def test_decoder_equals_generate_with_grouped_query_attention():
    """The demo model has 2 key/value heads for 4 query heads (the miniature 1 for 2): the query heads sharing a
    key/value head are grouped in `repeat_kv`'s order."""
    from helpers.demo_model import demo_model_and_images

    model, processor, images = demo_model_and_images("cpu")
    config = model.config.get_text_config()
    assert config.num_attention_heads // config.num_key_value_heads == 2 and config.num_key_value_heads > 1
    inputs = model_inputs(model, processor(images, max_tiles=6))
    pad = processor.pad_token_id
    free = _generate(model, inputs, -1, pad, 12, 12)
    stop = int(torch.mode(free.flatten()).values)
    expected = _generate(model, inputs, stop, pad, 12, 2)
    assert torch.equal(GreedyDecoder(model, stop, pad, 12, 2)(**inputs), expected)
    assert (expected == stop).any() and len(set(map(tuple, expected.tolist()))) > 1


def test_decoder_reused_across_batches(mini):
    """One decoder for batches of other sizes and prompt lengths (as eval sends them) gives each batch's
    `generate` tokens: buffers, positions and masks of the earlier batch leave nothing behind."""
    model, processor, images = mini
    decoder = GreedyDecoder(model, 486, processor.pad_token_id, 10, 2)
    sizes = []
    for chunk in (images[:4], images[4:5], images[2:5], images[:6]):
        inputs = model_inputs(model, processor(chunk, max_tiles=6))
        expected = _generate(model, inputs, 486, processor.pad_token_id, 10, 2)
        assert torch.equal(decoder(**inputs), expected)
        sizes.append((decoder.rows, decoder.length))
    assert sizes == sorted(sizes) and sizes[0] != sizes[-1]  # grown, never shrunk (a shorter prompt, more rows)


def test_captioner_engines_agree(mini):
    model, processor, images = mini
    batch = processor(images, max_tiles=6)
    settings = GenerationSettings(max_new_tokens=8, min_new_tokens=2)
    with Captioner(model, processor, settings) as static:
        assert static.engine == "static"
        captions = static(batch)
    with Captioner(model, processor, settings, engine="generate") as plain:
        assert plain(batch) == captions


def test_compiled_prompt_gives_the_eager_tokens():
    """The prompt's repeated blocks through torch.compile (vision layers, the LLM's norms, MLPs and rotary embedding)
    give the same tokens as eagerly, for batches of other sizes, tile counts and padding (recompiled with symbolic
    dimensions), without falling back to eager; one compiled function per class, shared by its layers."""
    import warnings

    from helpers.demo_model import demo_model_and_images

    model, processor, images = demo_model_and_images("cpu")
    pad = processor.pad_token_id
    compiled = GreedyDecoder(model, 5, pad, 10, 2, compile=True)
    eager = GreedyDecoder(model, 5, pad, 10, 2, compile=False)
    assert compiled.compiled and not eager.compiled
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback to eager warns
        for chunk in (images, images[1:4], images[:1] * 3):
            inputs = model_inputs(model, processor(chunk, max_tiles=6))
            assert torch.equal(compiled(**inputs), eager(**inputs))
    assert compiled.compiled
    from transformers.models.llama import modeling_llama

    rotary = modeling_llama.apply_rotary_pos_emb
    forwards = [(obj, f) for obj, name, f in compiled.compiled if name == "forward"]
    assert {type(m).__name__ for m, _ in forwards} == {"InternVLVisionLayer", "LlamaRMSNorm", "LlamaMLP"}
    assert len({id(f.__func__) for _, f in forwards}) == 3  # one compiled function per class
    assert [(obj, name) for obj, name, _ in compiled.compiled if name != "forward"] == [
        (modeling_llama, "apply_rotary_pos_emb")]
    with compiled.compiled_forwards():
        assert modeling_llama.apply_rotary_pos_emb is not rotary
    assert modeling_llama.apply_rotary_pos_emb is rotary  # put back
    assert not any("forward" in vars(m) for m in model.modules())  # the model is left as it was


def test_compile_past_the_recompile_limit_warns_and_stays_exact():
    """Past Dynamo's recompile limit the prompt is not silently run half-compiled: the decoder warns, drops
    compilation and gives the eager tokens."""
    import torch._dynamo

    from helpers.demo_model import demo_model_and_images

    model, processor, images = demo_model_and_images("cpu")
    pad = processor.pad_token_id
    compiled = GreedyDecoder(model, 5, pad, 6, 2, compile=True)
    eager = GreedyDecoder(model, 5, pad, 6, 2, compile=False)
    with torch._dynamo.config.patch(recompile_limit=1), pytest.warns(UserWarning, match="without torch.compile"):
        for chunk in (images[:2] * 5, images[2:5] * 3):  # shapes no other test compiles for
            inputs = model_inputs(model, processor(chunk, max_tiles=6))
            assert torch.equal(compiled(**inputs), eager(**inputs))
    assert not compiled.compiled


def test_overlapped_captions_in_order(mini):
    """`Captioner.overlapped` (the next batch started before the previous one's captions are given out) gives
    every item its own batch's captions, in order, items without a batch included."""
    model, processor, images = mini
    settings = GenerationSettings(max_new_tokens=6, min_new_tokens=2)
    items = [images[:3], None, images[3:4], images[4:], None]
    with Captioner(model, processor, settings) as captioner:
        expected = [captioner(processor(i, max_tiles=6)) if i is not None else [] for i in items]
        got = list(captioner.overlapped(items, lambda i: None if i is None else processor(i, max_tiles=6)))
    assert [item for item, _ in got] == items
    assert [captions for _, captions in got] == expected
    assert len({tuple(c) for c in expected if c}) == 3  # the batches' captions differ: a mix-up would show


def test_compile_choice():
    """--compile auto compiles only runs on a GPU long enough to repay the compilation (COMPILE_FROM_IMAGES)."""
    from captune.eval.generate import COMPILE_FROM_IMAGES, compile_choice

    gpu, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert compile_choice("auto", COMPILE_FROM_IMAGES - 1, gpu) is False
    assert compile_choice("auto", COMPILE_FROM_IMAGES, gpu) is True
    assert compile_choice("auto", 5000, gpu) is True  # the COCO test split on one GPU
    assert compile_choice("auto", COMPILE_FROM_IMAGES, cpu) is False
    assert compile_choice("on", 1, cpu) is True and compile_choice("off", 10**9, gpu) is False
    with pytest.raises(ValueError, match="auto, on or off"):
        compile_choice("yes", 1, gpu)


def test_overlapped_gives_out_what_is_done_before_an_error(mini):
    """An error while the next batch starts (out of memory, Ctrl-C) comes after the finished batch's captions."""
    model, processor, images = mini
    settings = GenerationSettings(max_new_tokens=4, min_new_tokens=2)

    def batch_of(item):
        if item == "bad":
            raise KeyboardInterrupt
        return processor(item, max_tiles=6)

    got = []
    with Captioner(model, processor, settings) as captioner, pytest.raises(KeyboardInterrupt):
        for item, captions in captioner.overlapped([images[:2], images[2:3], "bad", images[3:4]], batch_of):
            got.append((item, captions))
    assert [item for item, _ in got] == [images[:2], images[2:3]] and all(len(c) == len(i) for i, c in got)


def test_rope_limit_is_where_longrope_switches_factors():
    """Phi-3's longrope (InternVL2-4B) switches from short to long factors at original_max_position_embeddings,
    far below max_position_embeddings: the decoder's fixed frequencies hold only up to there."""
    from transformers import LlamaConfig, Phi3Config
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

    from captune.eval.greedy import _rope_limit

    half = 8  # head_dim 16
    phi3 = Phi3Config(hidden_size=64, num_attention_heads=4, max_position_embeddings=1024,
                      original_max_position_embeddings=256,
                      rope_scaling={"type": "longrope", "short_factor": [1.0] * half, "long_factor": [2.0] * half})
    assert _rope_limit(Phi3RotaryEmbedding(config=phi3)) == 256
    llama = LlamaConfig(hidden_size=64, num_attention_heads=4, max_position_embeddings=1024)
    assert _rope_limit(LlamaRotaryEmbedding(config=llama)) == 1024
