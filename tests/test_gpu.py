"""GPU-only checks, run on the device machine (`pytest -m gpu`); they skip where there is no CUDA GPU."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_flex_attention_training_step_equals_dense_sdpa(tmp_path):
    """The FlexAttention path (BlockMask, with its backward) gives the loss and LoRA gradients of the plain
    SDPA path with the same mask as a dense tensor."""
    from helpers import packed_setup as tp

    from captune.data.table import SampleTable
    from captune.train.collate import collate_shared
    from captune.train.dataset import CaptionDataset, group_samples

    samples, processor, peft = tp.build_setup(tmp_path)
    peft.cuda()
    table = SampleTable.of(samples)
    groups = group_samples(table, share=True)
    dataset = CaptionDataset(table, groups, processor, 6, 4096)
    batch = collate_shared([dataset[g] for g in range(len(groups))], processor.pad_token_id, 10_000)
    batch = batch.to(torch.device("cuda"), torch.float32)
    lm = peft.base_model.model.model.language_model
    lm.set_attn_implementation("sdpa")
    loss_a, grads_a = tp.loss_and_grads(peft, batch)
    lm.set_attn_implementation("flex_attention")
    loss_b, grads_b = tp.loss_and_grads(peft, batch)
    lm.set_attn_implementation("sdpa")
    assert tp.rel(loss_b, loss_a) < 1e-4
    for name in grads_a:
        assert tp.rel(grads_b[name], grads_a[name]) < 1e-3, name


def test_block_mask_builder_compiled_only_for_padded_rows(tmp_path, monkeypatch):
    """Unpadded rows (training without --compile, FSDP) build their BlockMask eagerly; rows padded to the budget ask
    for the compiled builder (replaced here by the eager one: compiling it takes minutes)."""
    from helpers import packed_setup as tp
    from torch.nn.attention import flex_attention

    from captune.train.collate import collate_shared

    samples, processor, _ = tp.build_setup(tmp_path)
    items = tp.image_items(samples, processor)
    real, asked = flex_attention.create_block_mask, []

    def spy(*args, _compile=False, **kwargs):
        asked.append(_compile)
        return real(*args, _compile=False, **kwargs)

    monkeypatch.setattr(flex_attention, "create_block_mask", spy)
    cuda = torch.device("cuda")
    masks = [collate_shared(items, processor.pad_token_id, 4096, pad_to_budget=pad).to(cuda, torch.float32)
             .attention_mask.block_mask() for pad in (False, True)]
    assert asked == [False, True]
    assert masks[0].shape[-1] < masks[1].shape[-1] == 4096


def test_compiled_training_step_equals_eager(tmp_path):
    """`--compile` (LLM for rows padded to the token budget, vision tower for any tile count) gives the loss
    and LoRA gradients of the eager model on unpadded rows. In bf16 under autocast, as training runs on a GPU
    (FlexAttention's float32 backward kernels do not fit an H100's shared memory); tests/test_train.py checks
    the compiled path in float32 on the CPU."""
    from helpers import packed_setup as tp

    from captune.train.collate import collate_shared
    from captune.train.loss import compile_model

    samples, processor, peft = tp.build_setup(tmp_path)
    for p in peft.parameters():
        if not p.requires_grad:
            p.data = p.data.bfloat16()
    peft.cuda()
    items = tp.image_items(samples, processor)
    eager_batch = collate_shared(items, processor.pad_token_id, 4096).to(torch.device("cuda"), torch.bfloat16)
    padded = collate_shared(items, processor.pad_token_id, 4096, pad_to_budget=True).to(torch.device("cuda"),
                                                                                         torch.bfloat16)
    assert padded.input_ids.shape[1] == 4096 > eager_batch.input_ids.shape[1]
    peft.base_model.model.model.language_model.set_attn_implementation("flex_attention")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss_a, grads_a = tp.loss_and_grads(peft, eager_batch)
        compile_model(peft.base_model.model)
        loss_b, grads_b = tp.loss_and_grads(peft, padded)
    assert tp.rel(loss_b, loss_a) < 5e-3
    for name in grads_a:
        assert tp.rel(grads_b[name], grads_a[name]) < 5e-2, name


@pytest.mark.parametrize("device", ["cuda:0", "cuda:1"])
def test_graphed_decoder_equals_eager_and_generate(device):
    """On a GPU the decode step is one CUDA-graph replay and the prompt's repeated blocks compiled: the same tokens as
    both run eagerly, and in float32 the tokens of transformers' `generate` (left-padded rows of different tile
    counts; the most frequent token as stop, so that rows end at different steps), then the buffers reused for a
    smaller, shorter batch.
    Also on a GPU that is not the current one (the graph must be captured on the model's GPU)."""
    from helpers.demo_model import demo_model_and_images

    from captune.eval.generate import model_inputs
    from captune.eval.greedy import GreedyDecoder

    if torch.device(device).index >= torch.cuda.device_count():
        pytest.skip(f"needs {device}")
    model, processor, images = demo_model_and_images(device)
    pad = processor.pad_token_id
    inputs = model_inputs(model, processor(images, max_tiles=6))
    free = model.generate(**inputs, do_sample=False, max_new_tokens=12, min_new_tokens=12, pad_token_id=pad)
    stop = int(torch.mode(free[:, inputs["input_ids"].shape[1]:].flatten()).values)
    graphed = GreedyDecoder(model, stop, pad, 12, 2, compile=True)
    eager = GreedyDecoder(model, stop, pad, 12, 2, graphs=False)
    assert graphed.graphs and graphed.compiled
    for chunk in (images, images[1:4]):
        inputs = model_inputs(model, processor(chunk, max_tiles=6))
        assert not bool(inputs["attention_mask"].all())
        expected = model.generate(**inputs, do_sample=False, max_new_tokens=12, min_new_tokens=2, eos_token_id=stop,
                                  pad_token_id=pad)[:, inputs["input_ids"].shape[1]:]
        got = graphed(**inputs)
        assert graphed.graph is not None and graphed.compiled  # neither fell back
        assert torch.equal(got, eager(**inputs))
        assert torch.equal(got, expected)
        assert (expected == stop).any()  # rows stop: the stop token and the padding after it are checked


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_model_over_two_gpus_captions_as_on_one(tmp_path, capsys):
    """A model that fits one GPU, spread over two (`--gpus-per-model 2`: vision tower, embeddings and the first
    layers on cuda:0, the rest and the LM head on cuda:1), gives the captions of the one-GPU model: captune's
    batched path and transformers' `generate`, on left-padded batches of different tile counts, and the command."""
    from pathlib import Path

    import numpy as np

    import captune
    from captune.cli import main
    from captune.data.synthetic import random_scene, render_scene
    from captune.eval.generate import GenerationSettings, generate_ids
    from captune.internvl.placement import assign_gpus

    base = Path(captune.__file__).resolve().parent / "demo" / "assets" / "demo_base"
    rng = np.random.default_rng(5)
    images = [render_scene(random_scene(rng), (112 * (1 + i % 3), 112 * (1 + i % 2))) for i in range(12)]
    gpus = assign_gpus(base, 2, "cuda", batch_size=4, processes=1)
    assert set(gpus.device_map.values()) == {torch.device("cuda", 0), torch.device("cuda", 1)}
    one, processor = captune.load(base, dtype="bf16", device="cuda:0")
    two, _ = captune.load(base, dtype="bf16", device_map=gpus.device_map)
    assert two.device == torch.device("cuda", 0) and two.lm_head.weight.device == torch.device("cuda", 1)
    assert two.model.vision_tower.embeddings.patch_embeddings.projection.weight.device == torch.device("cuda", 0)
    settings = GenerationSettings(max_new_tokens=20, min_new_tokens=4)
    expected = captune.caption_images(one, processor, images, batch_size=4, settings=settings)
    assert captune.caption_images(two, processor, images, batch_size=4, settings=settings) == expected
    assert len(set(expected)) > 1
    batch = processor(images[:4], max_tiles=6)
    assert torch.equal(generate_ids(two, processor, batch, settings).cpu(),
                       generate_ids(one, processor, batch, settings).cpu())
    paths = [str(tmp_path / f"{i}.png") for i in range(4)]
    for image, path in zip(images, paths):
        image.save(path)
    printed = []
    for k in ("1", "2"):
        assert main(["caption", str(base), *paths, "--gpus-per-model", k, "--batch-size", "4"]) == 0
        printed.append(capsys.readouterr().out)
    assert printed[0] == printed[1] and len(printed[0].splitlines()) == 4
