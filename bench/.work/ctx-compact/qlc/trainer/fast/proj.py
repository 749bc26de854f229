"""The decoder's projections: the frozen base (dense copy, 4-bit or streamed) plus its LoRA.

Precision, as the plan names it: the base matmul takes its input cast to the base matmul dtype
and its output is cast back to the activations dtype; the LoRA path computes in the adapter
dtype, on the input cast to it (float32: from the float32 weights themselves, as peft does
without autocast; 16-bit: from copies of the float32 weights made once per optimizer step),
and its output is cast to the activations dtype before it is added.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from qlc.trainer.fast.precision import Dtypes


@dataclass
class Lora:
    """A LoRA pair. The float32 parameters stay the optimizer's; a 16-bit adapter dtype computes
    from copies refreshed after each optimizer step (not one cast per use), whose gradients are
    handed back to the float32 parameters after each backward: the values of casting per use."""

    A: torch.nn.Parameter
    B: torch.nn.Parameter
    scaling: float
    dropout: float
    dtype: torch.dtype
    copies: tuple[torch.Tensor, torch.Tensor] | None = None

    def delta(self, x: torch.Tensor, training: bool, out_dtype: torch.dtype) -> torch.Tensor:
        """dropout(x) A^T B^T * scaling in the adapter dtype, cast to `out_dtype`."""
        a, b = self.copies or (self.A, self.B)
        h = x.to(self.dtype)
        if self.dropout > 0:
            h = F.dropout(h, self.dropout, training)
        return (F.linear(F.linear(h, a), b) * self.scaling).to(out_dtype)

    def add_to(self, base: torch.Tensor, x: torch.Tensor, training: bool) -> torch.Tensor:
        if self.dtype != base.dtype:
            return base + self.delta(x, training, base.dtype)
        a, b = self.copies or (self.A, self.B)  # one addmm: product, scale and sum
        h = x.to(self.dtype)
        if self.dropout > 0:
            h = F.dropout(h, self.dropout, training)
        return torch.addmm(base, F.linear(h, a), b.t(), alpha=self.scaling)

    def refresh(self) -> None:
        if self.dtype == self.A.dtype:
            return
        with torch.no_grad():
            if self.copies is None:
                self.copies = (
                    self.A.detach().to(self.dtype).requires_grad_(),
                    self.B.detach().to(self.dtype).requires_grad_(),
                )
            else:
                self.copies[0].copy_(self.A)
                self.copies[1].copy_(self.B)

    def hand_back_grads(self) -> None:
        for master, copy in zip((self.A, self.B), self.copies or (), strict=False):
            if copy.grad is None:
                continue
            grad = copy.grad.float()
            master.grad = grad if master.grad is None else master.grad.add_(grad)
            copy.grad = None


@dataclass
class Part:
    """One projection of the checkpoint (e.g. q_proj): its frozen base and optional LoRA."""

    base: Any  # a bitsandbytes Linear4bit, or a torch Linear
    out_features: int
    lora: Lora | None
    streamed: tuple[torch.Tensor, Any] | None = None  # this layer's fetched 4-bit weight + state


def bitsandbytes() -> Any:
    """The bitsandbytes module, untyped at this boundary (its exports are not declared)."""
    import bitsandbytes as bnb

    return bnb


def is_4bit(module: Any) -> bool:
    return getattr(getattr(module, "weight", None), "quant_state", None) is not None


def dense_weight(module: Any, dtype: torch.dtype) -> torch.Tensor:
    """bitsandbytes' own dequantization, cast to the base matmul dtype as its matmul does."""
    weight: torch.Tensor = module.weight.detach()
    if is_4bit(module):
        state = module.weight.quant_state
        weight = bitsandbytes().functional.dequantize_4bit(module.weight.data, state)
    return weight.to(dtype)


@dataclass
class Proj:
    """Several projections of one input (q|k|v, gate|up) as ONE matmul on the dequantized copy
    ("dequantized"), or one bitsandbytes matmul each ("4bit", "streamed")."""

    parts: list[Part]
    dtypes: Dtypes
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    splits: list[int] = field(default_factory=list)

    @classmethod
    def build(cls, parts: list[Part], dtypes: Dtypes, dequantize: bool) -> Proj:
        proj = cls(parts, dtypes, splits=[p.out_features for p in parts])
        if dequantize or not all(is_4bit(p.base) for p in parts):
            proj.weight = torch.cat([dense_weight(p.base, dtypes.base) for p in parts])
            if any(p.base.bias is not None for p in parts):
                proj.bias = torch.cat([_bias(p, proj.weight, dtypes.base) for p in parts])
        return proj

    def __call__(self, x: torch.Tensor, training: bool) -> list[torch.Tensor]:
        act = self.dtypes.activations
        if self.weight is not None:
            fused = F.linear(x.to(self.dtypes.base), self.weight, self.bias).to(act)
            outs = list(torch.split(fused, self.splits, dim=-1))
        else:
            outs = [_linear_4bit(x.to(self.dtypes.base), p).to(act) for p in self.parts]
        for i, part in enumerate(self.parts):
            if part.lora is not None:
                outs[i] = part.lora.add_to(outs[i], x, training)
        return outs

    def nbytes(self) -> int:
        return 0 if self.weight is None else self.weight.numel() * self.weight.element_size()


def _bias(part: Part, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    bias: torch.Tensor | None = part.base.bias
    if bias is None:
        return torch.zeros(part.out_features, device=weight.device, dtype=dtype)
    return bias.detach().to(weight.device, dtype)


def _linear_4bit(x: torch.Tensor, part: Part) -> torch.Tensor:
    """x W^T from the 4-bit weight, in x's dtype. Streamed, the fetched weight is dequantized
    with bitsandbytes' own kernel and used like a dense copy; autograd keeps only that
    transient copy (dropped by the layer's recomputation), never the packed buffer."""
    bnb = bitsandbytes()
    bias = part.base.bias
    bias = None if bias is None else bias.to(x.device, x.dtype)
    if part.streamed is None:
        weight, state = part.base.weight, part.base.weight.quant_state
        out: torch.Tensor = bnb.matmul_4bit(x, weight.t(), bias=bias, quant_state=state)
        return out
    packed, state = part.streamed
    dense: torch.Tensor = bnb.functional.dequantize_4bit(packed, state)
    return F.linear(x, dense.to(x.dtype), bias)


def lora_of(module: Any, dtype: torch.dtype) -> Lora | None:
    """The active LoRA pair of a peft layer, if it has one."""
    if not hasattr(module, "lora_A") or not module.active_adapters:
        return None
    name = module.active_adapters[0]
    if name not in module.lora_A:
        return None
    return Lora(
        A=module.lora_A[name].weight,
        B=module.lora_B[name].weight,
        scaling=float(module.scaling[name]),
        dropout=float(getattr(module.lora_dropout[name], "p", 0.0)),
        dtype=dtype,
    )


def part_of(module: Any, dtype: torch.dtype) -> Part:
    base = getattr(module, "base_layer", module)
    return Part(base, base.out_features, lora_of(module, dtype))
