"""base_weights = "streamed": the frozen 4-bit weights live in host memory, one decoder layer
at a time on the GPU; `Parked` moves parameters for the run and puts them back."""

from __future__ import annotations

import copy
from typing import Any

import torch

CudaStream: Any = torch.cuda.Stream  # untyped constructors
CudaEvent: Any = torch.cuda.Event
HostWeight = tuple[torch.Tensor, torch.Tensor, Any]  # packed, absmax, the rest of the state
Fetched = tuple[torch.Tensor, torch.Tensor]  # packed, absmax on the device


class WeightStream:
    """The frozen 4-bit weights of the decoder layers in pinned host memory. A layer's packed
    weights and scales are copied to the GPU just before it runs, the next layer's copy (in the
    direction of the pass: up in the forward, down in the backward's recomputation) on a copy
    stream while this one computes, and dropped after: the GPU holds three layers of the base
    (previous, current, next) instead of all of it. `restore()` puts every weight back.

    A layer's buffers are freed once the GPU has finished the work queued with them (waited
    for on the host), so the copy stream reuses them at once. Freed while the GPU was still
    behind, as record_stream would, every layer the host ran ahead would hold new buffers
    (measured: 5.1 GiB reserved for 2.8 GiB allocated). On CPU the copies are the host tensors
    themselves: the same bookkeeping, for tests."""

    def __init__(self, layers: list[list[Any]], device: torch.device) -> None:
        self.device, self.cuda = device, device.type == "cuda"
        self.modules = layers
        self.homes = [[m.weight.data.device for m in mods] for mods in layers]
        self.host = [[self._to_host(m) for m in mods] for mods in layers]
        self.copy_stream = CudaStream(device) if self.cuda else None
        self.resident: dict[int, tuple[Any, list[Fetched]]] = {}  # layer -> (copied, tensors)
        self.done: dict[int, Any] = {}  # layer -> after the work queued with it
        self.last, self.direction, self.fetches = -1, 1, 0

    def _to_host(self, module: Any) -> HostWeight:
        weight, state = module.weight, module.weight.quant_state
        packed, absmax = weight.data.to("cpu"), state.absmax.to("cpu")
        if self.cuda:
            packed, absmax = packed.pin_memory(), absmax.pin_memory()
        small = copy.copy(state)  # the NF4 code and nested scales: a few KiB, kept on the GPU
        small.code = state.code.to(self.device)
        if state.nested:
            small.offset = state.offset.to(self.device)
            small.state2 = copy.copy(state.state2)
            small.state2.absmax = state.state2.absmax.to(self.device)
            small.state2.code = state.state2.code.to(self.device)
        weight.data, state.absmax = packed, absmax  # a GPU-loaded base leaves the GPU
        return packed, absmax, small

    def restore(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
        self.resident.clear()
        self.done.clear()
        for mods, homes in zip(self.modules, self.homes, strict=True):
            for module, home in zip(mods, homes, strict=True):
                module.weight.data = module.weight.data.to(home)
                module.weight.quant_state.absmax = module.weight.quant_state.absmax.to(home)

    def _free(self, i: int) -> None:
        copied, _ = self.resident.pop(i)
        used = self.done.pop(i, None)
        for pending in (copied, used):  # the GPU is done with the buffers before they go
            if pending is not None:
                pending.synchronize()

    def _fetch(self, i: int) -> None:
        if i in self.resident or not 0 <= i < len(self.host):
            return
        event = None
        if self.copy_stream is not None:
            with torch.cuda.stream(self.copy_stream):
                tensors = [
                    (p.to(self.device, non_blocking=True), a.to(self.device, non_blocking=True))
                    for p, a, _ in self.host[i]
                ]
                event = CudaEvent()
                event.record(self.copy_stream)
        else:
            tensors = [(p.to(self.device), a.to(self.device)) for p, a, _ in self.host[i]]
        self.resident[i] = (event, tensors)
        self.fetches += 1

    def get(self, i: int) -> list[tuple[torch.Tensor, Any]]:
        """Layer i's weights on the device (waited for), and the next layer's copy started."""
        if self.cuda and self.last in self.resident and i != self.last:
            self.done[self.last] = CudaEvent()  # after everything queued with it
            self.done[self.last].record(torch.cuda.current_stream(self.device))
        if i != self.last:
            self.direction = 1 if i > self.last else -1
        self._fetch(i)
        event, tensors = self.resident[i]
        if event is not None:  # first use: the compute stream waits for the copy
            torch.cuda.current_stream(self.device).wait_event(event)
            self.resident[i] = (None, tensors)
        following = i + self.direction
        if not 0 <= following < len(self.host):  # the pass turns (forward -> recomputation)
            following = i - self.direction
        # the previous layer stays until the next get: its kernels may still be running
        for old in [k for k in self.resident if k not in (self.last, i, following)]:
            self._free(old)
        self._fetch(following)
        self.last = i
        weights = []
        for (packed, absmax), (_, _, small) in zip(tensors, self.host[i], strict=True):
            state = copy.copy(small)
            state.absmax = absmax
            weights.append((packed, state))
        return weights


class Parked:
    """Parameters moved for the run (streamed: embeddings and head to host memory, adapters to
    the GPU), put back where they were by `restore()`."""

    def __init__(self) -> None:
        self.moved: list[tuple[torch.nn.Parameter, torch.device]] = []

    def move(self, param: torch.nn.Parameter, device: torch.device | str) -> torch.Tensor:
        home = param.data.device
        if home != torch.device(device):
            self.moved.append((param, home))
            param.data = param.data.to(device)
        return param.data

    def restore(self) -> None:
        for param, home in reversed(self.moved):
            param.data = param.data.to(home)
        self.moved.clear()
