"""The loss: float32 logits from the frozen head, cross-entropy summed over the label tokens.

"full" computes the logits of the whole row at once; "chunked" (the lean setting) 1,024 tokens
at a time, each chunk recomputed in the backward pass, so the logits never exist in full.
The head is a frozen base matmul: its operands are in the base matmul dtype and its output,
the logits, in float32 (accumulated in float32 and never rounded to 16 bits).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from qlc.trainer.fast.kernels import CHECK_TOLERANCE, relative_error
from qlc.trainer.types import IGNORE_INDEX

LOSS_CHUNK = 1024  # tokens per chunk of the chunked loss
HeadMatmul = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def upcast_matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x W^T in float32 from operands that hold base-dtype values."""
    return F.linear(x.float(), weight.float())


def float32_out_matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x W^T with 16-bit operands and a float32 output (torch.mm's out_dtype, CUDA)."""
    flat = x.reshape(-1, x.shape[-1])
    out = torch.mm(flat, weight.t(), out_dtype=torch.float32)
    return out.reshape(*x.shape[:-1], weight.shape[0])


def head_matmul(device: torch.device, dtype: torch.dtype) -> tuple[HeadMatmul, str]:
    """How the logits are computed on this device, and why (a run-time decision)."""
    if dtype == torch.float32:
        return upcast_matmul, "float32 matmul"
    if device.type != "cuda":
        return upcast_matmul, f"{_name(dtype)} operands multiplied in float32 (CPU)"
    try:
        _check_float32_out(device, dtype)
    except Exception as error:  # no such kernel here: the same values, through float32 copies
        why = f"torch.mm out_dtype unusable ({type(error).__name__}: {error})"
        return upcast_matmul, f"{_name(dtype)} operands multiplied in float32; {why}"
    return float32_out_matmul, f"{_name(dtype)} operands, float32 output (torch.mm out_dtype)"


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _check_float32_out(device: torch.device, dtype: torch.dtype) -> None:
    x = torch.randn(300, 256, device=device).to(dtype).requires_grad_()
    w = torch.randn(1000, 256, device=device).to(dtype)
    a = float32_out_matmul(x, w)
    (ga,) = torch.autograd.grad(a.square().sum(), x)
    b = upcast_matmul(x, w)
    (gb,) = torch.autograd.grad(b.square().sum(), x)
    errors = [relative_error(a, b), relative_error(ga, gb)]
    if a.dtype != torch.float32 or ga.dtype != dtype or max(errors) > CHECK_TOLERANCE:
        raise ValueError(f"dtypes {a.dtype}/{ga.dtype}, relative errors {errors}")


def cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")


class HeadLoss:
    """Summed cross-entropy of hidden states (T, hidden) against next-token targets (T,)."""

    def __init__(
        self, head: torch.Tensor, dtype: torch.dtype, matmul: HeadMatmul, chunked: bool
    ) -> None:
        self.head, self.dtype, self.matmul, self.chunked = head, dtype, matmul, chunked

    def __call__(self, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if not self.chunked:
            return self._chunk(h, targets)
        total = torch.zeros((), device=h.device)
        for start in range(0, h.shape[0], LOSS_CHUNK):
            part = slice(start, start + LOSS_CHUNK)
            loss = checkpoint(self._chunk, h[part], targets[part], use_reentrant=False)
            total = total + loss
        return total

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        # a lean head stored in another dtype is cast per use (transient, recomputed)
        return self.matmul(h.to(self.dtype), self.head.to(self.dtype))

    def _chunk(self, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return cross_entropy_sum(self.logits(h), targets)
