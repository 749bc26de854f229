"""Examples: rendered rows -> token ids and labels (one BOS, a trained EOS, masks), and the
data report that says what happened to every row."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qlc.compiler.plan import DataPlan
from qlc.trainer.errors import UserError
from qlc.trainer.render import Rendered, Usable, render_row, usable_rows
from qlc.trainer.rows import Row
from qlc.trainer.types import IGNORE_INDEX, Example

COUNTS = ("doubled_bos_fixed", "eos_appended", "truncated", "dropped_fully_masked")


@dataclass(frozen=True)
class Prepared:
    examples: list[Example]
    rendered: list[Rendered]
    report: dict[str, Any]
    full_lengths: list[int]  # each kept example's tokens before data.max_length cut it


@dataclass(frozen=True)
class Encoded:
    """A rendered row as tokens: ids, labels, and each token's character span in the text
    ((0, 0) for a token the tokenizer added, None for the EOS qlc appended)."""

    example: Example
    offsets: list[tuple[int, int] | None]
    doubled_bos: bool
    eos_added: bool


def encode(rendered: Rendered, tokenizer: Any) -> Encoded:
    """input_ids and labels (IGNORE_INDEX = no loss) with one BOS and a trained EOS."""
    enc = tokenizer(rendered.text, add_special_tokens=True, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    doubled_bos = bos is not None and len(ids) > 1 and ids[0] == ids[1] == bos
    if doubled_bos:  # the text starts with BOS and the tokenizer added another
        ids, offsets = ids[1:], offsets[1:]
    labels = [
        tid if any(s <= start < e for s, e in rendered.trained) else IGNORE_INDEX
        for tid, (start, _end) in zip(ids, offsets, strict=True)
    ]
    spans: list[tuple[int, int] | None] = [(int(a), int(b)) for a, b in offsets]
    eos_added = not ids or ids[-1] != eos
    if eos_added:  # the model must learn to stop
        ids.append(eos)
        labels.append(eos)
        spans.append(None)
    return Encoded({"input_ids": ids, "labels": labels}, spans, doubled_bos, eos_added)


def tokenize(rendered: Rendered, tokenizer: Any) -> tuple[Example, dict[str, bool]]:
    encoded = encode(rendered, tokenizer)
    flags = {"doubled_bos": encoded.doubled_bos, "eos_added": encoded.eos_added}
    return encoded.example, flags


def check_tokenizer(data: DataPlan, tokenizer: Any) -> None:
    if data.conversational and not tokenizer.chat_template:
        raise UserError(
            f'data.format = "{data.format}" but the tokenizer has no chat template: set '
            "data.chat_template, or model.tokenizer to one that has a template, or use "
            'format "instruction"'
        )
    if not tokenizer.is_fast:
        raise UserError("the tokenizer has no fast (tokenizers) version; qlc needs its offsets")


def prepare(
    rows: list[Row],
    data: DataPlan,
    tokenizer: Any,
    source: str,
    split: str,
    numbers: list[int] | None = None,
) -> Prepared:
    """Tokenized examples, their rendered texts and the split's report (rows named by
    `numbers`, their places in the source: 1, 2, ... by default)."""
    check_tokenizer(data, tokenizer)
    usable = usable_rows(rows, data, source, split, numbers)
    examples: list[Example] = []
    kept: list[Rendered] = []
    lengths: list[int] = []
    counts = dict.fromkeys(COUNTS, 0)
    for row, number in zip(usable.rows, usable.numbers, strict=True):
        rendered = render_row(row, data, number, tokenizer)
        example, flags = tokenize(rendered, tokenizer)
        if all(label == IGNORE_INDEX for label in example["labels"]):
            raise UserError(f"{source}: {split} row {number}: every token is masked from the loss")
        counts["doubled_bos_fixed"] += flags["doubled_bos"]
        counts["eos_appended"] += flags["eos_added"]
        full = len(example["input_ids"])
        if full > data.max_length:
            counts["truncated"] += 1
            example = {
                "input_ids": example["input_ids"][: data.max_length],
                "labels": example["labels"][: data.max_length],
            }
            if all(label == IGNORE_INDEX for label in example["labels"]):
                counts["dropped_fully_masked"] += 1
                continue
        examples.append(example)
        kept.append(rendered)
        lengths.append(full)
    if not examples:
        raise UserError(
            f"no {split} example is left after truncating to data.max_length = "
            f"{data.max_length}: raise data.max_length"
        )
    return Prepared(examples, kept, report(split, rows, usable, examples, counts, data), lengths)


def report(
    split: str,
    rows: list[Row],
    usable: Usable,
    examples: list[Example],
    counts: dict[str, int],
    data: DataPlan,
) -> dict[str, Any]:
    lengths = [len(e["input_ids"]) for e in examples]
    return {
        "split": split,
        "rows": len(rows),
        "rows_without_text": usable.dropped_count,
        "rows_without_text_by_reason": {why: ns[:20] for why, ns in usable.dropped.items()},
        "examples": len(examples),
        **counts,
        "tokens": sum(lengths),
        "max_length": data.max_length,
        "longest": max(lengths),
        "mean_length": round(sum(lengths) / len(lengths), 1),
        "trained_tokens": sum(
            sum(label != IGNORE_INDEX for label in e["labels"]) for e in examples
        ),
    }


def show_example(rendered: Rendered, example: Example, tokenizer: Any) -> str:
    pieces = [
        repr(tokenizer.decode([tid])) + ("" if label != IGNORE_INDEX else "~")
        for tid, label in zip(example["input_ids"], example["labels"], strict=True)
    ]
    return (
        f"example 0, rendered:\n{rendered.text}\n"
        f"tokens (~ marks a token masked from the loss):\n{' '.join(pieces)}"
    )


def prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    """A prompt's token ids as training made them: special tokens added, a doubled BOS dropped,
    no EOS (a tokenizer that appends one would end the answer before it starts)."""
    has_bos = tokenizer.bos_token is not None and prompt.startswith(tokenizer.bos_token)
    ids = list(tokenizer(prompt, add_special_tokens=not has_bos)["input_ids"])
    eos = tokenizer.eos_token_id
    if len(ids) > 1 and ids[-1] == eos and not prompt.endswith(str(tokenizer.eos_token)):
        ids = ids[:-1]
    return ids
