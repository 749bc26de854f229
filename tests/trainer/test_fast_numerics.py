"""The fast engine trains the plan's mathematics at the plan's precision (CPU, real 4-bit
layers: a tiny random Llama loaded NF4 by bitsandbytes, wrapped with peft LoRA).

The reference is the textbook loop: right-padded batches through the model's own forward and
loss, the same examples per step, torch AdamW, transformers' scheduler, clipping; for 16-bit
adapter compute, autocast (and torch.amp.GradScaler for float16), as mixed precision does.
Both models are loaded with their non-4-bit weights in the plan's activations dtype, so both
quantize the same values.

Tolerances, from measurements on this machine's CPU (the largest difference seen over four
steps, then a margin of about 10x for other CPUs' kernels). Weights are compared by their
updates (trained minus initial), which is sharper than comparing the weights themselves.
- float32: the two differ only by summation order: measured per-step losses 5e-8 relative,
  updates 1.1e-6; bounds 1e-5 and 1e-4.
- bfloat16 / float16: the reference computes its logits in 16 bits (its head is a 16-bit
  Linear) where the fast engine's are float32, and the two round the residual stream at
  different points (one fused q|k|v matmul, addmm for the LoRA sum). Measured: bfloat16
  losses 2.3e-5, updates 1.4e-2; float16 (with or without loss scaling) losses 2.7e-6,
  updates 4.5e-3. Bounds: bfloat16 2e-4 and 1e-1, float16 3e-5 and 5e-2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fast_support import (
    DTYPES,
    adapter,
    load_model,
    make_examples,
    make_plan,
    run_fast,
    train_losses,
    with_engine,
)

from qlc.compiler.plan import Plan
from qlc.trainer.fast.precision import LossScaler
from qlc.trainer.fast.schedule import label_count, pad, step_schedule

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.slow

STEPS = 4
TOLERANCES = {"float32": (1e-5, 1e-4), "bfloat16": (2e-4, 1e-1), "float16": (3e-5, 5e-2)}


def reference_train(model: Any, examples: list[Any], plan: Plan) -> list[float]:
    """The textbook loop, at the plan's adapter compute dtype."""
    schedule, opt = plan.train.schedule, plan.train.engine.optimizer
    precision = plan.train.engine.precision
    steps = step_schedule([len(e["input_ids"]) for e in examples], schedule, plan.job.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [{"params": params, "weight_decay": opt.weight_decay}], lr=opt.learning_rate
    )
    scheduler = transformers.get_scheduler(
        schedule.lr_scheduler, optimizer, num_training_steps=len(steps),
        num_warmup_steps=schedule.warmup_for(len(steps)),
    )  # fmt: skip
    scaler = LossScaler(precision.loss_scaling, torch.device("cpu"))
    autocast = DTYPES[precision.adapter_compute]
    losses = []
    for step in steps:
        micro = [[examples[i] for i in mb] for mb in step]
        n_targets = label_count([ex for mb in micro for ex in mb])
        total = 0.0
        for mb in micro:
            batch = pad(mb, 0, torch.device("cpu"))
            with torch.autocast("cpu", dtype=autocast, enabled=autocast != torch.float32):
                logits = model(
                    input_ids=batch.input_ids, attention_mask=batch.attention_mask
                ).logits
            loss = torch.nn.functional.cross_entropy(
                logits.float().flatten(0, 1), batch.targets.flatten(), reduction="sum"
            ) / n_targets  # fmt: skip
            scaler.scale(loss).backward()
            total += float(loss.detach())
        scaler.unscale(optimizer)
        torch.nn.utils.clip_grad_norm_(params, opt.max_grad_norm)
        if scaler.step(optimizer):
            scheduler.step()
        optimizer.zero_grad()
        losses.append(total)
    return losses


def plan_for(dtype: str, memory: str) -> Plan:
    """A CPU plan of `dtype` compute; "float16-scaled": float16 adapter compute with loss
    scaling (fp16 mixed precision, which settle allows on GPUs only); "streamed": the lean
    setting with the GPU's weight streaming, run on CPU; "padded": the generic path."""
    compute = dtype.removesuffix("-scaled")
    lean = memory in ("lean", "streamed")
    plan = make_plan(compute=compute, memory="lean" if lean else "standard", max_steps=STEPS)
    if dtype.endswith("-scaled"):
        plan = with_engine(plan, precision={"adapter_compute": "float16", "loss_scaling": True})
    if memory == "streamed":
        plan = with_engine(plan, base_weights="streamed")
    if memory == "padded":
        plan = with_engine(plan, batches="padded", base_weights="4bit")
    return plan


@pytest.mark.parametrize(
    ("dtype", "memory"),
    [
        ("float32", "standard"),
        ("float32", "lean"),
        ("float32", "streamed"),
        ("float32", "padded"),
        ("bfloat16", "standard"),
        ("float16", "standard"),
        ("float16-scaled", "standard"),
    ],
)
def test_fast_engine_matches_the_textbook_loop(
    tiny_dir: Path, tmp_path: Path, dtype: str, memory: str
) -> None:
    plan = plan_for(dtype, memory)
    activations = DTYPES[plan.train.engine.precision.activations]
    examples = make_examples(36, seed=3)
    reference_model = load_model(tiny_dir, plan, dtype=activations)
    fast_model = load_model(tiny_dir, plan, dtype=activations)
    before = adapter(fast_model)
    expected = reference_train(reference_model, examples, plan)
    result, records, decisions = run_fast(fast_model, plan, examples, tmp_path, examples[:5])

    assert not [d for d in decisions.entries if d["what"] == "train.engine.batches"]
    losses = train_losses(records)
    assert len(losses) == result.steps == STEPS
    loss_tol, weight_tol = TOLERANCES[dtype.removesuffix("-scaled")]
    assert losses == pytest.approx(expected, rel=loss_tol)
    want = adapter(reference_model)
    for name, got in adapter(fast_model).items():
        update, expected_update = got - before[name], want[name] - before[name]
        assert got.dtype == torch.float32 and bool(update.abs().max() > 0), name
        error = float((update - expected_update).norm() / expected_update.norm())
        assert error < weight_tol, f"{name}: updates differ by {error:.2e} (relative)"
    assert result.tokens_trained > 0 and result.eval_loss is not None
