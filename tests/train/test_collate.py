"""Shared-prefix packing gives exactly the loss and LoRA gradients of separate samples (float32, CPU)."""

from __future__ import annotations

import pytest
import torch
from helpers.packed_setup import build_setup, image_items, loss_and_grads, rel

from captune.data.table import SampleTable
from captune.inputs.tiling import normalize
from captune.train.collate import PrefixSharing, collate_separate, collate_shared
from captune.train.dataset import CaptionDataset, group_samples, should_share
from captune.train.loss import CaptionLoss


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return build_setup(tmp_path_factory.mktemp("pack"))


@pytest.mark.parametrize("budget", [10_000, 120], ids=["one-row", "several-rows"])
def test_shared_prefix_equals_separate_samples(setup, budget):
    samples, processor, peft = setup
    table = SampleTable.of(samples)
    singles = CaptionDataset(table, group_samples(table, share=False), processor, 6, 4096)
    separate = collate_separate([singles[i] for i in range(len(samples))], processor.pad_token_id)
    groups = group_samples(table, share=True)
    assert sorted(groups.sizes.tolist()) == [2, 3, 4]
    dataset = CaptionDataset(table, groups, processor, 6, 4096)
    shared = collate_shared([dataset[g] for g in range(len(groups))], processor.pad_token_id, budget)
    assert shared.num_captions == separate.num_captions == len(samples)
    assert shared.num_tokens == separate.num_tokens
    assert shared.input_ids.numel() < separate.input_ids.numel()  # the point of it
    if budget == 10_000:
        assert shared.input_ids.shape[0] == 1  # all three images packed in one row
    else:
        assert shared.input_ids.shape[0] > 1

    loss_a, grads_a = loss_and_grads(peft, separate)
    loss_b, grads_b = loss_and_grads(peft, shared)
    assert rel(loss_b, loss_a) < 1e-5
    assert grads_a.keys() == grads_b.keys()
    assert any("vision_tower" in n for n in grads_a) and any("language_model" in n for n in grads_a)
    for name in grads_a:
        assert rel(grads_b[name], grads_a[name]) < 1e-5, name


def test_mask_lets_captions_see_their_prompt_only():
    # one row: group 0 = prefix(2) + branch 1 (2) + branch 2 (1); group 1 = prefix (1) + branch 1 (1); 1 pad
    doc = torch.tensor([[0, 0, 0, 0, 0, 1, 1, -1]])
    branch = torch.tensor([[0, 0, 1, 1, 2, 0, 1, 0]])
    mask = PrefixSharing(doc, branch).dense()[0, 0].int()
    expected = torch.tensor([
        [1, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0],
        [1, 1, 0, 0, 1, 0, 0, 0],  # branch 2 does not see branch 1
        [0, 0, 0, 0, 0, 1, 0, 0],  # the next image does not see the previous one
        [0, 0, 0, 0, 0, 1, 1, 0],
        [0, 0, 0, 0, 0, 0, 0, 1],  # padding sees itself only
    ])
    assert torch.equal(mask, expected)


def test_flex_block_mask_forward_equals_dense(setup):
    """FlexAttention with the BlockMask computes what SDPA computes with the dense mask (forward, CPU)."""
    samples, processor, peft = setup
    table = SampleTable.of(samples)
    groups = group_samples(table, share=True)
    dataset = CaptionDataset(table, groups, processor, 6, 4096)
    batch = collate_shared([dataset[g] for g in range(len(groups))], processor.pad_token_id, 10_000)
    net = CaptionLoss(peft).net
    with torch.no_grad():
        dense = net.model(input_ids=batch.input_ids, pixel_values=normalize(batch.pixel_values),
                          position_ids=batch.position_ids,
                          attention_mask=batch.attention_mask.dense()).last_hidden_state
        net.model.language_model.set_attn_implementation("flex_attention")
        try:
            flex = net.model(input_ids=batch.input_ids, pixel_values=normalize(batch.pixel_values),
                             position_ids=batch.position_ids,
                             attention_mask=batch.attention_mask.block_mask()).last_hidden_state
        finally:
            net.model.language_model.set_attn_implementation("sdpa")
    keep = batch.attention_mask.doc >= 0
    assert rel(flex[keep], dense[keep]) < 1e-5


def test_only_rows_padded_to_the_budget_have_one_shape(setup):
    """Rows padded to the token budget (the compiled model's) are marked static, on the way to the device too: only
    for them is the block mask builder compiled (once), since compiling it takes minutes for every new length."""
    samples, processor, _ = setup
    items = image_items(samples, processor)
    padded = collate_shared(items, processor.pad_token_id, 4096, pad_to_budget=True)
    unpadded = collate_shared(items, processor.pad_token_id, 4096)
    assert padded.input_ids.shape[1] == 4096 and unpadded.input_ids.shape[1] < 4096
    assert padded.attention_mask.static and not unpadded.attention_mask.static
    assert padded.to(torch.device("cpu"), torch.float32).attention_mask.static


def test_auto_shares_only_repeated_images(setup):
    samples, _, _ = setup
    table, one = SampleTable.of(samples), SampleTable.of(samples[:1])
    assert should_share(table, "auto")
    assert not should_share(one, "auto")
    assert should_share(one, "on") and not should_share(table, "off")


def test_tiles_travel_as_uint8_and_arrive_as_the_processor_tiles_them(setup):
    """Workers hand over uint8 tiles (a quarter of the bytes); `TrainBatch.to` normalizes them into exactly the
    processor's pixel values, in the training dtype."""
    samples, processor, _ = setup
    items = image_items(samples, processor)
    batch = collate_shared(items, processor.pad_token_id, 10_000)
    assert batch.pixel_values.dtype == torch.uint8
    expected = torch.cat([processor.tile(item["image"], 6) for item in items])
    assert torch.equal(batch.to(torch.device("cpu"), torch.float32).pixel_values, expected)
    assert torch.equal(batch.to(torch.device("cpu"), torch.bfloat16).pixel_values, expected.to(torch.bfloat16))
