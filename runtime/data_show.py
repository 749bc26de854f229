"""How `qlc data` shows a Preview: each example with its loss mask (trained tokens styled in
a terminal, between {+ and +} when piped), the counts, the checks, the length histogram and the
schedule's arithmetic, as rich renderables and plain lines."""

from __future__ import annotations

from typing import Any

from rich.text import Text

from qlc.runtime.data_preview import Preview, Shown, histogram, token_segments
from qlc.trainer.types import IGNORE_INDEX

TRAINED_STYLE = "bold green"
MASKED_STYLE = "dim"
SPECIAL_STYLE = "italic cyan"
PLAIN_OPEN, PLAIN_CLOSE = "{+", "+}"
BAR_WIDTH = 40


def example_text(shown: Shown, styled: bool) -> Text:
    """The example's text with its loss mask: styles in a terminal, {+ +} marks when piped."""
    text = Text()
    open_mark = False
    for piece, trained, special in token_segments(shown):
        if styled:
            style = SPECIAL_STYLE if special else (TRAINED_STYLE if trained else MASKED_STYLE)
            text.append(piece, style=f"{style} underline" if special and trained else style)
            continue
        if trained != open_mark:
            text.append(PLAIN_OPEN if trained else PLAIN_CLOSE)
            open_mark = trained
        text.append(piece)
    if open_mark:
        text.append(PLAIN_CLOSE)
    if shown.cut:
        text.append(f"\n[... {shown.cut} more tokens cut by data.max_length]", style="bold red")
    return text


def example_header(shown: Shown, total: int) -> str:
    trained = sum(label != IGNORE_INDEX for label in shown.labels)
    return (
        f"--- training example {shown.number} of {total}: {len(shown.labels)} tokens, "
        f"{trained} trained"
    )


def legend(styled: bool) -> str:
    if styled:
        return "loss mask: trained tokens in green, masked ones dim, added tokens in cyan"
    return f"loss mask: trained text between {PLAIN_OPEN} and {PLAIN_CLOSE}; the rest is masked"


def summary_lines(preview: Preview) -> list[str]:
    data, report = preview.plan.data, preview.train.report
    rows = preview.rows
    lines = [f"data: {rows.source}, format {data.format!r}, loss {data.loss!r}"]
    lines += [
        f"  source {i}: {s.name}: {len(s.rows)} rows x weight {s.plan.weight:g} -> "
        f"{s.train_rows} training rows, {s.eval_rows} held out"
        for i, s in enumerate(rows.sources)
    ]
    sampled = "" if preview.estimate.exact else f" (the first {preview.sampled} tokenized)"
    lines.append(f"rows: {len(rows.train)} for training{sampled}, {len(rows.eval)} for evaluation")
    lines += count_lines(preview, report)
    return lines


def count_lines(preview: Preview, report: dict[str, Any]) -> list[str]:
    max_length = preview.plan.data.max_length
    lines = [
        f"  without usable text (left out): {report['rows_without_text']}",
        f"  over data.max_length = {max_length} (truncated): {report['truncated']}",
        f"  dropped (nothing left to train after the cut): {report['dropped_fully_masked']}",
        f"  examples: {report['examples']}, longest {report['longest']} tokens, mean "
        f"{report['mean_length']}",
    ]
    for why, numbers in report["rows_without_text_by_reason"].items():
        shown = ", ".join(str(n) for n in numbers[:5]) + (" ..." if len(numbers) > 5 else "")
        lines.append(f"    {why}: rows {shown}")
    return lines


def check_lines(preview: Preview) -> list[str]:
    report, examples = preview.train.report, preview.train.report["examples"]
    if preview.bos is None:
        bos = "BOS: the tokenizer has none; examples start with the text itself"
    else:
        bos = f"BOS {preview.bos!r}: {preview.starts_with_bos} of {examples} examples start with it"
        if report["doubled_bos_fixed"]:
            bos += f"; {report['doubled_bos_fixed']} had it twice (text + tokenizer), one dropped"
    eos = (
        f"EOS {preview.eos!r}: {preview.ends_with_eos} of {examples} examples end with it, "
        f"trained ({report['eos_appended']} appended by qlc)"
    )
    lines = ["checks:", f"  {bos}", f"  {eos}"]
    missing = examples - preview.ends_with_eos
    if missing:
        lines.append(
            f"  warning: {missing} examples end without EOS (cut by data.max_length): the model "
            "is not taught to stop there; raise data.max_length if they matter"
        )
    return lines


def histogram_lines(lengths: list[int], max_length: int) -> list[str]:
    lines = [f"token lengths ({len(lengths)} examples, before the cut at {max_length}):"]
    bins = histogram(lengths)
    peak = max(count for _, _, count in bins) or 1
    for low, high, count in bins:
        bar = "#" * round(BAR_WIDTH * count / peak)
        over = " (over max_length)" if low > max_length else ""
        lines.append(f"  {low:>7}-{high:<7} {count:>7} {bar}{over}")
    return lines


def schedule_lines(preview: Preview) -> list[str]:
    s, est = preview.plan.schedule, preview.estimate
    about = "" if est.exact else "about "
    if s.max_steps is not None:
        epochs = s.max_steps / max(est.steps_per_epoch, 1)
        steps = f"train.max_steps = {s.max_steps}: {s.max_steps} steps ({epochs:.2f} epochs)"
    else:
        steps = f"{s.epochs:g} epoch(s): {est.total_steps} steps"
    return [
        "schedule (the plan's):",
        f"  examples per step: batch_size {s.batch_size} x grad_accum {s.grad_accum} x "
        f"{s.world_size} process(es) = {s.examples_per_step}",
        f"  {about}{est.examples} training examples -> {est.steps_per_epoch} steps per epoch; "
        + steps,
        f"  tokens per epoch: {about}{est.tokens:,} ({about}{est.trained_tokens:,} trained)",
    ]
