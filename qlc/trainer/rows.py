"""Rows: the training data as a list of JSON objects, read and checked before any model loads.

Local files are read here with the standard library (and pyarrow for parquet), so every problem
names the file and the line or row: an empty file, a malformed JSON line, bytes that are not
UTF-8, a corrupt parquet, a row that is not an object. Hub datasets go through `datasets`.
A mixture (data.sources) is read source by source, each one's evaluation rows held out, then
its training rows taken `weight` times (a seeded sample for a fraction) and shuffled together.
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qlc.compiler.plan import DataPlan, Plan, SourcePlan, source_key
from qlc.contract import data_file_format
from qlc.trainer.errors import UserError

Row = dict[str, Any]
MAX_SHOWN = 5  # row numbers named in one message


@dataclass(frozen=True)
class SourceRows:
    """One source of a mixture as read: its rows, and how many of them the mixture took."""

    plan: SourcePlan
    name: str  # the file's path or the hub id, for messages
    local_file: str | None
    rows: list[Row]  # every row read (before the held-out ones are taken)
    train_rows: int  # rows it put into the training mixture (weight applied)
    eval_rows: int


@dataclass(frozen=True)
class Rows:
    train: list[Row]
    eval: list[Row]
    source: str  # the file's path or the hub id, for messages
    local_file: str | None  # the file read, when the data is one local file
    # each train row's 1-based number in its file or split (empty: 1, 2, ... in order)
    train_numbers: list[int] = field(default_factory=list)
    eval_numbers: list[int] = field(default_factory=list)  # likewise for the evaluation rows
    sources: list[SourceRows] = field(default_factory=list)  # a mixture's, in spec order


def data_file(data: DataPlan, override: str | None) -> str | None:
    """The local data file to read (the launch path's QLC_DATA_PATH, else data.path)."""
    return existing_file(override or data.local_path, "data.path")


def existing_file(path: str | None, key: str) -> str | None:
    if path is None:
        return None
    if not Path(path).is_file():
        raise UserError(
            f"data file {path!r} not found (relative paths start at {Path.cwd()}; the "
            f"runtime passes the spec's {key})"
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


def hub_rows(
    hub_id: str,
    revision: str | None,
    split: str,
    token: str | None,
    config: str | None = None,
    data_files: list[str] | None = None,
) -> list[Row]:
    """A hub dataset's split (of its config, from some of its files); no hub (offline, a
    missing dataset) is a UserError."""
    import datasets

    try:
        dataset = datasets.load_dataset(
            hub_id, name=config, data_files=data_files, revision=revision, split=split, token=token
        )
    except Exception as error:  # network, authentication, unknown split: all the user's to fix
        raise UserError(
            f"cannot load dataset {hub_id!r} (split {split!r}) from the Hugging Face hub: "
            f"{_first_line(error)}\nfix: check the id, the split and access (HF_TOKEN as a "
            "runtime.secrets name), or use a local file as data.path"
        ) from None
    rows: list[Row] = dataset.to_list()
    return rows


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:300] if text else ''}"


def load_rows(
    plan: Plan,
    data_override: str | None,
    smoke_rows: int | None,
    input_paths: Mapping[str, str] | None = None,
) -> Rows:
    """Training and evaluation rows (an eval split, a seeded held-out fraction, or none)."""
    data = plan.data
    if data.sources:
        return mixture_rows(plan, smoke_rows, input_paths or {})
    path = data_file(data, data_override)
    token = os.environ.get("HF_TOKEN") or None
    if path is not None:
        # the format of the file read: an override (QLC_DATA_PATH) names its own by its suffix
        file_format = data_file_format(path) or data.file_format or "jsonl"
        rows, eval_rows = read_file(path, file_format), []
    else:
        hub_id, part = data.hub_id or "", (data.config, data.data_files)
        rows = hub_rows(hub_id, data.revision, data.split, token, *part)
        eval_rows = [] if data.eval_split is None else hub_rows(
            hub_id, data.revision, data.eval_split, token, *part)  # fmt: skip
    if smoke_rows is not None:
        rows, eval_rows = rows[:smoke_rows], eval_rows[: smoke_rows // 4]
    numbers, eval_numbers = list(range(1, len(rows) + 1)), list(range(1, len(eval_rows) + 1))
    if data.eval_fraction > 0:  # messages keep naming rows by their place in the file
        kept, held = held_out(len(rows), data.eval_fraction, random.Random(plan.job.seed))
        eval_rows, eval_numbers = [rows[i] for i in held], [i + 1 for i in held]
        rows, numbers = [rows[i] for i in kept], [i + 1 for i in kept]
    source = path or str(data.hub_id)
    if not rows:
        raise UserError(f"no training rows in {source!r}")
    return Rows(rows, eval_rows, source, path, numbers, eval_numbers)


def held_out(count: int, fraction: float, rng: random.Random) -> tuple[list[int], list[int]]:
    """(kept, held) indices of `count` rows: a seeded `fraction` of them (at least one) held
    out for evaluation, both in their original order."""
    order = list(range(count))
    rng.shuffle(order)
    held = set(order[: max(1, round(count * fraction))])
    return [i for i in range(count) if i not in held], sorted(held)


def source_rows(source: SourcePlan, key: str, input_paths: Mapping[str, str]) -> list[Row]:
    path = existing_file(input_paths.get(key) or source.local_path, key)
    if path is not None:
        return read_file(path, source.file_format or "jsonl")
    token = os.environ.get("HF_TOKEN") or None
    return hub_rows(source.hub_id or "", source.revision, source.split, token)


def weighted(rows: list[Row], weight: float, rng: random.Random) -> list[Row]:
    """The rows `weight` times: whole copies, then a seeded sample for the fraction."""
    whole, fraction = int(weight), weight - int(weight)
    sample = rng.sample(range(len(rows)), round(len(rows) * fraction)) if fraction else []
    return rows * whole + [rows[i] for i in sorted(sample)]


def mixture_rows(plan: Plan, smoke_rows: int | None, input_paths: Mapping[str, str]) -> Rows:
    """Every source read, its evaluation rows held out, its training rows weighted, and the
    training rows of all sources shuffled together (seeded by job.seed)."""
    data, seed = plan.data, plan.job.seed
    train: list[Row] = []
    evals: list[Row] = []
    read: list[SourceRows] = []
    for index, source in enumerate(data.sources):
        key = source_key(index)
        rows = source_rows(source, key, input_paths)
        rng = random.Random(f"qlc-mixture:{seed}:{index}")
        kept, held = (
            held_out(len(rows), data.eval_fraction, rng)
            if data.eval_fraction
            else (list(range(len(rows))), [])
        )
        taken = weighted([rows[i] for i in kept], source.weight, rng)
        train += taken
        evals += [rows[i] for i in held]
        path = input_paths.get(key) or source.local_path
        read.append(SourceRows(source, path or source.name, path, rows, len(taken), len(held)))
    random.Random(f"qlc-mixture:{seed}").shuffle(train)
    if smoke_rows is not None:
        train, evals = train[:smoke_rows], evals[: smoke_rows // 4]
    if not train:
        raise UserError("no training rows in data.sources: every source's weight took none")
    names = ", ".join(source.name for source in read)
    return Rows(train=train, eval=evals, source=f"data.sources ({names})", local_file=None,
                sources=read)  # fmt: skip


def head_rows(path: str, file_format: str, count: int) -> list[Row]:
    """The first `count` rows of a local data file, without reading the rest of a JSON lines
    file (what `qlc validate --inputs` looks at), parsed with the same rules and messages."""
    if file_format != "jsonl":
        return read_file(path, file_format)[:count]
    lines: list[str] = []
    found = 0
    try:
        with open(path, encoding="utf-8-sig") as handle:
            for line in handle:
                lines.append(line)
                found += bool(line.strip())
                if found >= count:
                    break
    except UnicodeDecodeError:
        return read_file(path, file_format)[:count]  # names the line of the bad byte
    except OSError as error:
        raise UserError(f"data file {path}: cannot read it: {error.strerror}") from None
    rows = _json(path, "".join(lines), file_format)
    if not rows:
        raise UserError(f"data file {path} is empty: it needs at least one row")
    return rows


def shown_rows(numbers: list[int]) -> str:
    """Row numbers for a message: the first few, and how many more."""
    head = ", ".join(str(n) for n in numbers[:MAX_SHOWN])
    more = len(numbers) - MAX_SHOWN
    return head + (f" and {more} more" if more > 0 else "")
