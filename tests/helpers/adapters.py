"""LoRA adapters as `captune train` saves them, for the merge tests."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

import captune
from captune.internvl.lora import add_lora


def make_adapter(base: Path, folder: Path, image_token_id: int | None = None, rslora: bool = False,
                 projector: bool = True, rank: int = 4, b_scale: float = 0.1, seed: int | None = None) -> Path:
    """An adapter as `captune train` saves it, with random (non-zero) B matrices so that merging changes things.

    With `seed`, A is drawn from it too (N(0, 1/in_features)), for an adapter that is the same on every run."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, _ = captune.load(base, dtype="fp32", image_token_id=image_token_id)
    peft = add_lora(model, rank=rank, alpha=2 * rank, dropout=0.0, vision=True, train_projector=projector)
    g = torch.Generator().manual_seed(0 if seed is None else seed)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.copy_(b_scale * torch.randn(p.shape, generator=g))
            elif "lora_A" in name and seed is not None:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
            elif "modules_to_save" in name:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    config = peft.peft_config["default"]
    config.base_model_name_or_path = str(Path(base).resolve())
    config.use_rslora = rslora
    peft.save_pretrained(str(folder))
    return folder
