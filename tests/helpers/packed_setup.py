"""A tiny model with LoRA everywhere and three images with 4, 2 and 3 captions: the setting in which shared-prefix
batches are compared with separate samples (packing, gradient checkpointing and GPU tests)."""

from __future__ import annotations

import torch
from PIL import Image, ImageDraw

import captune
from captune.data.samples import Sample
from captune.data.table import SampleTable
from captune.demo.tinymodel import (
    build_compact_tokenizer,
    tokenizer_corpus,
    write_tiny_model,
)
from captune.internvl.lora import add_lora
from captune.train.dataset import CaptionDataset, group_samples
from captune.train.loss import CaptionLoss

CAPTIONS = [
    ["a red circle", "one red round shape on white", "a red disc", "red circle on a white background, centred"],
    ["a blue square on white", "a square that is blue"],
    ["green", "a green shape", "a green square on a white background with nothing else in it"],
]


def build_setup(root):
    """Three images with 4, 2 and 3 captions, a tiny model with LoRA everywhere (non-zero B matrices)."""
    samples = []
    colours = [(220, 30, 30), (30, 30, 220), (30, 170, 30)]
    for i, (colour, captions) in enumerate(zip(colours, CAPTIONS)):
        im = Image.new("RGB", (200, 150 + 60 * i), (250, 250, 250))
        ImageDraw.Draw(im).ellipse([40, 30, 150, 120], fill=colour)
        path = root / f"{i}.jpg"
        im.save(path)
        for c in captions:
            samples.append(Sample(path, ({"from": "human", "value": "<image>\n" + captune.DEFAULT_QUESTION},
                                         {"from": "gpt", "value": c})))
    samples = samples[::2] + samples[1::2]  # interleave: groups are found by image, not by position
    words = [c for cs in CAPTIONS for c in cs]
    tokenizer = build_compact_tokenizer(tokenizer_corpus(words, [captune.DEFAULT_QUESTION]))
    model_dir = write_tiny_model(root / "model", tokenizer)
    model, processor = captune.load(model_dir, dtype="fp32")
    peft = add_lora(model, rank=4, alpha=8, dropout=0.0, vision=True, train_projector=True)
    torch.manual_seed(0)
    for name, p in peft.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.05)  # non-zero, so that the A matrices get gradients too
    return samples, processor, peft


def image_items(samples, processor) -> list[dict]:
    """One training item per image (its captions sharing the prompt), as the training dataset makes them."""
    table = SampleTable.of(samples)
    groups = group_samples(table, share=True)
    dataset = CaptionDataset(table, groups, processor, 6, 4096)
    return [dataset[g] for g in range(len(groups))]


def loss_and_grads(peft, batch):
    peft.zero_grad(set_to_none=True)
    loss = CaptionLoss(peft)(batch.input_ids, batch.targets, batch.attention_mask, batch.position_ids,
                             batch.pixel_values)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in peft.named_parameters() if p.requires_grad}
    return loss.detach(), grads


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
