"""The optimizer steps as lists of example indices, and one micro-batch as tensors.

Every process of a data-parallel run builds the same schedule: each step holds the
micro-batches of all processes (examples_per_step examples), as one process would accumulate
them; `Ranks.mine` picks a process's share.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qlc.compiler.plan import Schedule
from qlc.trainer.types import IGNORE_INDEX, Example

Steps = list[list[list[int]]]  # step -> micro-batches -> example indices


def length_grouped_order(lengths: list[int], group: int, generator: torch.Generator) -> list[int]:
    """transformers' get_length_grouped_indices: shuffled mega-batches sorted by length, the
    longest example first (an out-of-memory error shows at once, not hours in)."""
    mult = min(len(lengths) // (group * 4), 50) or 1
    indices = torch.randperm(len(lengths), generator=generator)
    size = mult * group
    megas = [indices[i : i + size].tolist() for i in range(0, len(lengths), size)]
    megas = [sorted(m, key=lambda i: lengths[i], reverse=True) for m in megas]
    longest = max(range(len(megas)), key=lambda k: lengths[megas[k][0]])
    megas[0][0], megas[longest][0] = megas[longest][0], megas[0][0]
    return [i for m in megas for i in m]


def step_schedule(lengths: list[int], schedule: Schedule, seed: int) -> Steps:
    """For every optimizer step, its micro-batches of example indices: seeded per epoch, so a
    resumed run rebuilds the same steps."""
    steps = schedule.total_steps(len(lengths))
    per_step = schedule.grad_accum * schedule.world_size  # micro-batches of all processes
    result: Steps = []
    epoch = 0
    while len(result) < steps:
        generator = torch.Generator().manual_seed(seed + epoch)
        if schedule.group_by_length:
            order = length_grouped_order(lengths, schedule.examples_per_step, generator)
        else:
            order = torch.randperm(len(lengths), generator=generator).tolist()
        bs = schedule.batch_size
        micro = [order[i : i + bs] for i in range(0, len(order), bs)]
        result += [micro[i : i + per_step] for i in range(0, len(micro), per_step)]
        epoch += 1
    return result[:steps]


def label_count(examples: list[Example]) -> int:
    """Label tokens once shifted for next-token prediction (what the loss is divided by)."""
    return sum(label != IGNORE_INDEX for ex in examples for label in ex["labels"][1:])


@dataclass
class Packed:
    """One padding-free micro-batch: every example's tokens in one row."""

    input_ids: torch.Tensor  # (T,)
    targets: torch.Tensor  # (T,) next-token labels, IGNORE_INDEX at each example's end
    position_ids: torch.Tensor  # (T,) restarting at 0 for every example
    cu_seqlens: torch.Tensor  # (N+1,) int32 offsets of the examples
    lengths: list[int]
    max_len: int


def pack(examples: list[Example], device: torch.device) -> Packed:
    ids: list[int] = []
    targets: list[int] = []
    positions: list[int] = []
    lengths: list[int] = []
    for ex in examples:
        n = len(ex["input_ids"])
        ids += ex["input_ids"]
        targets += [*ex["labels"][1:], IGNORE_INDEX]
        positions += range(n)
        lengths.append(n)
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    rows = _to_device(torch.tensor([ids, targets, positions], dtype=torch.long), device)
    cu = _to_device(torch.tensor(offsets, dtype=torch.int32), device)
    return Packed(rows[0], rows[1], rows[2], cu, lengths, max(lengths))


def _to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)  # no host stall on the copy


@dataclass
class Padded:
    """A right-padded batch for the model's own forward (the generic path)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    targets: torch.Tensor  # next-token labels, IGNORE_INDEX on padding and at each end


def pad(examples: list[Example], pad_id: int, device: torch.device) -> Padded:
    width = max(len(ex["input_ids"]) for ex in examples)
    ids, mask, targets = [], [], []
    for ex in examples:
        n, fill = len(ex["input_ids"]), width - len(ex["input_ids"])
        ids.append(ex["input_ids"] + [pad_id] * fill)
        mask.append([1] * n + [0] * fill)
        targets.append([*ex["labels"][1:], IGNORE_INDEX] + [IGNORE_INDEX] * fill)
    rows = torch.tensor([ids, mask, targets], dtype=torch.long).to(device)
    return Padded(rows[0], rows[1], rows[2])
