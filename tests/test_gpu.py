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


def test_compiled_training_step_equals_eager(tmp_path):
    """`--compile` (LLM for rows padded to the token budget, vision tower for any tile count) gives the loss
    and LoRA gradients of the eager model on unpadded rows. In bf16 under autocast, as training runs on a GPU
    (FlexAttention's float32 backward kernels do not fit an H100's shared memory); tests/test_train.py checks
    the compiled path in float32 on the CPU."""
    from helpers import packed_setup as tp

    from captune.data.table import SampleTable
    from captune.train.collate import collate_shared
    from captune.train.dataset import CaptionDataset, group_samples
    from captune.train.loss import compile_model

    samples, processor, peft = tp.build_setup(tmp_path)
    for p in peft.parameters():
        if not p.requires_grad:
            p.data = p.data.bfloat16()
    peft.cuda()
    table = SampleTable.of(samples)
    groups = group_samples(table, share=True)
    items = [CaptionDataset(table, groups, processor, 6, 4096)[g] for g in range(len(groups))]
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
