"""Which path trains this model, and the run-time decisions the plan leaves to a rule.

The plan chooses the padding-free decoder or the padded generic path from the spec; what only
the loaded model shows (tied embeddings, another activation, a short sliding window, trainable
parameters outside LoRA) sends a padding-free plan to the generic path, recorded. Recomputation
"when-short" is decided here from the free GPU memory, recorded with the numbers.
"""

from __future__ import annotations

from typing import Any

import torch

from qlc.compiler.plan import Plan
from qlc.trainer.fast.precision import torch_dtype
from qlc.trainer.types import Decisions, Example

DECODER_ARCHITECTURES = ("llama", "mistral", "qwen2")
LORA_TARGETS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
MEMORY_MARGIN = 6 * 2**30  # bytes kept free beside the estimate (allocator, kernels' scratch)


def unsupported_reason(model: Any, longest: int) -> str | None:
    """Why FastDecoder cannot train this model exactly (None: it can)."""
    try:
        base = model.get_base_model()
        config, layers = base.config, base.model.layers
    except AttributeError:
        return "not a peft-wrapped Llama-family causal LM"
    if config.model_type not in DECODER_ARCHITECTURES or not len(layers):
        return f"architecture {config.model_type!r}"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act!r} (the decoder computes SwiGLU with silu)"
    if getattr(config, "tie_word_embeddings", False):
        return "tied input and output embeddings"
    window = getattr(config, "sliding_window", None)
    if window is not None and getattr(config, "use_sliding_window", True) and window < longest:
        return f"sliding window {window} shorter than the longest example ({longest} tokens)"
    return _adapter_reason(model)


def _adapter_reason(model: Any) -> str | None:
    adapted = set()
    for name, param in model.named_parameters():
        if "lora_magnitude" in name or "lora_embedding" in name:
            return f"DoRA or embedding LoRA ({name})"
        if not param.requires_grad:
            continue
        if "lora_A" not in name and "lora_B" not in name:
            return f"trainable parameter {name} outside LoRA"
        parts = name.split(".")
        adapted.add(parts[next(i for i, p in enumerate(parts) if p in ("lora_A", "lora_B")) - 1])
    if not adapted <= LORA_TARGETS:
        return f"LoRA on {sorted(adapted - LORA_TARGETS)}"
    return None


def use_decoder(model: Any, plan: Plan, examples: list[Example], decisions: Decisions) -> bool:
    """Whether the padding-free decoder trains this run (a fallback is recorded)."""
    if plan.engine.batches != "padding-free":
        return False
    longest = max((len(ex["input_ids"]) for ex in examples), default=1)
    reason = unsupported_reason(model, longest)
    if reason is None:
        return True
    decisions.record(
        "train.engine.batches",
        "padded",
        f"the padding-free decoder does not model this model ({reason}): the generic path "
        "trains it through the model's own forward on padded batches",
    )
    return False


def activation_bytes(model: Any, plan: Plan, examples: list[Example], itemsize: int) -> int:
    """Activations kept for the backward pass of the longest micro-batch, without recompute."""
    config = model.get_base_model().config
    tokens = sorted((len(ex["input_ids"]) for ex in examples), reverse=True)
    worst = sum(tokens[: plan.schedule.batch_size])
    intermediate = getattr(config, "intermediate_size", None) or 4 * config.hidden_size
    per_token = (14 * config.hidden_size + 5 * intermediate) * itemsize
    return int(per_token * config.num_hidden_layers * worst)


def decide_recompute(
    model: Any, plan: Plan, examples: list[Example], device: torch.device, decisions: Decisions
) -> bool:
    """Whether each decoder layer is recomputed in the backward pass. "when-short" keeps the
    activations when they fit the free GPU memory (measured after the weights are in place)."""
    rule: str = plan.engine.recompute
    if rule != "when-short":
        return rule == "every-layer"
    if device.type != "cuda":
        decisions.record("train.engine.recompute", "none", "when-short on CPU: no GPU to fit")
        return False
    activations = torch_dtype(plan.engine.precision.activations)
    itemsize = torch.tensor([], dtype=activations).element_size()
    needed = activation_bytes(model, plan, examples, itemsize) + MEMORY_MARGIN
    free, _ = torch.cuda.mem_get_info(device)
    recompute = needed > free
    decisions.record(
        "train.engine.recompute",
        "every-layer" if recompute else "none",
        f"when-short: activations of the longest micro-batch + margin = {needed / 2**30:.2f} "
        f"GiB {'>' if recompute else '<='} {free / 2**30:.2f} GiB free on the GPU",
    )
    return recompute
