"""The decoder's elementwise kernels and attention, in plain torch.

Attention is causal within each example of a packed row: one varlen flash-attention call where
the GPU has a kernel that passes a start-up check against SDPA, else one SDPA call per example.
(Liger Kernel's Triton versions were measured slower on an H100: ~0.1-0.3 ms of Python per
call; bench/README.md.)
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from qlc.trainer.fast.schedule import Packed

Varlen = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]
CHECK_TOLERANCE = 2e-2  # relative error a fused kernel may show against the plain computation


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm: normalized in float32, scaled in the input dtype (torch's fused kernel on
    the GPU)."""
    if x.is_cuda:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding of q (T, H, D) and k (T, Hkv, D); cos and sin are (T, D)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


@dataclass
class Attention:
    """Causal attention within each example of a packed row."""

    varlen: Varlen | None

    @classmethod
    def for_device(cls, device: torch.device, dtype: torch.dtype) -> tuple[Attention, str]:
        """The attention for this device, and why (recorded as a run-time decision)."""
        if device.type != "cuda":
            return cls(None), "no GPU: one SDPA call per example"
        try:
            return cls(_checked_varlen(device, dtype)), "varlen flash attention passed its check"
        except Exception as error:  # a kernel missing or wrong here: the exact per-example path
            return cls(None), f"varlen attention unusable ({type(error).__name__}: {error})"

    @property
    def name(self) -> str:
        return "varlen flash attention" if self.varlen else "SDPA per example"

    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: Packed
    ) -> torch.Tensor:
        """q (T, H, D), k and v (T, Hkv, D) -> (T, H, D)."""
        if self.varlen is not None and q.is_cuda:
            if k.shape[1] != q.shape[1]:
                k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
            return self.varlen(q, k, v, batch.cu_seqlens, batch.max_len)
        return attention_per_example(q, k, v, batch.lengths)


def attention_per_example(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: list[int]
) -> torch.Tensor:
    groups = q.shape[1] // k.shape[1]
    outs, start = [], 0
    for n in lengths:
        qi, ki, vi = (t[start : start + n].transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        if groups > 1:
            ki, vi = (t.repeat_interleave(groups, dim=1) for t in (ki, vi))
        outs.append(F.scaled_dot_product_attention(qi, ki, vi, is_causal=True)[0].transpose(0, 1))
        start += n
    return torch.cat(outs) if len(outs) > 1 else outs[0]


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def _checked_varlen(device: torch.device, dtype: torch.dtype) -> Varlen:
    from torch.nn.attention.varlen import varlen_attn

    params = inspect.signature(varlen_attn).parameters
    causal = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}

    def run(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, max_len: int
    ) -> torch.Tensor:
        out = varlen_attn(q, k, v, cu, cu, max_len, max_len, **causal)
        return out if isinstance(out, torch.Tensor) else out[0]

    lengths = [37, 200, 5, 130]
    q, k, v = (
        torch.randn(sum(lengths), 4, 64, device=device, dtype=dtype, requires_grad=True)
        for _ in range(3)
    )
    cu = torch.tensor([0, 37, 237, 242, 372], device=device, dtype=torch.int32)
    a = run(q, k, v, cu, 200)
    ga = torch.autograd.grad(a.float().square().sum(), (q, k, v))
    b = attention_per_example(q, k, v, lengths)
    gb = torch.autograd.grad(b.float().square().sum(), (q, k, v))
    errors = [relative_error(a, b)] + [relative_error(x, y) for x, y in zip(ga, gb, strict=True)]
    if max(errors) > CHECK_TOLERANCE:
        raise ValueError(f"it disagrees with SDPA (relative errors {errors})")
    return run
