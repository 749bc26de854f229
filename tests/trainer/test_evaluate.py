"""The evaluation loss has one definition (contract.EVAL_LOSS_DEFINITION): the token-weighted
mean cross-entropy over every label token, dropout off; here against the tiny model's own
forward one example at a time."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from trainer_support import TINY_MODEL

from qlc.compiler.plan import Plan
from qlc.trainer.evaluate import padded, token_weighted_loss
from qlc.trainer.types import IGNORE_INDEX, Example


@pytest.fixture(scope="module")
def model() -> Any:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(TINY_MODEL, dtype=torch.float32)


def examples() -> list[Example]:
    """Five examples of different lengths, some tokens masked: batches of 4 hold unequal
    numbers of label tokens, so a mean of batch means would differ."""
    generator = torch.Generator().manual_seed(1)
    made: list[Example] = []
    for length, masked in ((40, 30), (6, 0), (12, 4), (25, 0), (3, 1)):
        ids = torch.randint(3, 1000, (length,), generator=generator).tolist()
        made.append({"input_ids": ids, "labels": [IGNORE_INDEX] * masked + ids[masked:]})
    return made


def one_at_a_time(model: Any, batch: list[Example]) -> tuple[float, int]:
    """Sum of next-token cross-entropies and label tokens, each example alone, no padding."""
    total, count = 0.0, 0
    with torch.no_grad():
        for example in batch:
            ids = torch.tensor([example["input_ids"]])
            logits = model(input_ids=ids).logits[0, :-1].float()
            labels = torch.tensor(example["labels"][1:])
            keep = labels != IGNORE_INDEX
            total += float(
                torch.nn.functional.cross_entropy(logits[keep], labels[keep], reduction="sum")
            )
            count += int(keep.sum())
    return total, count


def test_the_loss_is_token_weighted_over_every_label_token(model: Any, tiny_plan: Plan) -> None:
    batch = examples()
    model.train()  # dropout would be on: evaluation turns it off and restores the mode
    loss = token_weighted_loss(model, batch, tiny_plan, pad_id=0)
    assert model.training
    total, count = one_at_a_time(model, batch)
    assert loss == pytest.approx(total / count, rel=1e-5)
    size = tiny_plan.schedule.batch_size
    ordered = sorted(batch, key=lambda ex: len(ex["input_ids"]))
    means = []
    for start in range(0, len(ordered), size):
        batch_total, batch_count = one_at_a_time(model, ordered[start : start + size])
        means.append(batch_total / batch_count)
    assert loss != pytest.approx(sum(means) / len(means), rel=1e-3)  # not a mean of batch means


def test_no_examples_no_loss(model: Any, tiny_plan: Plan) -> None:
    assert token_weighted_loss(model, [], tiny_plan, pad_id=0) is None


def test_padding_carries_no_loss_and_no_attention() -> None:
    batch = padded(
        [{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [8], "labels": [8]}],
        pad_id=0,
        device="cpu",
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[5, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
