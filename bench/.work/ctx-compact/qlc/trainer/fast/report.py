"""What the loop reports: metrics without stalls, and an optional profile of a few steps."""

from __future__ import annotations

import time
from typing import Any

import torch

from qlc.trainer.fast.stream import CudaEvent
from qlc.trainer.types import MetricsLog, peak_memory_bytes

PROFILE_AFTER = 10  # warm steps before the profiled ones


class Reporter:
    """Logging without stalls: a logging step's numbers are read back one logging step later,
    once the GPU has finished them, so the host never waits for work it just queued."""

    def __init__(self, device: torch.device, log: MetricsLog) -> None:
        self.device, self.log = device, log
        self.window_start = self._mark()  # when the window's first step was queued/ran
        self.window_loss = torch.zeros((), device=device)
        self.window_steps = self.window_tokens = 0
        self.pending: tuple[dict[str, Any], torch.Tensor, torch.Tensor, Any] | None = None
        self.last_loss: float | None = None

    def add(self, step_loss: torch.Tensor, tokens: int) -> None:
        self.window_loss += step_loss
        self.window_steps += 1
        self.window_tokens += tokens

    def close_window(self, record: dict[str, Any], grad_norm: torch.Tensor) -> None:
        """`record` ({"step", "max_steps", "epoch", "lr"}) is logged once its loss is ready."""
        record = {"event": "train", **record, "tokens": self.window_tokens}
        loss = self.window_loss / self.window_steps
        end = self._mark()
        record["window"] = (self.window_start, end)
        self.window_start = end
        self.flush()
        self.pending = (record, loss, grad_norm.detach().clone(), end)
        self.window_loss = torch.zeros((), device=self.device)
        self.window_steps = self.window_tokens = 0

    def flush(self) -> None:
        if self.pending is None:
            return
        record, loss, grad_norm, end = self.pending
        self.pending = None
        if not isinstance(end, float):
            end.synchronize()  # the logged step only; later steps keep running
        self.last_loss = float(loss.item())
        tokens, (start, end) = record.pop("tokens"), record.pop("window")
        record.update(
            loss=self.last_loss,
            grad_norm=float(grad_norm.item()),
            tokens_per_s=tokens / max(self._seconds(start, end), 1e-9),
            memory_bytes=peak_memory_bytes(),
        )
        self.log(record)

    def _mark(self) -> Any:
        """Now: a timed CUDA event on the GPU's stream (the GPU's clock, read later without
        a stall), or the host's clock on CPU (where the work is done when it returns)."""
        if self.device.type != "cuda":
            return time.perf_counter()
        event = CudaEvent(enable_timing=True)
        event.record()
        return event

    @staticmethod
    def _seconds(start: Any, end: Any) -> float:
        if isinstance(end, float):
            return float(end - start)
        return float(start.elapsed_time(end)) / 1000.0


class StepProfiler:
    """contract.ENV_PROFILE_STEPS = N: torch.profiler over N steps after 10 warm ones, printed
    as tables of where the time goes (it syncs and slows those steps; no numerics change)."""

    def __init__(self, steps: int, device: torch.device, show: bool) -> None:
        self.steps, self.device, self.show = steps, device, show
        self.active: Any = None
        self.began = 0.0

    def after_step(self, step: int) -> None:
        if not self.steps:
            return
        if step == PROFILE_AFTER:
            from torch.profiler import ProfilerActivity, profile

            activities = [ProfilerActivity.CPU]
            if self.device.type == "cuda":
                activities.append(ProfilerActivity.CUDA)
            self.active = profile(activities=activities)
            self.active.__enter__()
            self.began = time.perf_counter()
        elif step == PROFILE_AFTER + self.steps and self.active is not None:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            seconds = time.perf_counter() - self.began
            self.active.__exit__(None, None, None)
            if self.show:
                self._print(self.active.key_averages(), seconds)
            self.active = None

    def _print(self, events: Any, seconds: float) -> None:
        gpu_us = sum(e.self_device_time_total for e in events if e.device_type.name == "CUDA")
        print(
            f"qlc fast engine profile: {self.steps} steps in {seconds:.3f} s wall, GPU kernels "
            f"busy {gpu_us / 1e6:.3f} s",
            flush=True,
        )
        by_host = events.table(sort_by="self_cpu_time_total", row_limit=25)
        print(f"qlc fast engine profile, by host time:\n{by_host}", flush=True)
        if self.device.type == "cuda":
            by_gpu = events.table(sort_by="self_cuda_time_total", row_limit=30)
            print(f"qlc fast engine profile, by GPU time:\n{by_gpu}", flush=True)
