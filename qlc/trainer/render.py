"""Rendering: a row -> the text training sees, with the character spans that carry loss.

One function per data.format ('sharegpt' turns become chat messages through the plan's role
mapping, then render as 'chat'). `unusable` says why a row has no text to train on (a null,
number, object or empty string where text belongs): such rows are counted and left out, and a
dataset where they are the majority stops before training, naming them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qlc.compiler.plan import DataPlan
from qlc.trainer.errors import UserError
from qlc.trainer.formats import INSTRUCTION_TEMPLATES
from qlc.trainer.rows import Row, Rows, shown_rows

CHAT_ROLES = ("system", "user", "assistant")
Message = dict[str, str]


@dataclass(frozen=True)
class Rendered:
    text: str
    trained: list[tuple[int, int]]  # character ranges whose tokens carry loss
    prompt: str  # what a generation would start from


@dataclass(frozen=True)
class Usable:
    """The rows that have text to train on, and which did not (1-based row numbers)."""

    rows: list[Row]
    numbers: list[int]  # each kept row's number in the source
    dropped: dict[str, list[int]]  # reason -> row numbers

    @property
    def dropped_count(self) -> int:
        return sum(len(numbers) for numbers in self.dropped.values())


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value.strip() else None


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, str):
        return "an empty string"
    return {bool: "a boolean", int: "a number", float: "a number", list: "a list",
            dict: "an object"}.get(type(value), type(value).__name__)  # fmt: skip


def fields_of(data: DataPlan) -> list[str]:
    """The fields data.format reads (input_field is optional)."""
    if data.format == "text":
        return [data.text_field]
    if data.format == "instruction":
        return [data.prompt_field, data.response_field]
    return [data.messages_field]


def unusable(row: Row, data: DataPlan) -> str | None:
    """Why `row` has no text to train on, or None when it has."""
    for name in fields_of(data):
        if name not in row:
            return f"no field {name!r}"
    if data.format == "sharegpt":
        return _sharegpt_problem(row[data.messages_field], data)
    if data.format == "chat":
        return _chat_problem(row[data.messages_field], data)
    for name in fields_of(data):
        if _text(row[name]) is None:
            return f"{name!r} is {_kind(row[name])}"
    if data.format == "instruction" and data.input_field is not None:
        extra = row.get(data.input_field)
        if extra is not None and not isinstance(extra, str):
            return f"{data.input_field!r} is {_kind(extra)}"
    return None


def _chat_problem(messages: Any, data: DataPlan) -> str | None:
    name = data.messages_field
    if not isinstance(messages, list) or not messages:
        return f"{name!r} is {_kind(messages) if messages != [] else 'an empty list'}"
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            return f"{name!r} holds a message without text content"
        if message.get("role") not in CHAT_ROLES:
            return f"{name!r} holds a message whose role is not one of {', '.join(CHAT_ROLES)}"
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        return f"{name!r} has no assistant message with text to learn from"
    return None


def _sharegpt_problem(turns: Any, data: DataPlan) -> str | None:
    name = data.messages_field
    if not isinstance(turns, list) or not turns:
        return f"{name!r} is {_kind(turns) if turns != [] else 'an empty list'}"
    for turn in turns:
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            return f"{name!r} holds a turn without a text 'value'"
        if turn.get("from") not in data.roles:
            return (
                f"{name!r} holds a turn whose 'from' is {str(turn.get('from'))[:40]!r}, which "
                f"data.roles does not map (it maps {', '.join(data.roles)})"
            )
    return _chat_problem(messages_of({name: turns}, data), data)


def messages_of(row: Row, data: DataPlan) -> list[Message]:
    """A conversation row's messages as {role, content} (ShareGPT turns mapped by data.roles)."""
    if data.format == "sharegpt":
        return [{"role": data.roles[t["from"]], "content": t["value"]}
                for t in row[data.messages_field]]  # fmt: skip
    return [{"role": m["role"], "content": m["content"]} for m in row[data.messages_field]]


def usable_rows(
    rows: list[Row], data: DataPlan, source: str, split: str, numbers: list[int] | None = None
) -> Usable:
    """The rows with text; UserError when a field is missing everywhere (a wrong field name)
    or when rows without text are the majority. `numbers`: each row's number in the source
    (default 1, 2, ...), which messages and the report name."""
    kept: list[Row] = []
    kept_numbers: list[int] = []
    dropped: dict[str, list[int]] = {}
    for number, row in zip(numbers or range(1, len(rows) + 1), rows, strict=True):
        why = unusable(row, data)
        if why is None:
            kept.append(row)
            kept_numbers.append(number)
        else:
            dropped.setdefault(why, []).append(number)
    missing = [n for n in fields_of(data) if all(n not in row for row in rows[:1000])]
    if missing:
        fields = sorted({key for row in rows[:100] for key in row})
        raise UserError(
            f"{source}: no {split} row has the field {missing[0]!r} that data.format = "
            f"{data.format!r} reads (fields: {', '.join(map(repr, fields)) or 'none'}): "
            "set the data.*_field keys of the spec"
        )
    if rows and len(kept) * 2 <= len(rows):
        reasons = "; ".join(f"{why}: rows {shown_rows(ns)}" for why, ns in dropped.items())
        raise UserError(
            f"{source}: {len(rows) - len(kept)} of {len(rows)} {split} rows have no text to "
            f"train on ({reasons}): fix the data or the data.*_field keys"
        )
    return Usable(kept, kept_numbers, dropped)


def check_sources(rows: Rows, data: DataPlan) -> None:
    """Each source of a mixture read by itself: a field missing from one source, or a source
    of mostly unusable rows, is named here rather than diluted in the mixture."""
    for source in rows.sources:
        usable_rows(source.rows, data, source.name, "train")


def render_text(row: Row, data: DataPlan) -> Rendered:
    text = str(row[data.text_field]).rstrip()
    end = text.find("[/INST]")
    prompt = text[: end + len("[/INST]")] if end >= 0 else text[: len(text) // 2]
    return Rendered(text, [(0, len(text))], prompt)


def render_instruction(row: Row, data: DataPlan) -> Rendered:
    with_input, without_input, suffix = INSTRUCTION_TEMPLATES[data.template]
    instruction = str(row[data.prompt_field]).strip()
    extra = str(row.get(data.input_field) or "").strip() if data.input_field else ""
    prompt = (with_input if extra else without_input).format(instruction=instruction, input=extra)
    text = prompt + str(row[data.response_field]).strip() + suffix
    start = len(prompt) if data.loss == "completion" else 0
    return Rendered(text, [(start, len(text))], prompt)


def render_chat(row: Row, data: DataPlan, number: int, tokenizer: Any) -> Rendered:
    return render_messages(messages_of(row, data), data, number, tokenizer)


def render_messages(
    messages: list[Message], data: DataPlan, number: int, tokenizer: Any
) -> Rendered:
    """A conversation through the chat template (data.chat_template was set on the tokenizer
    when it loaded); with loss = "completion" every assistant turn carries loss, from after
    the template's assistant header to the end of the turn."""
    assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]

    def render(part: list[Message], generation: bool = False) -> str:
        if not part:
            return ""
        try:
            return str(
                tokenizer.apply_chat_template(
                    part, tokenize=False, add_generation_prompt=generation
                )
            )
        except Exception as exc:  # jinja errors from the model's own template
            raise UserError(f"row {number}: the chat template failed: {exc}") from exc

    text = render(messages)
    trained = [(0, len(text))]
    if data.loss == "completion":
        trained = []
        for i in assistant:
            before, after = render(messages[:i]), render(messages[: i + 1])
            if not (after.startswith(before) and text.startswith(after)):
                raise UserError(NOT_PREFIX)
            header = render(messages[:i], generation=True)
            start = len(header) if header.startswith(before) and after.startswith(header) else (
                len(before))  # fmt: skip
            trained.append((start, len(after)))
    return Rendered(text, trained, render(messages[: assistant[-1]], generation=True))


NOT_PREFIX = (
    "the chat template does not render a conversation as the prefix of a longer one (it "
    "rewrites earlier turns), so the assistant turns cannot be found for data.loss = "
    '"completion": use data.loss = "all" (loss on every token), or set data.chat_template to a '
    "template that renders each turn the same way wherever it stands"
)


def render_row(row: Row, data: DataPlan, number: int, tokenizer: Any) -> Rendered:
    if data.format == "text":
        return render_text(row, data)
    if data.format == "instruction":
        return render_instruction(row, data)
    return render_chat(row, data, number, tokenizer)


def prompt_text(prompt: str, data: DataPlan, tokenizer: Any) -> str:
    """The text a generation starts from for a bare prompt, rendered as training rendered the
    prompt part of an example (qlc generate, merge verification)."""
    if data.format == "text":
        return prompt
    if data.format == "instruction":
        row = {data.prompt_field: prompt, data.response_field: ""}
        return render_instruction(row, data).prompt
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": ""}]
    return render_messages(messages, data, 0, tokenizer).prompt
