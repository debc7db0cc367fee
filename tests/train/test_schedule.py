"""The training schedule: which captions (or image groups) each process reads at each step."""

from __future__ import annotations

import random

import pytest

from captune.train import config as cfg
from captune.train.schedule import Schedule


def settings(**overrides) -> cfg.TrainConfig:
    return cfg.resolve("internvl2_2b_coco_lora", {"model": "m", "data": "d", "out": "o", **overrides})


@pytest.mark.parametrize("world", [1, 2, 3, 8])
@pytest.mark.parametrize("budget", [8192, 3000])
def test_shared_steps_give_every_process_as_many_micro_batches(world, budget):
    """Under FSDP each micro-batch is a collective: unequal counts would hang. Every image group is read once
    per epoch, whatever the number of processes."""
    rng = random.Random(world)
    lengths = [rng.choice([1900, 1400, 900, 2600]) for _ in range(400)]
    captions = [5] * len(lengths)
    config = settings(global_batch_size=120, token_budget=budget)
    schedule = Schedule(lengths, captions, config, world, shared=True)
    seen = []
    for step in range(schedule.steps_per_epoch):
        plan = schedule.plan(step)
        assert len({len(p) for p in plan}) == 1, [len(p) for p in plan]
        for per_rank in plan:
            for micro in per_rank:
                assert micro
                assert len(micro) == 1 or sum(lengths[u] for u in micro) <= budget
                seen += micro
    assert sorted(seen) == sorted(set(seen)) and len(seen) == 24 * schedule.steps_per_epoch


def test_too_few_groups_to_split_are_merged():
    """Three single-image micro-batches on two processes: two of them become one (over the budget)."""
    config = settings(global_batch_size=15, token_budget=2000)
    schedule = Schedule([1900, 1900, 1000], [5, 5, 5], config, 2, shared=True)
    plan = schedule.plan(0)
    assert [len(p) for p in plan] == [1, 1]
    assert sorted(u for p in plan for m in p for u in m) == [0, 1, 2]


def test_units_of_a_step_do_not_depend_on_the_number_of_processes():
    lengths = [1900] * 200
    one = Schedule(lengths, [5] * 200, settings(global_batch_size=100), 1, shared=True)
    four = Schedule(lengths, [5] * 200, settings(global_batch_size=100), 4, shared=True)
    for step in range(one.steps_per_epoch):
        units = lambda plan: sorted(u for p in plan for m in p for u in m)
        assert units(one.plan(step)) == units(four.plan(step))
