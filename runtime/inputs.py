"""validate --inputs: the spec's inputs checked against the plan before anything heavy runs.

Paths exist (relative ones start at the spec's folder), the local model is of the spec's
architecture, the fields data.format reads exist in the first rows of every local data file and
hold text, and (when nothing else is wrong) the tokenizer's chat template can give the
completion-only mask the spec asks for. The rows are read and judged by the trainer's own code
(qlc.trainer.rows, qlc.trainer.render), so what passes here is what the trainer accepts.
`qlc run` runs the checks that need no tokenizer (`quick=True`) before it builds or launches.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qlc.compiler.plan import TEMPLATE_KEY, Plan
from qlc.trainer.errors import UserError
from qlc.trainer.render import fields_of, unusable
from qlc.trainer.rows import Row, head_rows, shown_rows

HEAD_ROWS = 100  # rows read from the start of each local data file
TEMPLATE_ROWS = 8  # conversations rendered through the chat template


@dataclass
class InputsReport:
    problems: list[str] = field(default_factory=list)  # the run would stop on each
    warnings: list[str] = field(default_factory=list)
    checked: list[str] = field(default_factory=list)  # what was looked at, one line each

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass(frozen=True)
class Found:
    """The plan's local inputs on this host (None where absent or missing)."""

    model_dir: Path | None
    tokenizer_dir: Path | None
    data_files: list[tuple[str, Path, str]]  # (spec key, file, format) of the ones that exist
    input_paths: dict[str, str]  # the other local inputs found, as the trainer is told of them


def check_inputs(plan: Plan, spec_path: Path, quick: bool = False) -> InputsReport:
    """Every problem with the plan's inputs; `quick` leaves out the tokenizer."""
    report = InputsReport()
    found = find_inputs(plan, spec_path.resolve().parent, report)
    if found.model_dir is not None:
        check_architecture(plan, found.model_dir, report)
    for key, path, file_format in found.data_files:
        check_fields(plan, key, path, file_format, report)
    if not quick and report.ok and plan.data.conversational:
        check_chat_template(plan, found, report)
    return report


def find_inputs(plan: Plan, base: Path, report: InputsReport) -> Found:
    model_dir = tokenizer_dir = None
    if plan.model.local_path is not None:
        model_dir = _existing(base, "model.path", plan.model.local_path, True, report)
        if model_dir is not None and not (model_dir / "config.json").is_file():
            report.problems.append(
                f"model.path = {plan.model.local_path!r}: {model_dir} has no config.json (a "
                "transformers model directory has one)"
            )
            model_dir = None
    else:
        report.checked.append(f"model.id = {plan.model.hub_id!r}: on the hub (not checked here)")
    tokenizer = plan.model.tokenizer
    if tokenizer is not None and (base / tokenizer).is_dir():
        tokenizer_dir = (base / tokenizer).resolve()
    data = plan.data
    files, others = [], {}
    for file in data.local_inputs():
        path = _existing(base, file.key, file.path, False, report)
        if path is not None and file.key == TEMPLATE_KEY:
            others[file.key] = str(path)
        elif path is not None:
            files.append((file.key, path, file.file_format))
    hub = [s.hub_id for s in data.sources if s.hub_id] or ([data.hub_id] if data.hub_id else [])
    report.checked += [f"dataset {name!r}: on the hub (not checked here)" for name in hub]
    return Found(model_dir, tokenizer_dir, files, others)


def _existing(
    base: Path, key: str, value: str, want_dir: bool, report: InputsReport
) -> Path | None:
    path = (base / value).resolve()
    if path.is_dir() if want_dir else path.is_file():
        report.checked.append(f"{key} = {value!r}: {path}")
        return path
    kind = "directory" if want_dir else "file"
    report.problems.append(f"{key} = {value!r}: no such {kind} ({path}; relative paths start "
                           "at the spec's folder)")  # fmt: skip
    return None


def check_architecture(plan: Plan, model_dir: Path, report: InputsReport) -> None:
    from qlc.trainer.model import check_model_type, config_model_type

    try:
        check_model_type(plan.model, config_model_type(str(model_dir)), "model.path config.json")
    except UserError as error:
        report.problems.append(str(error))


def check_fields(plan: Plan, key: str, path: Path, file_format: str, report: InputsReport) -> None:
    """The fields data.format reads, in the first rows of one data file."""
    data = plan.data
    try:
        rows = head_rows(str(path), file_format, HEAD_ROWS)
    except UserError as error:
        report.problems.append(f"{key}: {error}")
        return
    present = sorted({name for row in rows for name in row})
    missing = [name for name in fields_of(data) if all(name not in row for row in rows)]
    if missing:
        setting = _field_key(plan, missing[0])
        report.problems.append(
            f"{key}: {setting} = {missing[0]!r}, but no row among the first {len(rows)} of "
            f"{path.name} has that field; the rows' fields: "
            f"{', '.join(map(repr, present)) or 'none'}: set {setting} to the one that holds "
            f"the {_what(plan)}"
        )
        return
    check_rows(plan, key, path, rows, report)


def check_rows(plan: Plan, key: str, path: Path, rows: list[Row], report: InputsReport) -> None:
    reasons: dict[str, list[int]] = {}
    for number, row in enumerate(rows, 1):
        why = unusable(row, plan.data)
        if why is not None:
            reasons.setdefault(why, []).append(number)
    bad = sum(len(numbers) for numbers in reasons.values())
    shown = "; ".join(f"{why}: rows {shown_rows(ns)}" for why, ns in reasons.items())
    where = f"{key}: {bad} of the first {len(rows)} rows of {path.name} have no text to train on"
    if bad * 2 >= len(rows):
        report.problems.append(f"{where} ({shown}): fix the data or the data.* keys")
    elif bad:
        report.warnings.append(f"{where} ({shown}): they are left out of training")
    else:
        report.checked.append(f"{key}: the first {len(rows)} rows have the fields "
                              f"{', '.join(map(repr, fields_of(plan.data)))}")  # fmt: skip


def _field_key(plan: Plan, name: str) -> str:
    data = plan.data
    if data.format == "text":
        return "data.text_field"
    if data.format == "instruction":
        return "data.prompt_field" if name == data.prompt_field else "data.response_field"
    return "data.messages_field"


def _what(plan: Plan) -> str:
    return {"text": "text", "instruction": "instruction and the response",
            "chat": "messages list", "sharegpt": "list of turns"}[plan.data.format]  # fmt: skip


def check_chat_template(plan: Plan, found: Found, report: InputsReport) -> None:
    """The tokenizer's (or data.chat_template's) template renders the first conversations, and
    with data.loss = "completion" finds each assistant turn (the prefix rule)."""
    from qlc.trainer.examples import check_tokenizer
    from qlc.trainer.render import usable_rows

    tokenizer = local_tokenizer(plan, found)
    if tokenizer is None:
        report.checked.append("chat template: the tokenizer is on the hub (not checked here)")
        return
    from qlc.trainer.render import render_row

    try:
        check_tokenizer(plan.data, tokenizer)
        for key, path, file_format in found.data_files:
            rows = head_rows(str(path), file_format, HEAD_ROWS)
            usable = usable_rows(rows, plan.data, key, "train")
            for row, number in list(zip(usable.rows, usable.numbers, strict=True))[:TEMPLATE_ROWS]:
                render_row(row, plan.data, number, tokenizer)
    except UserError as error:
        report.problems.append(f"chat template: {error}")
        return
    how = (
        "assistant turns found for the completion-only loss"
        if plan.data.loss == "completion"
        else "renders"
    )
    report.checked.append(f"chat template: {how} (first {TEMPLATE_ROWS} conversations)")


def local_tokenizer(plan: Plan, found: Found) -> Any:
    """The tokenizer as the trainer loads it, from a local directory only (None otherwise)."""
    from qlc.trainer.model import ModelSource, load_tokenizer

    if plan.model.tokenizer is not None and found.tokenizer_dir is None:
        return None
    if found.tokenizer_dir is not None:
        model = plan.model.model_copy(update={"tokenizer": str(found.tokenizer_dir)})
        plan = plan.model_copy(update={"model": model})
    elif found.model_dir is None:
        return None
    source = ModelSource(str(found.model_dir or found.tokenizer_dir), None, local=True)
    return load_tokenizer(plan, source, found.input_paths)
