"""qlc data: the training data as training will see it, on CPU with the tokenizer only.

Rows are read, mixed, held out, checked, rendered and tokenized by the trainer's own code
(qlc.trainer.rows, render, examples: `load_rows`, `prepare`, `encode`), so the loss masks and
counts shown are the ones a run trains with; the schedule's arithmetic is the plan's own
(`Schedule.steps_per_epoch`, `total_steps`). Nothing loads a model's weights.
"""

from __future__ import annotations

import math
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from qlc.compiler.plan import Plan
from qlc.runtime.launch import LaunchError, LocalInputs, host_input_paths, local_inputs
from qlc.trainer.errors import UserError
from qlc.trainer.examples import Encoded, Prepared, encode, prepare
from qlc.trainer.rows import Rows, load_rows
from qlc.trainer.types import IGNORE_INDEX

DEFAULT_SAMPLE = 5000  # training rows tokenized; more are estimated from them


@dataclass(frozen=True)
class Shown:
    """One example as it trains: its tokens with their spans, labels cut to data.max_length."""

    number: int  # 1-based, among the training examples
    text: str
    encoded: Encoded
    labels: list[int]  # as trained (after data.max_length)
    tokens: list[str]  # each id's name in the vocabulary

    @property
    def cut(self) -> int:
        return len(self.encoded.example["input_ids"]) - len(self.labels)


@dataclass(frozen=True)
class Estimate:
    """The epoch's size: exact when every training row was tokenized, else scaled up."""

    examples: int
    tokens: int
    trained_tokens: int
    exact: bool
    steps_per_epoch: int
    total_steps: int


@dataclass(frozen=True)
class Preview:
    plan: Plan
    rows: Rows
    train: Prepared
    eval: Prepared | None
    sampled: int  # training rows tokenized
    shown: list[Shown]
    estimate: Estimate
    bos: str | None
    eos: str
    starts_with_bos: int  # examples whose first token is BOS
    ends_with_eos: int  # examples whose last trained token is EOS (after the cut)


class PreviewError(Exception):
    """Something the user must fix before the data can be shown (exit 2)."""


def preview(plan: Plan, spec_path: Path, shown: int, sample: int = DEFAULT_SAMPLE) -> Preview:
    """The data of `plan` prepared as training prepares it; PreviewError says what to fix."""
    offline = plan.runtime.needs_hub and not hub_reachable()
    if offline:
        os.environ["HF_HUB_OFFLINE"] = "1"  # what the cache holds, else an error at once
    try:
        local = local_inputs(plan, spec_path.resolve().parent, str(spec_path))
        rows = load_rows(
            plan,
            str(local.data_file) if local.data_file else None,
            None,
            host_input_paths(local),
        )
        from qlc.trainer.render import check_sources

        check_sources(rows, plan.data)
        tokenizer = preview_tokenizer(plan, local)
        train = prepare(rows.train[:sample], plan.data, tokenizer, rows.source, "train")
        held = rows.eval[:sample]
        evals = prepare(held, plan.data, tokenizer, rows.source, "eval") if held else None
    except (LaunchError, UserError) as error:
        note = "the Hugging Face hub is not reachable from here (only its cache was read): "
        raise PreviewError((note if offline else "") + str(error)) from None
    examples = train.examples
    return Preview(
        plan=plan,
        rows=rows,
        train=train,
        eval=evals,
        sampled=min(sample, len(rows.train)),
        shown=[shown_example(train, i, tokenizer) for i in range(min(shown, len(examples)))],
        estimate=estimate(plan, train, len(rows.train), min(sample, len(rows.train))),
        bos=tokenizer.bos_token,
        eos=str(tokenizer.eos_token),
        starts_with_bos=sum(e["input_ids"][0] == tokenizer.bos_token_id for e in examples),
        ends_with_eos=sum(e["labels"][-1] == tokenizer.eos_token_id for e in examples),
    )


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub's host (HF_ENDPOINT, else huggingface.co) answers on its port."""
    endpoint = urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname or "", port), timeout=timeout).close()
    except OSError:
        return False
    return True


def preview_tokenizer(plan: Plan, local: LocalInputs) -> Any:
    """The tokenizer as the trainer loads it (the spec's chat template applied); a hub one
    needs the hub (its error says so)."""
    from qlc.trainer.model import load_tokenizer, model_source

    if local.tokenizer_dir is not None:
        model = plan.model.model_copy(update={"tokenizer": str(local.tokenizer_dir)})
        plan = plan.model_copy(update={"model": model})
    source = model_source(plan.model, str(local.model_dir) if local.model_dir else None)
    return load_tokenizer(plan, source, host_input_paths(local))


def shown_example(prepared: Prepared, index: int, tokenizer: Any) -> Shown:
    rendered = prepared.rendered[index]
    encoded = encode(rendered, tokenizer)
    names = tokenizer.convert_ids_to_tokens(encoded.example["input_ids"])
    return Shown(index + 1, rendered.text, encoded, prepared.examples[index]["labels"], names)


def estimate(plan: Plan, train: Prepared, rows: int, sampled: int) -> Estimate:
    """The epoch from the tokenized rows: examples kept per row read, tokens per example."""
    report = train.report
    exact = sampled >= rows
    scale = rows / max(sampled, 1)
    examples = report["examples"] if exact else round(report["examples"] * scale)
    tokens = report["tokens"] if exact else round(report["tokens"] * scale)
    trained = report["trained_tokens"] if exact else round(report["trained_tokens"] * scale)
    schedule = plan.schedule
    return Estimate(
        examples=examples,
        tokens=tokens,
        trained_tokens=trained,
        exact=exact,
        steps_per_epoch=schedule.steps_per_epoch(examples),
        total_steps=schedule.total_steps(examples),
    )


def histogram(lengths: list[int], bins: int = 10) -> list[tuple[int, int, int]]:
    """(low, high, count) of token lengths in `bins` equal ranges (high inclusive)."""
    low, high = min(lengths), max(lengths)
    width = max(math.ceil((high - low + 1) / bins), 1)
    counts = [0] * bins
    for length in lengths:
        counts[min((length - low) // width, bins - 1)] += 1
    return [(low + i * width, low + (i + 1) * width - 1, n) for i, n in enumerate(counts)]


def write_histogram_png(lengths: list[int], max_length: int, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 3.5), dpi=110)
    axes.hist(lengths, bins=min(40, max(len(set(lengths)), 1)), color="#4477aa")
    axes.axvline(max_length, color="#cc3311", linestyle="--", label=f"max_length {max_length}")
    axes.set_xlabel("tokens per example (before the cut at data.max_length)")
    axes.set_ylabel("examples")
    axes.set_title(title)
    axes.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)


def token_segments(shown: Shown) -> list[tuple[str, bool, bool]]:
    """The example as (text, trained, special) pieces in order: each token's span of the
    rendered text (a token the tokenizer added, or the EOS qlc appended, as its own name), and
    the text between spans; tokens past data.max_length are left out (`Shown.cut`)."""
    pieces: list[tuple[str, bool, bool]] = []
    at = 0
    for k, label in enumerate(shown.labels):
        span = shown.encoded.offsets[k]
        trained = label != IGNORE_INDEX
        if span is None or span[0] == span[1]:  # added by the tokenizer, or qlc's EOS
            pieces.append((shown.tokens[k], trained, True))
            continue
        start, end = span
        if start > at:
            pieces.append((shown.text[at:start], False, False))
        if end > start:
            pieces.append((shown.text[start:end], trained, False))
        at = max(at, end)
    return pieces
