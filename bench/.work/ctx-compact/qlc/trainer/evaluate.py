"""Evaluation loss, one definition for every engine (qlc.contract.EVAL_LOSS_DEFINITION):
token-weighted mean cross-entropy over every label token of the evaluation examples, dropout
off, computed here through the model's own forward on padded batches (the reference engine;
the fast engine computes the same sum through its decoder)."""

from __future__ import annotations

from typing import Any

from qlc.compiler.plan import Plan
from qlc.trainer.types import IGNORE_INDEX, Example, label_tokens


def padded(examples: list[Example], pad_id: int, device: Any) -> dict[str, Any]:
    """A right-padded batch: input ids, labels (IGNORE_INDEX on padding), attention mask."""
    import torch

    width = max(len(ex["input_ids"]) for ex in examples)
    ids = [ex["input_ids"] + [pad_id] * (width - len(ex["input_ids"])) for ex in examples]
    labels = [ex["labels"] + [IGNORE_INDEX] * (width - len(ex["labels"])) for ex in examples]
    mask = [[1] * len(ex["input_ids"]) + [0] * (width - len(ex["input_ids"])) for ex in examples]
    return {
        "input_ids": torch.tensor(ids, dtype=torch.long, device=device),
        "labels": torch.tensor(labels, dtype=torch.long, device=device),
        "attention_mask": torch.tensor(mask, dtype=torch.long, device=device),
    }


def loss_sum(model: Any, batch: dict[str, Any]) -> Any:
    """Sum of next-token cross-entropies over the batch's label tokens, in float32."""
    import torch.nn.functional as F

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    shifted = F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE_INDEX)
    return F.cross_entropy(
        logits.float().flatten(0, 1), shifted.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def token_weighted_loss(
    model: Any, examples: list[Example], plan: Plan, pad_id: int | None
) -> float | None:
    """The evaluation loss of `examples` (None without any), batches of batch_size sorted by
    length, under the same autocast as training."""
    import torch

    if not examples:
        return None
    device = next(p.device for p in model.parameters() if p.device.type != "meta")
    compute = plan.engine.precision.adapter_compute
    autocast = torch.autocast(
        device.type, dtype=getattr(torch, compute), enabled=compute != "float32"
    )
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    size, was_training = plan.schedule.batch_size, model.training
    total, count = torch.zeros((), dtype=torch.float64, device=device), 0
    model.eval()
    try:
        with torch.no_grad(), autocast:
            for start in range(0, len(order), size):
                chunk = [examples[i] for i in order[start : start + size]]
                total += loss_sum(model, padded(chunk, pad_id or 0, device)).double()
                count += sum(label_tokens(ex) for ex in chunk)
    finally:
        model.train(was_training)
    return float(total.item() / max(count, 1))
