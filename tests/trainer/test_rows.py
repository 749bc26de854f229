"""Rows: every local data format read with the standard library (and pyarrow), and every
unreadable file a UserError naming the file and the line or row (issue 19); the split rules."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from trainer_support import plan_of

from qlc.compiler.plan import Plan
from qlc.trainer.errors import UserError
from qlc.trainer.rows import data_file, load_rows, read_file, shown_rows

ROWS = [{"text": "first row"}, {"text": 'second, with "quotes"'}, {"text": "third ü"}]


def write_parquet(path: Path, rows: list[dict[str, Any]]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def with_data(plan: Plan, **data: Any) -> Plan:
    return plan.model_copy(update={"data": plan.data.model_copy(update=data)})


# --- readable files ---------------------------------------------------------------------------


def test_every_format_reads_the_same_rows(tmp_path: Path) -> None:
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n\n", encoding="utf-8")
    array = tmp_path / "rows.json"
    array.write_text(json.dumps(ROWS, indent=2), encoding="utf-8")
    csv = tmp_path / "rows.csv"
    csv.write_text('text\nfirst row\n"second, with ""quotes"""\nthird ü\n', encoding="utf-8")
    parquet = write_parquet(tmp_path / "rows.parquet", ROWS)
    assert read_file(str(jsonl), "jsonl") == ROWS
    assert read_file(str(array), "json") == ROWS
    assert read_file(str(csv), "csv") == ROWS
    assert read_file(str(parquet), "parquet") == ROWS


def test_a_byte_order_mark_and_json_lines_in_a_json_file_are_read(tmp_path: Path) -> None:
    path = tmp_path / "rows.json"  # .json holding one object per line, as exporters write it
    path.write_bytes(b"\xef\xbb\xbf" + "\n".join(json.dumps(r) for r in ROWS).encode())
    assert read_file(str(path), "json") == ROWS


# --- unreadable files: UserError naming the file and where --------------------------------------


UNREADABLE = [
    ("empty.jsonl", b"", "jsonl", r"empty\.jsonl is empty: it needs at least one row"),
    ("blank.jsonl", b"  \n\t\n \n", "jsonl", r"blank\.jsonl is empty"),
    (
        "broken.jsonl",
        b'{"text": "ok"}\n{"text": "ok"}\n{"text": oops}\n',
        "jsonl",
        r"broken\.jsonl:3: not a JSON line: Expecting value",
    ),
    (
        "latin1.jsonl",
        b'{"text": "ok"}\n{"text": "caf\xe9"}\n',
        "jsonl",
        r"latin1\.jsonl:2: not UTF-8 text \(byte 0xe9 at offset 28\): save the file as UTF-8",
    ),
    (
        "list.jsonl",
        b'{"text": "ok"}\n["text", "a list"]\n',
        "jsonl",
        r"list\.jsonl:2: a row must be a JSON object, got list",
    ),
    (
        "number.jsonl",
        b'{"text": "ok"}\n\n7\n',
        "jsonl",
        r"number\.jsonl:3: a row must be a JSON object, got int",
    ),
    (
        "array.json",
        b'[{"text": "ok"}, "a string"]',
        "json",
        r"array\.json: element 1 must be a JSON object, got str",
    ),
    ("bad.json", b'[{"text": "ok"},\n {"text": }]', "json", r"bad\.json:2: not valid JSON"),
    (
        "wide.csv",
        b'text\nok\n"one","two"\n',
        "csv",
        r"wide\.csv:3: more values than the header has columns",
    ),
    (
        "corrupt.parquet",
        b"PAR1 this is not parquet PAR1",
        "parquet",
        r"corrupt\.parquet: not a readable parquet file",
    ),
    ("header.csv", b"text\n", "csv", r"header\.csv has no rows"),
]


@pytest.mark.parametrize(
    ("name", "content", "file_format", "message"), UNREADABLE, ids=[c[0] for c in UNREADABLE]
)
def test_unreadable_data_names_the_file_and_line(
    tmp_path: Path, name: str, content: bytes, file_format: str, message: str
) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(UserError, match=message) as caught:
        read_file(str(path), file_format)
    assert str(path) in str(caught.value)


def test_a_truncated_parquet_file_is_a_user_error(tmp_path: Path) -> None:
    whole = write_parquet(tmp_path / "whole.parquet", ROWS * 50).read_bytes()
    cut = tmp_path / "cut.parquet"
    cut.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(UserError, match=r"cut\.parquet: not a readable parquet file"):
        read_file(str(cut), "parquet")


def test_an_unreadable_path_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"cannot read it: Is a directory"):
        read_file(str(tmp_path), "jsonl")


def test_a_missing_data_file_names_where_relative_paths_start(
    tiny_plan: Plan, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        UserError,
        match=rf"'tiny/data\.jsonl' not found \(relative paths start at "
        rf"{tmp_path}",
    ):
        data_file(tiny_plan.data, None)
    override = tmp_path / "mine.jsonl"
    override.write_text('{"text": "x"}\n')
    assert data_file(tiny_plan.data, str(override)) == str(override)  # QLC_DATA_PATH wins


# --- splits ----------------------------------------------------------------------------------


def test_eval_fraction_holds_out_a_seeded_disjoint_share(tiny_plan: Plan, tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(20)))
    plan = with_data(tiny_plan, eval_fraction=0.25)
    rows = load_rows(plan, str(path), None)
    assert (len(rows.train), len(rows.eval)) == (15, 5)
    assert {r["text"] for r in rows.train}.isdisjoint(r["text"] for r in rows.eval)
    assert load_rows(plan, str(path), None) == rows  # seeded by job.seed
    reseeded = plan.model_copy(update={"job": plan.job.model_copy(update={"seed": 7})})
    assert load_rows(reseeded, str(path), None).eval != rows.eval
    assert rows.source == rows.local_file == str(path)
    for split, numbers in ((rows.train, rows.train_numbers), (rows.eval, rows.eval_numbers)):
        assert [row["text"] for row in split] == [f"row {n - 1}" for n in numbers]  # file rows
    whole = load_rows(with_data(tiny_plan, eval_fraction=0.0), str(path), None)
    assert len(whole.train) == 20 and whole.eval == []


def test_the_smoke_mode_reads_the_first_rows(tiny_plan: Plan, tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(100)))
    rows = load_rows(with_data(tiny_plan, eval_fraction=0.0), str(path), 8)
    assert [r["text"] for r in rows.train] == [f"row {i}" for i in range(8)]


def test_hub_data_reads_the_split_and_eval_split_at_the_revision(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import datasets

    calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def load_dataset(*args: Any, **kwargs: Any) -> Any:
        calls.append((args, kwargs))
        return datasets.Dataset.from_list([{"text": kwargs["split"]}])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    plan = plan_of("guanaco.toml")
    plan = with_data(plan, revision="r1", eval_split="test")
    rows = load_rows(plan, None, None)
    assert [(a, k["revision"], k["split"], k["token"]) for a, k in calls] == [
        (("mlabonne/guanaco-llama2-1k",), "r1", "train", "hf_test_token"),
        (("mlabonne/guanaco-llama2-1k",), "r1", "test", "hf_test_token"),
    ]
    assert rows.train == [{"text": "train"}] and rows.eval == [{"text": "test"}]
    assert rows.source == "mlabonne/guanaco-llama2-1k" and rows.local_file is None


def test_a_hub_dataset_config_and_files_reach_the_library(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import datasets

    calls: list[dict[str, Any]] = []

    def load_dataset(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs)
        return datasets.Dataset.from_list([{"text": kwargs["split"]}])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    plan = with_data(plan_of("guanaco.toml"), config="en", data_files=["train/*.parquet"])
    load_rows(plan, None, None)
    assert [(k["name"], k["data_files"]) for k in calls] == [("en", ["train/*.parquet"])]


def test_no_hub_is_a_user_error_with_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    def offline(*args: Any, **kwargs: Any) -> Any:
        raise ConnectionError("Couldn't reach 'mlabonne/guanaco-llama2-1k' on the Hub\nmore")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(UserError) as caught:
        load_rows(plan_of("guanaco.toml"), None, None)
    message = str(caught.value)
    assert "cannot load dataset 'mlabonne/guanaco-llama2-1k' (split 'train')" in message
    assert "ConnectionError: Couldn't reach" in message and "more" not in message
    assert "use a local file as data.path" in message


def test_shown_rows_names_the_first_five() -> None:
    assert shown_rows([3]) == "3"
    assert shown_rows(list(range(1, 9))) == "1, 2, 3, 4, 5 and 3 more"
