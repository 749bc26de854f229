"""The data-parallel processes of a run (one GPU each, or gloo processes on CPU).

Every process builds the same schedule holding the step's micro-batches of all processes,
trains micro-batches rank, rank + world, ... of each step, and the adapter gradients are summed
over the processes (one all-reduce) before the update: a step is the one-process step, split.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1

    @classmethod
    def current(cls) -> Ranks:
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    def mine(self, micro: list[T]) -> list[T]:
        return micro[self.rank :: self.world]

    def sum_grads(self, params: list[torch.nn.Parameter]) -> None:
        """One all-reduce of every adapter gradient (a process without a micro-batch in the
        step adds zeros)."""
        if self.world < 2:
            return
        grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        offset = 0
        for param, grad in zip(params, grads, strict=True):
            param.grad = flat[offset : offset + grad.numel()].view_as(param)
            offset += grad.numel()

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(value)
        return value

    def gather(self, value: Any) -> list[Any]:
        """Every process's `value` (in rank order), on every process."""
        if self.world < 2:
            return [value]
        values: list[Any] = [None] * self.world
        dist.all_gather_object(values, value)
        return values

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


class StopVote:
    """Agreement on a stop request (SIGTERM may reach the processes at different steps): one
    process alone checks its flag after each step; several sum their flags without waiting
    (an asynchronous all-reduce) and read the sum one step later, so every process stops
    after the same step and the host never waits for the step it just queued."""

    def __init__(self, ranks: Ranks, device: torch.device) -> None:
        self.ranks, self.device = ranks, device
        self.pending: tuple[torch.Tensor, Any] | None = None

    def should_stop(self, requested: bool, last_step: bool) -> bool:
        if self.ranks.world < 2:
            return requested
        agreed = False
        if self.pending is not None:
            flag, work = self.pending
            work.wait()
            agreed = bool(flag.item())
        flag = torch.tensor([int(requested)], device=self.device)
        if last_step:  # nothing left to read it after: agree on it now
            dist.all_reduce(flag)
            self.pending = None
            return agreed or bool(flag.item())
        self.pending = (flag, dist.all_reduce(flag, async_op=True))
        return agreed
