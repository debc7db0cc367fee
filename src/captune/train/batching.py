"""Training batches: tokenized (image, conversation) samples, the order they are seen in, and how they are
collated into micro-batches.

A micro-batch is a `TrainBatch`; the loop only needs its tensors, its `targets` (the token each position must
predict, -100 where none) and its counts, so other layouts (several captions sharing one image prefix, see
`packing.py`) plug in by producing the same structure.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch.utils.data import Dataset

from captune.data.samples import Sample
from captune.errors import CaptuneError
from captune.inputs.templates import IGNORE_INDEX, encode_conversation
from captune.inputs.tiling import blank_image, load_image


@dataclass
class TrainBatch:
    input_ids: torch.Tensor  # [B, T]
    targets: torch.Tensor  # [B, T]: the id predicted at each position (labels shifted left), -100 = no loss
    attention_mask: Any  # [B, T] padding mask, or a [B, 1, T, T] / BlockMask mask for shared prefixes
    position_ids: torch.Tensor  # [B, T]
    pixel_values: torch.Tensor  # [tiles, 3, S, S]
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
            if isinstance(v, torch.Tensor):
                v = v.to(device, dtype=dtype if v.is_floating_point() else None, non_blocking=True)
            elif hasattr(v, "to") and not isinstance(v, int):
                v = v.to(device)
            moved[f.name] = v
        return TrainBatch(**moved)


class CaptionTrainDataset(Dataset):
    """One tokenized training sample per item; an image that fails to load becomes an error item, never a crash."""

    def __init__(self, samples: list[Sample], processor, max_tiles: int, max_seq_length: int):
        self.samples, self.processor = samples, processor
        self.max_tiles, self.max_seq_length = max_tiles, max_seq_length

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        try:
            image = load_image(self.samples[i].image)
        except CaptuneError as e:
            return {"error": str(e), "index": i}
        return self._item(i, image)

    def stand_in(self) -> dict:
        """The first sample with a blank one-tile image: trained with weight zero where a whole micro-batch
        failed to load, so that every process still runs the same collectives."""
        return self._item(0, blank_image(self.processor.tile_size))

    def _item(self, i: int, image) -> dict:
        sample = self.samples[i]
        pixel_values = self.processor.tile(image, self.max_tiles)
        n_image_tokens = pixel_values.shape[0] * self.processor.tokens_per_tile
        try:
            encoded = encode_conversation(self.processor.tokenizer, list(sample.conversations), n_image_tokens,
                                          self.processor.template, max_length=self.max_seq_length)
        except CaptuneError as e:
            return {"error": f"{sample.image}: {e}", "index": i}
        return {"input_ids": encoded["input_ids"], "labels": encoded["labels"], "pixel_values": pixel_values,
                "image": str(sample.image), "index": i}


def shift_labels(labels: list[int]) -> list[int]:
    """Position t predicts token t+1: the targets are the labels moved one to the left."""
    return labels[1:] + [IGNORE_INDEX]


def collate_separate(items: list[dict], pad_token_id: int) -> TrainBatch | None:
    """One caption per row, right-padded (the tutorial's layout)."""
    items = [it for it in items if "error" not in it]
    if not items:
        return None
    length = max(len(it["input_ids"]) for it in items)
    input_ids = torch.full((len(items), length), pad_token_id, dtype=torch.long)
    targets = torch.full((len(items), length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(items), length), dtype=torch.long)
    for row, it in enumerate(items):
        n = len(it["input_ids"])
        input_ids[row, :n] = torch.tensor(it["input_ids"])
        targets[row, :n] = torch.tensor(shift_labels(it["labels"]))
        mask[row, :n] = 1
    position_ids = torch.arange(length).expand(len(items), length).clone()
    return TrainBatch(
        input_ids=input_ids, targets=targets, attention_mask=mask, position_ids=position_ids,
        pixel_values=torch.cat([it["pixel_values"] for it in items]),
        num_captions=len(items), num_tokens=int((targets != IGNORE_INDEX).sum()),
    )


def epoch_order(lengths: list[int], batch_size: int, seed: int, epoch: int, group_by_length: bool) -> list[int]:
    """A shuffled order of sample indices; with `group_by_length`, each run of up to 50 micro-batches is sorted
    by length (longest first) so a micro-batch holds samples of similar length, as HF Trainer's grouping does
    (fewer micro-batches per run for small data sets, as there)."""
    rng = random.Random(seed + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if not group_by_length:
        return order
    mega = batch_size * max(1, min(len(lengths) // (batch_size * 4), 50))
    grouped: list[int] = []
    for start in range(0, len(order), mega):
        grouped += sorted(order[start : start + mega], key=lambda i: -lengths[i])
    return grouped


class Schedule:
    """Which units each process reads at each optimizer step, for any number of epochs.

    A unit is one caption sample, or, when sharing prefixes, one image group (an image and all its captions).
    Without sharing, a step is `global_batch_size` captions in micro-batches of `per_device_batch_size`; with
    sharing, a step is whole images up to `global_batch_size` captions, each process packing its images into
    micro-batches of at most `token_budget` tokens. Either way a step's units do not depend on the number of
    processes, so neither does its loss.
    """

    def __init__(self, lengths: list[int], captions: list[int], config, world_size: int, shared: bool):
        self.lengths, self.captions, self.config, self.world, self.shared = lengths, captions, config, world_size, shared
        if not shared:
            per_step = config.per_device_batch_size * world_size
            if config.global_batch_size % per_step:
                raise CaptuneError(f"--global-batch-size {config.global_batch_size} is not a multiple of "
                                   f"--per-device-batch-size x processes = {per_step}")
        self.accumulation = max(1, config.global_batch_size // (config.per_device_batch_size * world_size))
        self.steps_per_epoch = len(self._epoch_steps(0))
        if self.steps_per_epoch == 0:
            raise CaptuneError(f"only {sum(captions)} training captions: fewer than one global batch "
                               f"({config.global_batch_size}); lower --global-batch-size")
        self.total_steps = (config.max_steps if config.max_steps > 0
                            else math.ceil(config.epochs * self.steps_per_epoch))
        self._cache: dict[int, list[list[list[list[int]]]]] = {}

    def _epoch_steps(self, epoch: int) -> list[list[int]]:
        """The units of each step of an epoch."""
        order = epoch_order(self.lengths, self.config.per_device_batch_size, self.config.seed, epoch,
                            self.config.group_by_length and not self.shared)
        steps, current, count = [], [], 0
        for unit in order:
            current.append(unit)
            count += self.captions[unit]
            if count >= self.config.global_batch_size:
                steps.append(current)
                current, count = [], 0
        return steps

    def _split(self, units: list[int]) -> list[list[list[int]]]:
        """Per process, its micro-batches of one step."""
        if not self.shared:
            size = self.config.per_device_batch_size
            batches = [units[i : i + size] for i in range(0, len(units), size)]
            return [batches[r :: self.world] for r in range(self.world)]
        if len(units) < self.world:
            raise CaptuneError(f"a step has fewer images than processes ({self.world}); raise --global-batch-size")
        batches, current, tokens = [], [], 0
        for unit in units:
            if current and tokens + self.lengths[unit] > self.config.token_budget:
                batches.append(current)
                current, tokens = [], 0
            current.append(unit)
            tokens += self.lengths[unit]
        batches.append(current)
        batches = self._equal_counts(batches, len(units))
        return [batches[r :: self.world] for r in range(self.world)]

    def _equal_counts(self, batches: list[list[int]], n_units: int) -> list[list[int]]:
        """Make the number of micro-batches a multiple of the number of processes: under FSDP every micro-batch
        is a collective, so all processes must run as many. Splits the fullest micro-batches (or, with too few
        images to split, merges the smallest neighbours, which may then exceed the token budget)."""
        world = self.world
        up = -(-len(batches) // world) * world
        size = lambda b: sum(self.lengths[u] for u in b)  # noqa: E731
        if up <= n_units:
            while len(batches) < up:
                i = max(range(len(batches)), key=lambda j: (len(batches[j]) > 1, size(batches[j])))
                b = batches[i]
                batches[i : i + 1] = [b[: len(b) // 2], b[len(b) // 2 :]]
        else:
            down = len(batches) // world * world
            while len(batches) > down:
                i = min(range(len(batches) - 1), key=lambda j: size(batches[j]) + size(batches[j + 1]))
                batches[i : i + 2] = [batches[i] + batches[i + 1]]
        return batches

    def plan(self, step: int) -> list[list[list[int]]]:
        epoch, k = divmod(step, self.steps_per_epoch)
        if epoch not in self._cache:
            self._cache = {epoch: [self._split(units) for units in self._epoch_steps(epoch)]}
        return self._cache[epoch][k]

    def micro_batches(self, rank: int, step: int) -> int:
        return len(self.plan(step)[rank])

    def for_rank(self, rank: int, start_step: int):
        """This process's micro-batches from `start_step` on, in the order the loop consumes them."""
        for step in range(start_step, self.total_steps):
            yield from self.plan(step)[rank]
