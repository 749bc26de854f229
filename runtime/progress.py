"""Progress display for builds and runs: a rich bar on a terminal, plain lines otherwise.

The training script prints `QLC_PROGRESS {json}` once per logging step (keys: step,
max_steps, epoch, loss, lr, grad_norm, tokens_per_s, elapsed_s); everything else it prints
is passed through. Docker's legacy builder prints `Step N/M : INSTRUCTION` per step.
"""

from __future__ import annotations

import json
import math
import re
from types import TracebackType
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

PROGRESS_PREFIX = "QLC_PROGRESS "
BUILD_STEP = re.compile(r"^Step (\d+)/(\d+) : (.*)$")


def parse_progress(line: str) -> dict[str, Any] | None:
    """The JSON of a `QLC_PROGRESS {...}` line, or None for any other (or malformed) line."""
    if not line.startswith(PROGRESS_PREFIX):
        return None
    try:
        data = json.loads(line[len(PROGRESS_PREFIX) :])
    except json.JSONDecodeError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("step"), int):
        return None
    return data


def eta_seconds(event: dict[str, Any]) -> float | None:
    step, total, elapsed = event.get("step"), event.get("max_steps"), event.get("elapsed_s")
    if not isinstance(total, int) or not isinstance(elapsed, int | float) or not step:
        return None
    return max(0.0, elapsed / step * (total - step))


def describe(event: dict[str, Any]) -> str:
    """One plain line: step 3/12 loss 2.3100 lr 2.0e-03 1,234 tok/s eta 0:12."""
    parts = [f"step {event['step']}/{event.get('max_steps', '?')}"]
    for key, label, fmt in (("loss", "loss", "{:.4f}"), ("lr", "lr", "{:.1e}")):
        value = event.get(key)
        if isinstance(value, int | float) and math.isfinite(value):
            parts.append(f"{label} {fmt.format(value)}")
    speed = event.get("tokens_per_s")
    if isinstance(speed, int | float) and math.isfinite(speed):
        parts.append(f"{speed:,.0f} tok/s")
    eta = eta_seconds(event)
    if eta is not None:
        parts.append(f"eta {int(eta) // 60}:{int(eta) % 60:02d}")
    return " ".join(parts)


class RunProgress:
    """Feed it every log line of a run; it draws the bar and echoes the other lines."""

    def __init__(self, console: Console, title: str) -> None:
        self.console = console
        self.title = title
        self.last_event: dict[str, Any] | None = None
        self._bar: Progress | None = None
        self._task: TaskID | None = None

    def __enter__(self) -> RunProgress:
        if self.console.is_terminal:
            self._bar = Progress(
                SpinnerColumn(),
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeElapsedColumn(),
                console=self.console,
                transient=False,
            )
            self._bar.start()
            self._task = self._bar.add_task(self.title, total=None, info="starting")
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        if self._bar is not None:
            self._bar.stop()

    def feed(self, line: str) -> None:
        event = parse_progress(line)
        if event is None:
            self.console.print(line, markup=False, highlight=False)
            return
        self.last_event = event
        if self._bar is None or self._task is None:
            self.console.print(describe(event), markup=False, highlight=False)
            return
        info = describe(event).split(" ", 2)[-1] if " " in describe(event) else ""
        total = event.get("max_steps") if isinstance(event.get("max_steps"), int) else None
        self._bar.update(self._task, completed=event["step"], total=total, info=info)


class BuildProgress:
    """Shows Docker build steps; the full log goes to a file elsewhere."""

    def __init__(self, console: Console, title: str) -> None:
        self.console = console
        self.title = title
        self._bar: Progress | None = None
        self._task: TaskID | None = None

    def __enter__(self) -> BuildProgress:
        if self.console.is_terminal:
            self._bar = Progress(
                SpinnerColumn(),
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeElapsedColumn(),
                console=self.console,
            )
            self._bar.start()
            self._task = self._bar.add_task(self.title, total=None, info="")
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        if self._bar is not None:
            self._bar.stop()

    def feed(self, line: str) -> None:
        match = BUILD_STEP.match(line)
        if match is None:
            return
        step, total, instruction = int(match[1]), int(match[2]), match[3]
        short = instruction if len(instruction) <= 60 else instruction[:57] + "..."
        if self._bar is None or self._task is None:
            self.console.print(f"build step {step}/{total}: {short}", markup=False, highlight=False)
            return
        self._bar.update(self._task, completed=step - 1, total=total, info=short)
