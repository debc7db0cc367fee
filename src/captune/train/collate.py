"""Collation: a list of encoded image groups becomes one `TrainBatch`, one caption per row (the tutorial's layout) or
with shared prefixes: each image (and its question) once, all of its captions attending to it.

COCO has five captions per image, and with 6 tiles + thumbnail the prompt is ~1,850 tokens in front of a
~15-token caption. The vision tower is frozen and there is no augmentation, so the prompt is identical for
the five captions: computing it once and letting each caption attend to it gives exactly the loss and
gradients of five separate samples, for about a fifth of the work.

One packed row holds several image groups (up to a token budget):

    [ prompt of image A minus its last token | last + caption A1 | last + caption A2 | ... | prompt of B ... ]

Every caption is a branch that sees its group's prompt and its own earlier tokens, never another caption.
Its positions continue from the end of the prompt, as in a separate sample. The prompt's last token is
repeated at the head of each branch: in a separate sample that position predicts the caption's first token,
so each branch needs its own copy (same token, same position, same attention, so the same hidden state).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch

from captune.inputs.templates import IGNORE_INDEX, supervised_span
from captune.inputs.tiling import normalize


@dataclass
class TrainBatch:
    input_ids: torch.Tensor  # [B, T]
    targets: torch.Tensor  # [B, T]: the id predicted at each position (labels shifted left), -100 = no loss
    attention_mask: Any  # [B, T] padding mask, or a [B, 1, T, T] / BlockMask mask for shared prefixes
    position_ids: torch.Tensor  # [B, T]
    pixel_values: torch.Tensor  # [tiles, 3, S, S] uint8 as tiled (normalized by `to`), or already normalized
    num_captions: int
    num_tokens: int  # supervised positions

    @property
    def num_real_tokens(self) -> int:
        """Tokens that are not padding."""
        mask = self.attention_mask
        return int((mask.doc >= 0).sum()) if hasattr(mask, "doc") else int(mask.sum())

    def to(self, device: torch.device, dtype: torch.dtype) -> TrainBatch:
        moved = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "pixel_values":  # uint8 from the workers: a quarter of the bytes to share and to copy
                v = normalize(v.to(device, non_blocking=True)).to(dtype)
            elif isinstance(v, torch.Tensor):
                v = v.to(device, dtype=dtype if v.is_floating_point() else None, non_blocking=True)
            elif hasattr(v, "to") and not isinstance(v, int):
                v = v.to(device)
            moved[f.name] = v
        return TrainBatch(**moved)


def shift_labels(labels: list[int]) -> list[int]:
    """Position t predicts token t+1: the targets are the labels moved one to the left."""
    return labels[1:] + [IGNORE_INDEX]


def collate_separate(items: list[dict], pad_token_id: int) -> TrainBatch | None:
    """One caption per row, right-padded (the tutorial's layout)."""
    rows = [(enc, it["pixel_values"]) for it in items if "error" not in it for enc in it["encodings"]]
    if not rows:
        return None
    length = max(len(enc["input_ids"]) for enc, _ in rows)
    input_ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)  # [B, T]
    targets = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)  # [B, T]
    mask = torch.zeros((len(rows), length), dtype=torch.long)  # [B, T]
    for row, (enc, _) in enumerate(rows):
        n = len(enc["input_ids"])
        input_ids[row, :n] = torch.tensor(enc["input_ids"])
        targets[row, :n] = torch.tensor(shift_labels(enc["labels"]))
        mask[row, :n] = 1
    position_ids = torch.arange(length).expand(len(rows), length).clone()
    return TrainBatch(
        input_ids=input_ids, targets=targets, attention_mask=mask, position_ids=position_ids,
        pixel_values=torch.cat([pixels for _, pixels in rows]),  # [tiles, 3, S, S]
        num_captions=len(rows), num_tokens=int((targets != IGNORE_INDEX).sum()),
    )


@dataclass
class Branch:
    input_ids: list[int]
    targets: list[int]


@dataclass
class PackedGroup:
    """A group tokenized for packing: the shared prefix, then one branch per caption."""

    prefix: list[int]
    branches: list[Branch]

    @property
    def length(self) -> int:
        return len(self.prefix) + sum(len(b.input_ids) for b in self.branches)


def split_prefix(encodings: list[dict[str, list[int]]]) -> PackedGroup | None:
    """Cut each encoded sample at its first supervised token; None when the prompts are not identical."""
    heads, branches = [], []
    for enc in encodings:
        ids, labels = enc["input_ids"], enc["labels"]
        span = supervised_span(labels)
        if span is None or span[0] == 0:
            continue  # no loss in this sample (as the original's tokenization-mismatch samples)
        first, last = span
        heads.append(ids[: first - 1])
        # branch = [last prompt token, caption tokens...]; position t predicts labels[t + 1]
        branches.append(Branch(ids[first - 1 : last], labels[first : last + 1]))
    if not branches or any(h != heads[0] for h in heads):
        return None
    return PackedGroup(heads[0], branches)


@dataclass
class PrefixSharing:
    """Per-token ids from which the attention mask is built on the device: `doc` (which group of the row, -1 for
    padding) and `branch` (0 for a group's shared prefix, k for its k-th caption); `static` when the rows are padded
    to the token budget, so that every micro-batch's rows have the same length."""

    doc: torch.Tensor  # [B, T]
    branch: torch.Tensor  # [B, T]
    static: bool = False

    def to(self, device) -> PrefixSharing:
        return PrefixSharing(self.doc.to(device, non_blocking=True), self.branch.to(device, non_blocking=True),
                             self.static)

    def dense(self) -> torch.Tensor:
        """[B, 1, T, T] boolean mask (True = may attend), for SDPA: the plain path, which also runs on the CPU."""
        doc, branch = self.doc, self.branch
        t = doc.shape[1]
        causal = torch.ones(t, t, dtype=torch.bool, device=doc.device).tril()
        same_doc = doc[:, :, None] == doc[:, None, :]
        visible = (branch[:, None, :] == 0) | (branch[:, :, None] == branch[:, None, :])
        return (causal & same_doc & visible)[:, None]

    def block_mask(self):
        """The same mask as a FlexAttention BlockMask: whole blocks outside the groups are skipped."""
        from torch.nn.attention.flex_attention import create_block_mask

        doc, branch = self.doc, self.branch

        def mask_mod(b, h, q, k):
            return (doc[b, q] == doc[b, k]) & (k <= q) & ((branch[b, k] == 0) | (branch[b, k] == branch[b, q]))

        b, t = doc.shape
        # Compiled only for rows padded to the budget (the compiled model's; one length, so compiled once): on torch
        # 2.11 compiling the builder for one length took over 4 minutes, and new lengths compile it again; eagerly it
        # takes ~12 ms for 16k tokens on an H200 (docs/benchmarks.md).
        return create_block_mask(mask_mod, B=b, H=None, Q_LEN=t, KV_LEN=t, device=doc.device,
                                 _compile=doc.is_cuda and self.static)


def pack(groups: list[PackedGroup], token_budget: int) -> list[list[int]]:
    """Rows of group indices, first fit in order, each row at most `token_budget` tokens (a longer group alone)."""
    rows: list[list[int]] = []
    sizes: list[int] = []
    for i, g in enumerate(groups):
        for r, size in enumerate(sizes):
            if size + g.length <= token_budget:
                rows[r].append(i)
                sizes[r] += g.length
                break
        else:
            rows.append([i])
            sizes.append(g.length)
    return rows


def collate_shared(items: list[dict], pad_token_id: int, token_budget: int, pad_to_budget: bool = False):
    """Pack image groups into rows; returns a TrainBatch whose attention mask is a PrefixSharing.

    `pad_to_budget` pads every row to `token_budget` tokens: one shape for a compiled model (no recompilation).
    """
    packed, pixel_values = [], []
    for it in items:
        if "error" in it:
            continue
        group = split_prefix(it["encodings"])
        # prompts that differ after tokenization: each caption becomes a group of its own
        singles = [group] if group is not None else [split_prefix([e]) for e in it["encodings"]]
        for g in singles:
            if g is not None:
                packed.append(g)
                pixel_values.append(it["pixel_values"])
    if not packed:
        return None
    # rows keep the groups' order so that images and their <IMG_CONTEXT> tokens stay aligned
    rows = pack(packed, token_budget)
    order = [i for row in rows for i in row]
    length = max(sum(packed[i].length for i in row) for row in rows)
    if pad_to_budget:
        length = max(length, token_budget)
    shape = (len(rows), length)
    input_ids = torch.full(shape, pad_token_id, dtype=torch.long)
    targets = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    doc = torch.full(shape, -1, dtype=torch.long)
    branch = torch.zeros(shape, dtype=torch.long)
    for r, row in enumerate(rows):
        t = 0
        for d, gi in enumerate(row):
            g = packed[gi]
            n = len(g.prefix)
            input_ids[r, t : t + n] = torch.tensor(g.prefix)
            position_ids[r, t : t + n] = torch.arange(n)
            doc[r, t : t + n] = d
            t += n
            for k, br in enumerate(g.branches, start=1):
                m = len(br.input_ids)
                input_ids[r, t : t + m] = torch.tensor(br.input_ids)
                targets[r, t : t + m] = torch.tensor(br.targets)
                position_ids[r, t : t + m] = torch.arange(n, n + m)
                doc[r, t : t + m] = d
                branch[r, t : t + m] = k
                t += m
        # padding: its own "document" per position keeps every softmax row non-empty
        position_ids[r, t:] = 0
    num_captions = sum(len(g.branches) for g in packed)
    return TrainBatch(
        input_ids=input_ids, targets=targets, attention_mask=PrefixSharing(doc, branch, pad_to_budget),
        position_ids=position_ids,
        pixel_values=torch.cat([pixel_values[i] for i in order]), num_captions=num_captions,
        num_tokens=int((targets != IGNORE_INDEX).sum()),
    )


class Collate:
    """The DataLoader's collate_fn: (TrainBatch or None when no item loaded, the error items)."""

    def __init__(self, pad_token_id: int, shared: bool, token_budget: int, static: bool):
        self.pad_token_id, self.shared, self.token_budget, self.static = pad_token_id, shared, token_budget, static

    def __call__(self, items: list[dict]) -> tuple[TrainBatch | None, list[dict]]:
        errors = [it for it in items if "error" in it]
        if self.shared:
            return collate_shared(items, self.pad_token_id, self.token_budget, pad_to_budget=self.static), errors
        return collate_separate(items, self.pad_token_id), errors
