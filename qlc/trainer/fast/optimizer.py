"""The optimizer the plan names (plan.train.engine.optimizer), and nothing else.

adamw: 32-bit states in torch's AdamW (one fused kernel on CUDA), or bitsandbytes' AdamW when
the states are paged (host-evictable CUDA memory) or 8-bit (bitsandbytes' 8-bit AdamW, on CPU
too); sgd: torch's SGD; adafactor: transformers' Adafactor with a fixed learning rate, as
transformers' Trainer builds it. Weight decay applies to every trainable weight but biases and
norms. Betas and epsilon are transformers' defaults.
"""

from __future__ import annotations

from typing import Any

import torch

from qlc.compiler.plan import OptimizerPlan
from qlc.trainer.fast.proj import bitsandbytes
from qlc.trainer.observe import BNB_MIN_8BIT_SIZE, record_small_states
from qlc.trainer.types import Decisions

BETAS = (0.9, 0.999)
EPS = 1e-8


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if "bias" in name or "norm" in name else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def make_optimizer(
    model: torch.nn.Module, plan: OptimizerPlan, device: torch.device, decisions: Decisions
) -> torch.optim.Optimizer:
    groups = param_groups(model, plan.weight_decay)
    lr = plan.learning_rate
    if plan.update == "sgd":
        return torch.optim.SGD(groups, lr=lr)
    if plan.update == "adafactor":
        from transformers import optimization

        adafactor: Any = optimization.Adafactor  # untyped
        optimizer: torch.optim.Optimizer = adafactor(
            groups, lr=lr, scale_parameter=False, relative_step=False
        )
        return optimizer
    if plan.state_bits == 8 or plan.paged:
        return _bitsandbytes_adamw(groups, plan, decisions)
    return torch.optim.AdamW(groups, lr=lr, betas=BETAS, eps=EPS, fused=device.type == "cuda")


def _bitsandbytes_adamw(
    groups: list[dict[str, Any]], plan: OptimizerPlan, decisions: Decisions
) -> torch.optim.Optimizer:
    """bitsandbytes' AdamW as transformers' Trainer makes it for adamw_8bit / paged_adamw_*."""
    record_small_states([p.numel() for g in groups for p in g["params"]], plan.state_bits,
                        decisions)  # fmt: skip
    optimizer: torch.optim.Optimizer = bitsandbytes().optim.AdamW(
        groups,
        lr=plan.learning_rate,
        betas=BETAS,
        eps=EPS,
        optim_bits=plan.state_bits,
        is_paged=plan.paged,
        min_8bit_size=BNB_MIN_8BIT_SIZE,
    )
    return optimizer
