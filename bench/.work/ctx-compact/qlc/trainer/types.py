"""Values the trainer's parts hand each other: examples, the run's records, stop requests."""

from __future__ import annotations

import json
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict

from qlc.contract import PROGRESS_PREFIX, finite_or_none

IGNORE_INDEX = -100  # a label that carries no loss
PROGRESS_KEYS = ("step", "max_steps", "epoch", "loss", "lr", "grad_norm", "tokens_per_s",
                 "elapsed_s")  # fmt: skip


class Example(TypedDict):
    """A tokenized training example: labels are the input ids, IGNORE_INDEX where no loss."""

    input_ids: list[int]
    labels: list[int]


def label_tokens(example: Example) -> int:
    """Tokens that carry loss once shifted for next-token prediction (the first token is
    never predicted)."""
    return sum(label != IGNORE_INDEX for label in example["labels"][1:])


@dataclass(frozen=True)
class SampleRequest:
    """A greedy continuation of the held-out prompt, asked of an engine that must compute it
    before the model leaves the GPU (the streamed lean setting)."""

    prompt_ids: list[int]
    new_tokens: int
    stop_id: int | None


@dataclass
class TrainResult:
    """What an engine reports; both engines fill the same fields."""

    steps: int
    tokens_trained: int
    train_seconds: float
    eval_loss: float | None
    peak_memory_allocated: int | None = None
    peak_memory_reserved: int | None = None
    time_to_first_step_s: float | None = None
    sample_ids: list[int] | None = None
    observed: dict[str, Any] = field(default_factory=dict)  # qlc.trainer.observe

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_trained / max(self.train_seconds, 1e-9)


@dataclass
class Decisions:
    """Run-time decisions the plan left to a rule (the GPU present, free memory, a kernel that
    is missing): each one recorded with what was chosen and why, into the manifest."""

    entries: list[dict[str, Any]] = field(default_factory=list)
    echo: Callable[[str], None] | None = None

    def record(self, what: str, chosen: Any, why: str) -> None:
        self.entries.append({"what": what, "chosen": chosen, "why": why})
        if self.echo is not None:
            self.echo(f"qlc: {what}: {json.dumps(chosen)} ({why})")


@dataclass
class StopFlag:
    """Set by the SIGTERM/SIGINT handler; engines look at it between optimizer steps, save a
    complete checkpoint and stop (a preempted run resumes from it)."""

    signal_name: str | None = None

    @property
    def requested(self) -> bool:
        return self.signal_name is not None


class MetricsLog:
    """metrics.jsonl plus one `QLC_PROGRESS {json}` line per logging step on stdout (rank 0
    only). Both engines log through it, with the same keys at the same steps."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path, self.enabled, self.start = path, enabled, time.time()
        self.losses: list[float] = []
        self.listeners: list[Callable[[dict[str, Any]], None]] = []

    def __call__(self, record: dict[str, Any]) -> None:
        record = {k: finite_or_none(v) for k, v in record.items()}
        record = {"elapsed_s": round(time.time() - self.start, 3), **record}
        if record.get("event", "train") == "train" and record.get("loss") is not None:
            self.losses.append(float(record["loss"]))
            if self.enabled:
                progress = {k: record.get(k) for k in PROGRESS_KEYS}
                print(PROGRESS_PREFIX + json.dumps(progress), flush=True)
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, sort_keys=True, allow_nan=False) + "\n")
        for listener in self.listeners:
            listener(record)

    def final_loss(self) -> float | None:
        """Mean training loss over the last 10% of logged steps (at least one)."""
        if not self.losses:
            return None
        tail = self.losses[-max(1, len(self.losses) // 10) :]
        return sum(tail) / len(tail)


def peak_memory_bytes() -> int:
    """torch's peak reserved GPU memory, or this process's peak resident memory on CPU."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        return int(torch.cuda.max_memory_reserved())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
