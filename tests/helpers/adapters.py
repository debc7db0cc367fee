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


def plant_wrong_merge(monkeypatch, error: str, skipped: str, swapped: tuple[str, str]) -> None:
    """A wrong merge: a wrong scale ("wrong_scale": the arithmetic, in every layer), the LoRA delta of weight `skipped`
    left out ("skipped_delta": the writer), or the two weights `swapped` exchanged on the way to the internvl layout
    ("swapped_k_v": a wrong q/k/v fusion)."""
    import copy

    import captune.merge.merge as m

    if error == "wrong_scale":
        monkeypatch.setattr(m.Adapter, "scale", lambda self, a: 1.5)  # alpha / r is 2
    elif error == "skipped_delta":
        real_shard = m.merged_shard

        def skipping(ckpt, shard, keymap, adapter, dtype):
            adapter = copy.copy(adapter)
            adapter.lora = {k: v for k, v in adapter.lora.items() if k != skipped}
            return real_shard(ckpt, shard, keymap, adapter, dtype)

        monkeypatch.setattr(m, "merged_shard", skipping)
    else:
        real_fuse = m.original_from_native
        rename = {swapped[0]: swapped[1], swapped[1]: swapped[0]}

        def swapping(pairs, keymap, pending, source):
            return real_fuse(((rename.get(k, k), t) for k, t in pairs), keymap, pending, source)

        monkeypatch.setattr(m, "original_from_native", swapping)
