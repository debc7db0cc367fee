"""The order of training: which image groups each process reads at each optimizer step, for any number of epochs.

A step is `global_batch_size` captions. Without shared prefixes they come in micro-batches of
`per_device_batch_size` captions; with them, whole image groups are packed into micro-batches of at most
`token_budget` tokens, measured with the same counts as the collation (`dataset.unit_lengths`), so a micro-batch is
one packed row. A step's groups do not depend on the number of processes, so neither does its loss.
"""

from __future__ import annotations

import math
import random

from captune.errors import CaptuneError


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

    A unit is one caption sample, or, when sharing prefixes, one image group (an image and all its captions);
    `lengths` are their collated token counts, `captions` their caption counts.
    """

    def __init__(self, lengths, captions, config, world_size: int, shared: bool):
        # plain lists: indexed one unit at a time below, faster than numpy scalars
        self.lengths, self.captions = [int(x) for x in lengths], [int(x) for x in captions]
        self.config, self.world, self.shared = config, world_size, shared
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
        size = lambda b: sum(self.lengths[u] for u in b)
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
