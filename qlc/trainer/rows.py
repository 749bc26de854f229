"""Rows: the training data as a list of JSON objects, read and checked before any model loads.

Local files are read here with the standard library (and pyarrow for parquet), so every problem
names the file and the line or row: an empty file, a malformed JSON line, bytes that are not
UTF-8, a corrupt parquet, a row that is not an object. Hub datasets go through `datasets`.
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qlc.compiler.plan import DataPlan, Plan
from qlc.trainer.errors import UserError

Row = dict[str, Any]
MAX_SHOWN = 5  # row numbers named in one message


@dataclass(frozen=True)
class Rows:
    train: list[Row]
    eval: list[Row]
    source: str  # the file's path or the hub id, for messages
    local_file: str | None  # the file read, when the data is local
    train_numbers: list[int]  # each train row's 1-based number in its file or split
    eval_numbers: list[int]  # likewise for the evaluation rows


def data_file(data: DataPlan, override: str | None) -> str | None:
    """The local data file to read (the launch path's QLC_DATA_PATH, else data.path)."""
    path = override or data.local_path
    if path is None:
        return None
    if not Path(path).is_file():
        raise UserError(
            f"data file {path!r} not found (relative paths start at {Path.cwd()}; the "
            "runtime passes the spec's data.path)"
        )
    return path


def read_file(path: str, file_format: str) -> list[Row]:
    """Every row of a local data file; UserError naming the file and the row otherwise."""
    try:
        raw = Path(path).read_bytes()
    except OSError as error:
        raise UserError(f"data file {path}: cannot read it: {error.strerror}") from None
    if not raw.strip():
        raise UserError(f"data file {path} is empty: it needs at least one row")
    if file_format == "parquet":
        rows = _parquet(path, raw)
    else:
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as error:
            line = raw[: error.start].count(b"\n") + 1
            raise UserError(
                f"{path}:{line}: not UTF-8 text (byte {raw[error.start]:#04x} at offset "
                f"{error.start}): save the file as UTF-8"
            ) from None
        rows = _csv(path, text) if file_format == "csv" else _json(path, text, file_format)
    if not rows:
        raise UserError(f"data file {path} has no rows")
    return rows


def _json(path: str, text: str, file_format: str) -> list[Row]:
    if file_format == "json" and text.lstrip().startswith("["):
        try:
            document = json.loads(text)
        except ValueError as error:
            raise UserError(f"{path}:{_line_of(error)}: not valid JSON: {_why(error)}") from None
        return _objects(path, document, "element")
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as error:
            raise UserError(
                f"{path}:{number}: not a JSON line: {_why(error)} (each line must hold one "
                "JSON object)"
            ) from None
        if not isinstance(row, dict):
            raise UserError(
                f"{path}:{number}: a row must be a JSON object, got {type(row).__name__}"
            )
        rows.append(row)
    return rows


def _objects(path: str, document: Any, what: str) -> list[Row]:
    if not isinstance(document, list):
        raise UserError(f"{path}: a .json data file holds a list of objects (one per row)")
    for index, row in enumerate(document):
        if not isinstance(row, dict):
            raise UserError(
                f"{path}: {what} {index} must be a JSON object, got {type(row).__name__}"
            )
    return list(document)


def _csv(path: str, text: str) -> list[Row]:
    reader = csv.DictReader(io.StringIO(text))
    if not reader.fieldnames:
        raise UserError(f"{path}:1: no header row: the first line names the columns")
    rows = []
    for row in reader:
        if None in row:  # more values than header columns
            raise UserError(f"{path}:{reader.line_num}: more values than the header has columns")
        rows.append(dict(row))
    return rows


def _parquet(path: str, raw: bytes) -> list[Row]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(pa.BufferReader(raw))
    except (pa.ArrowException, OSError, ValueError) as error:
        raise UserError(f"{path}: not a readable parquet file: {error}") from None
    rows: list[Row] = table.to_pylist()
    return rows


def _line_of(error: ValueError) -> int:
    return int(getattr(error, "lineno", 1) or 1)


def _why(error: ValueError) -> str:
    return str(getattr(error, "msg", error))


def hub_rows(data: DataPlan, split: str, token: str | None) -> list[Row]:
    """A hub dataset's split; no hub (offline, a missing dataset) is a UserError."""
    import datasets

    try:
        dataset = datasets.load_dataset(
            data.hub_id or "", data.config, data_files=data.data_files, revision=data.revision,
            split=split, token=token,
        )  # fmt: skip
    except Exception as error:  # network, authentication, unknown split: all the user's to fix
        raise UserError(
            f"cannot load dataset {data.hub_id!r} (split {split!r}) from the Hugging Face hub: "
            f"{_first_line(error)}\nfix: check the id, the split and access (HF_TOKEN as a "
            "runtime.secrets name), or use a local file as data.path"
        ) from None
    rows: list[Row] = dataset.to_list()
    return rows


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:300] if text else ''}"


def load_rows(plan: Plan, data_override: str | None, smoke_rows: int | None) -> Rows:
    """Training and evaluation rows (an eval split, a seeded held-out fraction, or none)."""
    data = plan.data
    path = data_file(data, data_override)
    token = os.environ.get("HF_TOKEN") or None
    if path is not None:
        rows, eval_rows = read_file(path, data.file_format or "jsonl"), []
    else:
        rows = hub_rows(data, data.split, token)
        eval_rows = [] if data.eval_split is None else hub_rows(data, data.eval_split, token)
    if smoke_rows is not None:
        rows, eval_rows = rows[:smoke_rows], eval_rows[: smoke_rows // 4]
    numbers, eval_numbers = list(range(1, len(rows) + 1)), list(range(1, len(eval_rows) + 1))
    if data.eval_fraction > 0:  # messages keep naming rows by their place in the file
        order = list(range(len(rows)))
        random.Random(plan.job.seed).shuffle(order)
        held = set(order[: max(1, round(len(rows) * data.eval_fraction))])
        eval_rows, eval_numbers = [rows[i] for i in sorted(held)], [i + 1 for i in sorted(held)]
        numbers = [i + 1 for i in range(len(rows)) if i not in held]
        rows = [row for i, row in enumerate(rows) if i not in held]
    source = path or str(data.hub_id)
    if not rows:
        raise UserError(f"no training rows in {source!r}")
    return Rows(rows, eval_rows, source, path, numbers, eval_numbers)


def shown_rows(numbers: list[int]) -> str:
    """Row numbers for a message: the first few, and how many more."""
    head = ", ".join(str(n) for n in numbers[:MAX_SHOWN])
    more = len(numbers) - MAX_SHOWN
    return head + (f" and {more} more" if more > 0 else "")
