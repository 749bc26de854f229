"""The training loop: optimizer steps, logging, evaluation, checkpoints and stop requests."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from qlc.compiler.plan import Plan
from qlc.trainer.errors import Interrupted
from qlc.trainer.fast.checkpoint import (
    TrainingState,
    checkpoint_name,
    rng_state,
    save_checkpoint,
)
from qlc.trainer.fast.ranks import Ranks, StopVote
from qlc.trainer.fast.report import Reporter, StepProfiler
from qlc.trainer.fast.schedule import Steps, label_count
from qlc.trainer.observe import Observer
from qlc.trainer.types import Example, MetricsLog, StopFlag


class LossFn(Protocol):
    """The padding-free decoder's loss or the generic path's: summed over label tokens."""

    def loss_sum(self, examples: list[Example], device: torch.device) -> torch.Tensor: ...
    def train(self, flag: bool) -> None: ...
    def after_backward(self) -> None: ...
    def after_step(self) -> None: ...


@torch.no_grad()
def evaluate(
    loss_fn: LossFn, examples: list[Example], batch_size: int, device: torch.device
) -> float | None:
    """eval_loss (contract.EVAL_LOSS_DEFINITION): the token-weighted mean cross-entropy over
    every label token of the held-out examples, dropout off. None without examples."""
    if not examples:
        return None
    loss_fn.train(False)
    try:
        order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
        total = torch.zeros((), device=device, dtype=torch.float64)
        for start in range(0, len(order), batch_size):
            chunk = [examples[i] for i in order[start : start + batch_size]]
            total += loss_fn.loss_sum(chunk, device).double()
        return float(total.item()) / max(label_count(examples), 1)
    finally:
        loss_fn.train(True)


@dataclass
class Loop:
    """One run's loop over `steps` from `step` on."""

    plan: Plan
    loss_fn: LossFn
    state: TrainingState
    steps: Steps
    examples: list[Example]
    eval_examples: list[Example]
    device: torch.device
    ranks: Ranks
    log: MetricsLog
    stop: StopFlag
    out: Path
    plan_sha256: str
    profile_steps: int
    step: int = 0
    tokens: int = 0
    started: float = field(default_factory=time.perf_counter)
    first_step_s: float | None = None
    saved_at: int | None = None
    observer: Observer | None = None  # watches the first step's products (the manifest's)

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return [p for p in self.state.model.parameters() if p.requires_grad]

    def run(self) -> None:
        reporter = Reporter(self.device, self.log)
        profiler = StepProfiler(self.profile_steps, self.device, show=self.ranks.rank == 0)
        vote = StopVote(self.ranks, self.device)
        per_epoch = self.plan.schedule.steps_per_epoch(len(self.examples))
        self.loss_fn.train(True)
        for index in range(self.step, len(self.steps)):
            with self.observer.watch() if self.observer else contextlib.nullcontext():
                lr, grad_norm, step_loss, tokens = self._train_step(self.steps[index])
            self.step, self.tokens = index + 1, self.tokens + tokens
            reporter.add(step_loss, tokens)
            if self.first_step_s is None:
                _sync(self.device)
                self.first_step_s = time.perf_counter() - self.started
            profiler.after_step(self.step)
            if self.step % self.plan.schedule.logging_steps == 0 or self.step == len(self.steps):
                record = {"step": self.step, "max_steps": len(self.steps),
                          "epoch": self.step / per_epoch, "lr": lr}  # fmt: skip
                reporter.close_window(record, grad_norm)
            self._eval_and_save(reporter)
            if vote.should_stop(self.stop.requested, self.step == len(self.steps)):
                reporter.flush()
                self._interrupt()
        reporter.flush()

    def _train_step(
        self, micro_indices: list[list[int]]
    ) -> tuple[float, torch.Tensor, torch.Tensor, int]:
        """One optimizer step: (its learning rate, gradient norm, loss, tokens of all ranks)."""
        state = self.state
        micro = [[self.examples[i] for i in mb] for mb in micro_indices]
        n_targets = max(label_count([ex for mb in micro for ex in mb]), 1)
        step_loss = torch.zeros((), device=self.device)
        for batch in self.ranks.mine(micro):
            loss = self.loss_fn.loss_sum(batch, self.device) / n_targets
            torch.autograd.backward(state.scaler.scale(loss))
            self.loss_fn.after_backward()
            step_loss += loss.detach()
        params = self.params
        self.ranks.sum_grads(params)
        self.ranks.sum(step_loss)
        state.scaler.unscale(state.optimizer)
        grad_norm = _clip(params, self.plan.engine.optimizer.max_grad_norm)
        lr = float(state.scheduler.get_last_lr()[0])
        took = state.scaler.step(state.optimizer)
        self.loss_fn.after_step()
        if took:  # a step skipped on overflow leaves the schedule where it is, as Trainer does
            state.scheduler.step()
        state.optimizer.zero_grad(set_to_none=True)
        return lr, grad_norm, step_loss, sum(len(ex["input_ids"]) for mb in micro for ex in mb)

    def _eval_and_save(self, reporter: Reporter) -> None:
        schedule = self.plan.schedule
        if schedule.eval_steps and self.step % schedule.eval_steps == 0:
            reporter.flush()
            value = evaluate(self.loss_fn, self.eval_examples, schedule.batch_size, self.device)
            self.log({"event": "eval", "step": self.step, "eval_loss": value})
        saves = bool(schedule.save_steps) and self.step % (schedule.save_steps or 1) == 0
        if saves and self.step < len(self.steps):  # the finished adapter: the recipe saves it
            reporter.flush()
            self.save()

    def save(self) -> str:
        """A complete checkpoint of this step (rank 0 writes it); its name."""
        rng = self.ranks.gather(rng_state())
        name = checkpoint_name(self.step)
        if self.ranks.rank == 0:
            keep = self.plan.schedule.save_total_limit
            save_checkpoint(self.out, self.step, self.state, rng, self.plan_sha256, keep)
        self.ranks.barrier()
        self.saved_at = self.step
        return name

    def _interrupt(self) -> None:
        name = checkpoint_name(self.step) if self.saved_at == self.step else self.save()
        raise Interrupted(self.stop.signal_name or "SIGTERM", checkpoint=name)


def _clip(params: list[torch.nn.Parameter], max_norm: float | None) -> torch.Tensor:
    """The gradients' total norm before clipping (clipped to `max_norm` when it is set)."""
    if max_norm is None:
        grads = [p.grad for p in params if p.grad is not None]
        return torch.nn.utils.get_total_norm(grads, foreach=True)
    return torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
