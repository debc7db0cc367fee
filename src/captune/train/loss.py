"""The training objective as one module (so DDP and FSDP see a single forward), and the ways it is made fast: compiling
the LLM and vision tower, gradient checkpointing without a backward through the frozen vision tower."""

from __future__ import annotations

import torch
from torch import nn

from captune.inputs.templates import IGNORE_INDEX
from captune.inputs.tiling import normalize
from captune.train import config as cfg
from captune.train.collate import PrefixSharing


def compile_model(net: nn.Module, static_rows: bool = True) -> None:
    """torch.compile the LLM (fuses norms, RoPE, SiLU, LoRA dropout and additions around the matmuls; 40% off its
    forward + backward on an H100) and the frozen vision tower for any tile count.

    `static_rows`: every row has the same length (shared prefixes padded to the token budget), so the LLM is
    compiled for that one shape; otherwise (one caption per row, any length) for dynamic shapes, as a static
    compile would recompile for each new row length.
    """
    net.model.language_model.compile(dynamic=not static_rows)
    # Automatic dynamic shapes: recompiled once the tile count changes, with only that dimension symbolic.
    # (dynamic=True also makes the image side symbolic, and inductor 2.11 then fails an assertion in its tiling.)
    net.model.vision_tower.compile(dynamic=None)


def enable_gradient_checkpointing(net: nn.Module) -> None:
    """Non-reentrant checkpointing of the decoder (and vision) layers.

    transformers also hooks every input embedding so that its output requires grad (which only reentrant
    checkpointing needs); on the vision tower's patch embedding that makes autograd run the whole frozen tower
    backward, ~20% of a step. The hooks are removed, and stay removed if checkpointing is turned off again.
    """
    net.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    net.disable_input_require_grads()


def should_compile(config: cfg.TrainConfig, device: torch.device, shared: bool, sharded: bool) -> bool:
    if config.compile != "auto":
        return config.compile == "on"
    # auto: the configuration measured on the GPU (LoRA on the LLM only); --compile on for the others
    return device.type == "cuda" and shared and not sharded and not config.lora_vision


class CaptionLoss(nn.Module):
    """The training objective as one module, so DDP and FSDP see a single forward.

    Returns the summed cross-entropy of the batch's supervised positions. With `full_logits=False` only those
    positions go through the LM head, in chunks: full-vocabulary logits for ~1,800 image tokens are never made.
    `pixel_values` may be uint8 tiles as the data loader gives them (normalized here) or normalized floats.
    """

    def __init__(self, model: nn.Module, full_logits: bool = False, chunk: int = 1024):
        super().__init__()
        self.model = model  # the PEFT-wrapped InternVLForConditionalGeneration
        self.full_logits = full_logits
        self.chunk = chunk

    @property
    def net(self):
        return self.model.base_model.model if hasattr(self.model, "base_model") else self.model

    def forward(self, input_ids, targets, attention_mask, position_ids, pixel_values,
                num_supervised: int | None = None) -> torch.Tensor:
        net = self.net
        if isinstance(attention_mask, PrefixSharing):
            flex = net.config.text_config._attn_implementation == "flex_attention"
            attention_mask = attention_mask.block_mask() if flex else attention_mask.dense()
        hidden = net.model(
            input_ids=input_ids, pixel_values=normalize(pixel_values), attention_mask=attention_mask,
            position_ids=position_ids
        ).last_hidden_state  # [B, T, D]
        if self.full_logits:
            logits = net.lm_head(hidden).float()  # [B, T, V]
            return nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum",
                                               ignore_index=IGNORE_INDEX)
        keep = (targets != IGNORE_INDEX).flatten()
        # with the count known on the host, no device-to-host sync: the backward is queued while the forward runs
        where = (keep.nonzero().squeeze(1) if num_supervised is None
                 else torch.nonzero_static(keep, size=num_supervised).squeeze(1))  # [N]
        h, y = hidden.flatten(0, 1).index_select(0, where), targets.flatten().index_select(0, where)  # [N, D], [N]
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, h.shape[0], self.chunk):  # h.shape[0] is N: known without a sync
            logits = net.lm_head(h[start : start + self.chunk]).float()  # [n, V]
            total = total + nn.functional.cross_entropy(logits, y[start : start + self.chunk], reduction="sum")
        return total
