"""The plan's precision as torch dtypes, and dynamic loss scaling for float16 adapters."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from qlc.compiler.plan import Dtype, Precision

TORCH_DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
}


def torch_dtype(name: Dtype) -> torch.dtype:
    return TORCH_DTYPES[name]


@dataclass(frozen=True)
class Dtypes:
    """What each part computes in (plan.train.engine.precision)."""

    base: torch.dtype  # dequantized base weights and the inputs of the base matmuls
    activations: torch.dtype  # residual stream, norms, attention, embeddings looked up
    adapter: torch.dtype  # LoRA matmuls (their float32 weights, or copies in this dtype)
    logits: torch.dtype  # logits and the cross-entropy
    loss_scaling: bool

    @classmethod
    def of(cls, precision: Precision) -> Dtypes:
        return cls(
            base=torch_dtype(precision.base_matmul),
            activations=torch_dtype(precision.activations),
            adapter=torch_dtype(precision.adapter_compute),
            logits=torch_dtype(precision.logits),
            loss_scaling=precision.loss_scaling,
        )


class LossScaler:
    """torch.amp.GradScaler's dynamic loss scaling when the plan asks for it (float16 adapter
    compute): the loss is multiplied by the scale before backward, the gradients divided by it
    before clipping, a step whose gradients hold inf/nan is skipped and the scale halved, and
    it doubles after 2,000 clean steps. Disabled, every call is the identity."""

    def __init__(self, enabled: bool, device: torch.device) -> None:
        self.enabled = enabled
        self.scaler = torch.amp.GradScaler(device.type, enabled=enabled)

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return self.scaler.scale(loss) if self.enabled else loss

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        if self.enabled:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        """The optimizer step unless the gradients overflowed; whether it was taken (with
        scaling this reads the scale back: one host sync per step)."""
        if not self.enabled:
            optimizer.step()
            return True
        before = self.scaler.get_scale()
        self.scaler.step(optimizer)
        self.scaler.update()
        return self.scaler.get_scale() >= before

    def state_dict(self) -> dict[str, Any]:
        return self.scaler.state_dict() if self.enabled else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.enabled and state:
            self.scaler.load_state_dict(state)
