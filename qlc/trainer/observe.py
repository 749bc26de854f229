"""What actually trained, observed (not configured): the dtypes of the matrix products of the
first optimizer step, classified as the base's, the adapter's or the head's, and the dtypes of
the optimizer's states and the adapter's weights after training. The manifest records them
beside the plan's settings, so a silent substitution (a bfloat16 product in a float16 plan) is
visible in the record and caught by the tests."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from qlc.trainer.types import Decisions

MATMULS = ("mm", "addmm", "bmm", "gemm_4bit", "_int_mm")
BNB_MIN_8BIT_SIZE = 4096  # bitsandbytes' min_8bit_size, as transformers' Trainer passes it


def record_small_states(sizes: list[int], state_bits: int, decisions: Decisions) -> None:
    """8-bit optimizers keep the states of small tensors in 32 bits (both engines, through
    bitsandbytes): a run where that happens says so."""
    small = sum(size < BNB_MIN_8BIT_SIZE for size in sizes)
    if state_bits == 8 and small:
        decisions.record(
            "train.engine.optimizer.state_bits",
            f"8 for {len(sizes) - small} tensors, 32 for {small}",
            f"bitsandbytes keeps the states of tensors under {BNB_MIN_8BIT_SIZE} values in 32 "
            "bits (min_8bit_size, as under transformers' Trainer)",
        )


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class MatmulLog(TorchDispatchMode):  # type: ignore[no-untyped-call]
    """Every matrix product dispatched, by kind: the adapter's when one dimension is the LoRA
    rank, the head's when one is the vocabulary, else the base's."""

    def __init__(self, rank: int, vocab: int) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.rank, self.vocab = rank, vocab
        self.operands: dict[str, set[str]] = {"base": set(), "adapter": set(), "head": set()}
        self.outputs: dict[str, set[str]] = {"base": set(), "adapter": set(), "head": set()}

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        name = func.__name__.split(".")[0]
        if name in MATMULS and isinstance(out, torch.Tensor):
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            operands = tensors[-2:] if name == "addmm" else tensors[:2]
            if name == "gemm_4bit":  # the packed weight is no dtype of the computation
                operands = operands[:1]
            dims = {d for t in operands for d in t.shape}
            kind = "adapter" if self.rank in dims else "head" if self.vocab in dims else "base"
            self.operands[kind].update(dtype_name(t.dtype) for t in operands)
            self.outputs[kind].add(dtype_name(out.dtype))
        return out


class Observer:
    """Watches one optimizer step (`watch`) and reads the trained state (`after`)."""

    def __init__(self, rank: int, vocab: int) -> None:
        self.log = MatmulLog(rank, vocab)
        self.watched = False
        self.found: dict[str, Any] = {}

    @contextmanager
    def watch(self) -> Iterator[None]:
        """Log the products of the step run inside (once: later steps run unobserved)."""
        if self.watched:
            yield
            return
        self.watched = True
        with self.log:
            yield
        self.found["matmul_operands"] = {k: sorted(v) for k, v in self.log.operands.items()}
        self.found["matmul_outputs"] = {k: sorted(v) for k, v in self.log.outputs.items()}

    def after(self, model: torch.nn.Module, optimizer: Any) -> dict[str, Any]:
        """The observations, with the adapter weights' and optimizer states' dtypes."""
        adapter = {dtype_name(p.dtype) for n, p in model.named_parameters() if p.requires_grad}
        states: set[str] = set()  # the per-weight states (moments): as large as the weight
        for param, state in getattr(optimizer, "state", {}).items():
            for value in state.values():
                if isinstance(value, torch.Tensor) and value.numel() == param.numel() > 1:
                    states.add(dtype_name(value.dtype))
        return {**self.found, "adapter_weights": sorted(adapter),
                "optimizer_states": sorted(states)}  # fmt: skip
