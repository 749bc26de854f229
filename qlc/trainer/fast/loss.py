"""The loss: float32 logits from the frozen head, cross-entropy summed over the label tokens.

"full" computes the logits of the whole row at once; "chunked" (the lean setting) 1,024 tokens
at a time, each chunk recomputed in the backward pass, so the logits never exist in full.
The head is a frozen base matmul: its operands are in the base matmul dtype and its output,
the logits, in float32 (accumulated in float32 and never rounded to 16 bits).

On a GPU with 16-bit operands both run as one fused function (FusedHeadCE): each chunk's float32
logits come from a 16-bit GEMM with float32 output (torch.mm's out_dtype, used without autograd),
the softmax gradient is formed in float32 and multiplied back through the head by a 16-bit GEMM
with float32 output. The same values as the float32 upcast of the operands, without float32
copies of the head or float32 GEMMs, and with no chunk's logits kept for the backward pass.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

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


def head_matmul(device: torch.device, dtype: torch.dtype) -> tuple[HeadMatmul | None, str]:
    """How the logits are computed on this device, and why (a run-time decision); None: by
    the fused, chunked cross-entropy (FusedHeadCE)."""
    if dtype == torch.float32:
        return upcast_matmul, "float32 matmul"
    if device.type != "cuda":
        return upcast_matmul, f"{_name(dtype)} operands multiplied in float32 (CPU)"
    try:
        check_fused(device, dtype)
    except Exception as error:  # no such kernel here: the same values, through float32 copies
        why = f"torch.mm out_dtype unusable ({type(error).__name__}: {error})"
        return upcast_matmul, f"{_name(dtype)} operands multiplied in float32; {why}"
    return None, (
        f"{_name(dtype)} operands, float32 output (torch.mm out_dtype), fused chunked "
        "cross-entropy: the logits never exist whole"
    )


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")


class FusedHeadCE(torch.autograd.Function):
    """sum of cross-entropies of (h W^T) against targets, chunk by chunk, float32 logits from
    16-bit operands; the backward recomputes each chunk's logits (the head is frozen: no
    gradient for W)."""

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                chunk: int) -> torch.Tensor:  # fmt: skip
        ctx.save_for_backward(h, weight, targets)
        ctx.chunk = chunk
        total = torch.zeros((), device=h.device, dtype=torch.float32)
        for start in range(0, h.shape[0], chunk):
            part = slice(start, start + chunk)
            logits = torch.mm(h[part], weight.t(), out_dtype=torch.float32)
            total += cross_entropy_sum(logits, targets[part])
        return total

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        h, weight, targets = ctx.saved_tensors
        grad_h = torch.empty_like(h)
        for start in range(0, h.shape[0], ctx.chunk):
            part = slice(start, start + ctx.chunk)
            logits = torch.mm(h[part], weight.t(), out_dtype=torch.float32)
            probs = torch.softmax(logits, dim=-1)  # d(sum CE)/d logits = softmax - onehot
            labels = targets[part]
            kept = labels != IGNORE_INDEX
            rows = torch.arange(labels.shape[0], device=h.device)[kept]
            probs[rows, labels[kept]] -= 1.0
            probs[~kept] = 0.0
            back = torch.mm(probs.to(h.dtype), weight, out_dtype=torch.float32)
            grad_h[part] = (back * grad).to(h.dtype)
        return grad_h, None, None, None


def fused_head_ce(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    out: torch.Tensor = FusedHeadCE.apply(h, weight, targets, LOSS_CHUNK)  # type: ignore[no-untyped-call]
    return out


def check_fused(device: torch.device, dtype: torch.dtype) -> None:
    """The fused loss against the float32 upcast (loss and gradient), on this device."""
    x = torch.randn(1500, 256, device=device).to(dtype).requires_grad_()
    w = (torch.randn(1000, 256, device=device) * 0.05).to(dtype)
    targets = torch.randint(0, 1000, (1500,), device=device)
    targets[::7] = IGNORE_INDEX
    a = fused_head_ce(x, w, targets)
    (ga,) = torch.autograd.grad(a, x)
    b = cross_entropy_sum(upcast_matmul(x, w), targets)
    (gb,) = torch.autograd.grad(b, x)
    errors = [relative_error(a, b), relative_error(ga, gb)]
    if a.dtype != torch.float32 or ga.dtype != dtype or max(errors) > CHECK_TOLERANCE:
        raise ValueError(f"dtypes {a.dtype}/{ga.dtype}, relative errors {errors}")


class HeadLoss:
    """Summed cross-entropy of hidden states (T, hidden) against next-token targets (T,)."""

    def __init__(
        self, head: torch.Tensor, dtype: torch.dtype, matmul: HeadMatmul | None, chunked: bool
    ) -> None:
        self.head, self.dtype, self.matmul, self.chunked = head, dtype, matmul, chunked

    def __call__(self, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.matmul is None:  # fused: chunked, no logits kept, whatever the setting
            return fused_head_ce(h.to(self.dtype), self.head.to(self.dtype), targets)
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
        head = self.head.to(self.dtype)
        if self.matmul is None:
            return float32_out_matmul(h.to(self.dtype), head)
        return self.matmul(h.to(self.dtype), head)

    def _chunk(self, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return cross_entropy_sum(self.logits(h), targets)
