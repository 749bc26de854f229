"""The generic path: the model's own forward on right-padded batches, for what the padding-free
decoder does not model. Slower, never wrong; run at the plan's precision:

- the 4-bit layers compute in the base matmul dtype (bitsandbytes' compute dtype, set for the
  run), the other frozen weights (norms, embeddings) are cast to the activations dtype for the
  run and the embeddings' output too, so the residual stream is in the activations dtype;
- LoRA: float32 adapter compute is peft's own (input cast to float32, output cast back);
  16-bit adapter compute runs the LoRA matmuls (only them) under autocast to that dtype;
- the head takes its input in the base matmul dtype and returns float32 logits (outside
  autocast), whatever the model's head dtype;
- recompute "every-layer" is the model's own gradient checkpointing.

Everything changed is put back by `release()`. If the residual stream still reaches the head in
another dtype (a module trained outside LoRA keeps float32 weights), that is recorded.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

from qlc.trainer.fast.loss import cross_entropy_sum, upcast_matmul
from qlc.trainer.fast.precision import Dtypes
from qlc.trainer.fast.proj import bitsandbytes
from qlc.trainer.fast.schedule import pad
from qlc.trainer.types import Decisions, Example


class GenericLoss:
    def __init__(
        self,
        model: Any,
        pad_id: int,
        dtypes: Dtypes,
        recompute: bool,
        decisions: Decisions,
    ) -> None:
        self.model, self.pad_id, self.dtypes, self.decisions = model, pad_id, dtypes, decisions
        self.undo: list[Callable[[], None]] = []
        linear_4bit = bitsandbytes().nn.Linear4bit
        self.linear_4bit = [m for m in model.modules() if isinstance(m, linear_4bit)]
        head = model.get_output_embeddings()
        self._set_compute_dtype()
        self._cast_frozen(exclude={id(p) for p in head.parameters()})
        self._patch_head(head)
        self._cast_embeddings(model.get_input_embeddings())
        self._autocast_adapters()
        self._set_recompute(recompute)

    def _set_compute_dtype(self) -> None:
        for module in self.linear_4bit:
            old: tuple[torch.dtype | None, bool] = (
                module.compute_dtype,
                module.compute_type_is_set,
            )
            module.compute_dtype, module.compute_type_is_set = self.dtypes.base, True
            self.undo.append(functools.partial(_set_compute, module, *old))

    def _cast_frozen(self, exclude: set[int]) -> None:
        for param in self.model.parameters():
            skip = param.requires_grad or id(param) in exclude or is_4bit_param(param)
            if skip or not param.is_floating_point():
                continue
            self._set_data(param, param.data.to(self.dtypes.activations))

    def _set_data(self, param: torch.nn.Parameter, data: torch.Tensor) -> None:
        if data.data_ptr() != param.data_ptr():  # a cast that changed nothing: the same storage
            old = param.data
            param.data = data
            self.undo.append(lambda: setattr(param, "data", old))

    def _patch_head(self, head: Any) -> None:
        base = self.dtypes.base
        wrapped = hasattr(head, "base_layer")  # LoRA or modules_to_save on the head
        for param in head.parameters():
            if not param.requires_grad:  # base-dtype values, multiplied in float32
                self._set_data(param, param.data.to(base).float())
        original = head.forward

        def forward(h: torch.Tensor) -> torch.Tensor:
            self._probe(h)
            with torch.autocast(h.device.type, enabled=False):
                if wrapped:
                    out: torch.Tensor = original(h.to(base).float())
                    return out
                return upcast_matmul(h.to(base), head.weight) + _bias(head)

        setattr(head, "forward", forward)  # noqa: B010 (an instance attribute, undone)
        self.undo.append(lambda: delattr(head, "forward"))

    def _probe(self, h: torch.Tensor) -> None:
        if h.dtype != self.dtypes.activations and not getattr(self, "probed", False):
            self.probed = True
            self.decisions.record(
                "train.engine.precision.activations",
                str(h.dtype).removeprefix("torch."),
                "the generic path's residual stream reaches the head in this dtype (a module "
                "trained outside LoRA keeps float32 weights)",
            )

    def _autocast_adapters(self) -> None:
        """16-bit adapter compute: each LoRA matmul under autocast, and nothing else (autocast
        around the whole forward would also run attention and the head in 16 bits)."""
        adapter = self.dtypes.adapter
        if adapter == torch.float32:
            return
        for name, module in self.model.named_modules():
            if isinstance(module, torch.nn.Linear) and (".lora_A." in name or ".lora_B." in name):
                original = module.forward

                def forward(x: torch.Tensor, original: Any = original) -> torch.Tensor:
                    with torch.autocast(x.device.type, dtype=adapter):
                        out: torch.Tensor = original(x)
                        return out

                setattr(module, "forward", forward)  # noqa: B010 (an instance attribute, undone)
                self.undo.append(functools.partial(delattr, module, "forward"))

    def _cast_embeddings(self, embeddings: Any) -> None:
        act = self.dtypes.activations
        hook = embeddings.register_forward_hook(lambda _m, _i, out: out.to(act))
        self.undo.append(hook.remove)

    def _set_recompute(self, recompute: bool) -> None:
        base = self.model.get_base_model()
        was = bool(getattr(base, "is_gradient_checkpointing", False))
        if recompute and not was:
            base.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
            self.undo.append(base.gradient_checkpointing_disable)
        elif was and not recompute:
            base.gradient_checkpointing_disable()
            self.undo.append(
                lambda: base.gradient_checkpointing_enable(
                    gradient_checkpointing_kwargs={"use_reentrant": False}
                )
            )

    def release(self) -> None:
        for action in reversed(self.undo):
            action()
        self.undo.clear()

    def train(self, flag: bool) -> None:
        self.model.train(flag)
        for module in self.linear_4bit:
            # bitsandbytes repacks a CPU layer's weights for a bf16 kernel in eval mode: eval
            # needs only dropout off, so these layers stay in training mode
            module.training = True

    def after_backward(self) -> None:
        pass

    def after_step(self) -> None:
        pass

    def loss_sum(self, examples: list[Example], device: torch.device) -> torch.Tensor:
        batch = pad(examples, self.pad_id, device)
        logits = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        return cross_entropy_sum(logits.float().flatten(0, 1), batch.targets.flatten())


def is_4bit_param(param: torch.nn.Parameter) -> bool:
    return getattr(param, "quant_state", None) is not None or type(param).__name__ == "Params4bit"


def _bias(head: Any) -> torch.Tensor | float:
    return 0.0 if head.bias is None else head.bias.float()


def _set_compute(module: Any, dtype: torch.dtype | None, is_set: bool) -> None:
    module.compute_dtype, module.compute_type_is_set = dtype, is_set
