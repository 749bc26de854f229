"""The fast engine's steps and batches: which examples each optimizer step trains, and how a
micro-batch becomes one padding-free row (or a padded batch for the generic path)."""

from __future__ import annotations

import pytest
from fast_support import make_examples, make_plan, with_schedule

from qlc.trainer.fast.ranks import Ranks
from qlc.trainer.fast.schedule import label_count, pack, pad, step_schedule

torch = pytest.importorskip("torch")


def test_steps_are_counted_by_the_plan_and_cover_each_epoch_once() -> None:
    plan = make_plan(epochs=2.0, batch_size=4, grad_accum=3, group_by_length=False)
    schedule = plan.train.schedule
    steps = step_schedule(list(range(1, 51)), schedule, seed=1)
    assert len(steps) == schedule.total_steps(50) == 10  # 13 micro-batches -> 5 steps an epoch
    assert [len(step) for step in steps[:5]] == [3, 3, 3, 3, 1]
    first_epoch = [i for step in steps[:5] for mb in step for i in mb]
    assert sorted(first_epoch) == list(range(50))
    assert step_schedule(list(range(1, 51)), schedule, seed=1) == steps  # seeded
    assert step_schedule(list(range(1, 51)), schedule, seed=2) != steps


def test_length_grouping_puts_the_longest_example_first() -> None:
    plan = make_plan(epochs=1.0, batch_size=2, grad_accum=2)
    lengths = [(i * 37) % 101 + 1 for i in range(64)]
    steps = step_schedule(lengths, plan.train.schedule, seed=3)
    assert steps[0][0][0] == lengths.index(max(lengths))
    for step in steps:  # sorted within each mega-batch: micro-batches hold similar lengths
        flat = [lengths[i] for mb in step for i in mb]
        assert flat == sorted(flat, reverse=True) or len(step) < 2


def test_two_processes_split_the_one_process_steps() -> None:
    """examples_per_step kept: the 2-process schedule holds the same steps; each process
    trains every other micro-batch of a step."""
    one = make_plan(epochs=1.0, batch_size=2, examples_per_step=8).train.schedule
    two = one.for_world(2)
    assert (one.grad_accum, two.grad_accum) == (4, 2)
    lengths = list(range(3, 40))
    steps = step_schedule(lengths, one, seed=5)
    assert step_schedule(lengths, two, seed=5) == steps
    step = steps[0]
    mine = [Ranks(0, 2).mine(step), Ranks(1, 2).mine(step)]
    assert mine == [step[0::2], step[1::2]] and sorted(mine[0] + mine[1]) == sorted(step)


def test_pack_restarts_positions_and_shifts_targets_per_example() -> None:
    examples = [
        {"input_ids": [1, 5, 6], "labels": [-100, 5, 6]},
        {"input_ids": [1, 7], "labels": [1, 7]},
    ]
    batch = pack(examples, torch.device("cpu"))
    assert batch.input_ids.tolist() == [1, 5, 6, 1, 7]
    assert batch.position_ids.tolist() == [0, 1, 2, 0, 1]
    assert batch.targets.tolist() == [5, 6, -100, 7, -100]
    assert batch.cu_seqlens.tolist() == [0, 3, 5] and batch.cu_seqlens.dtype == torch.int32
    assert (batch.lengths, batch.max_len) == ([3, 2], 3)
    assert label_count(examples) == 3 == int((batch.targets != -100).sum())


def test_pad_masks_padding_and_shifts_targets() -> None:
    examples = [{"input_ids": [1, 5, 6], "labels": [-100, 5, 6]}, {"input_ids": [1, 7],
                "labels": [1, 7]}]  # fmt: skip
    batch = pad(examples, pad_id=0, device=torch.device("cpu"))
    assert batch.input_ids.tolist() == [[1, 5, 6], [1, 7, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch.targets.tolist() == [[5, 6, -100], [7, -100, -100]]


def test_label_count_matches_packed_targets() -> None:
    examples = make_examples(9, seed=2)
    batch = pack(examples, torch.device("cpu"))
    assert label_count(examples) == int((batch.targets != -100).sum()) > 0


def test_warmup_comes_from_the_plan() -> None:
    schedule = with_schedule(make_plan(), warmup_ratio=0.03).train.schedule
    assert schedule.warmup_for(250) == 8
