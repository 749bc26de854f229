"""qlc init: the format and field names detected from the data's first rows, the architecture
from the model, a commented spec that validates, never over an existing file, the next three
commands; and a spec it writes for the tiny model trains with `qlc run --local` unchanged."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from tiny_runs import call_cli

from qlc.compiler.context import plan_spec
from qlc.runtime.init_spec import InitError, init_spec

REPO = Path(__file__).resolve().parents[2]


def jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def planned(path: Path) -> Any:
    plan, warnings = plan_spec(path.read_bytes(), str(path))
    # nothing to warn about but a hub model's revision, which its comment asks for
    assert [w.key for w in warnings] == (["model.id"] if plan.model.hub_id else [])
    return plan


SHAREGPT = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]}
CASES = [
    ([SHAREGPT], "sharegpt", {"messages_field": "conversations", "loss": "completion"}),
    ([{"turns": [{"from": "user", "value": "Hi"}, {"from": "bot", "value": "Yo"}]}], "sharegpt",
     {"messages_field": "turns", "roles": {"bot": "assistant", "gpt": "assistant",
                                           "human": "user", "system": "system",
                                           "user": "user"}}),
    ([{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}],
     "chat", {"messages_field": "messages", "loss": "completion"}),
    ([{"dialog": [{"role": "user", "content": "Hi"}]}], "chat", {"messages_field": "dialog"}),
    ([{"instruction": "Add.", "input": "1 2", "output": "3"}, {"instruction": "Hi.", "input": "",
      "output": "Hello"}], "instruction",
     {"prompt_field": "instruction", "input_field": "input", "response_field": "output",
      "template": "alpaca", "loss": "completion"}),
    ([{"instruction": "Hi.", "output": "Hello"}], "instruction",
     {"input_field": None, "response_field": "output"}),
    ([{"prompt": "2+2?", "completion": "4"}], "instruction",
     {"prompt_field": "prompt", "response_field": "completion"}),
    ([{"id": 1, "text": "Once upon a time."}], "text", {"text_field": "text", "loss": "all"}),
    ([{"id": 1, "title": "A", "body": "A long story, told slowly."}], "text",
     {"text_field": "body"}),
]  # fmt: skip


@pytest.mark.parametrize(("rows", "format", "expected"), CASES)
def test_the_format_and_fields_are_detected_from_the_first_rows(
    tmp_path: Path, rows: list[Any], format: str, expected: dict[str, Any]
) -> None:
    written = init_spec(jsonl(tmp_path / "my data.jsonl", rows), "org/model", None)
    assert written.path == Path("my-data.toml") or written.path.name == "my-data.toml"
    plan = planned(written.path)
    assert plan.data.format == format and plan.data.local_path == "my data.jsonl"
    for key, value in expected.items():
        assert getattr(plan.data, key) == value, key
    written.path.unlink()


@pytest.fixture(autouse=True)
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)


def test_parquet_and_csv_are_read_too(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"question": "Why?", "answer": "So."}]), "q.parquet")
    assert planned(init_spec(Path("q.parquet"), None, None).path).data.prompt_field == "question"
    Path("c.csv").write_text("text,id\nhello there,1\n")
    assert planned(init_spec(Path("c.csv"), None, None).path).data.format == "text"


def test_a_local_model_s_config_names_the_architecture(tmp_path: Path) -> None:
    data = jsonl(tmp_path / "d.jsonl", [SHAREGPT])
    model = tmp_path / "models" / "l3"
    model.mkdir(parents=True)
    (model / "config.json").write_text(json.dumps({"model_type": "llama", "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0}}))  # fmt: skip
    plan = planned(init_spec(data, str(model), Path("a.toml")).path)
    assert plan.model.architecture == "llama3" and plan.model.local_path == "models/l3"
    (model / "config.json").write_text(json.dumps({"model_type": "gemma3_text"}))
    assert planned(init_spec(data, str(model), Path("b.toml")).path).model.architecture == "gemma3"
    (model / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(InitError, match="model_type 'bert' is not one qlc trains"):
        init_spec(data, str(model), Path("c.toml"))


@pytest.mark.parametrize(
    ("model", "architecture"),
    [("Qwen/Qwen3-8B", "qwen3"), ("meta-llama/Llama-3.1-8B-Instruct", "llama3"),
     ("google/gemma-2-9b-it", "gemma2"), ("microsoft/Phi-3-mini-4k-instruct", "phi3"),
     ("Qwen/Qwen2.5-7B-Instruct", "qwen2"), (None, "llama")],
)  # fmt: skip
def test_a_hub_model_s_architecture_comes_from_its_name(
    tmp_path: Path, model: str | None, architecture: str
) -> None:
    path = init_spec(jsonl(tmp_path / "d.jsonl", [SHAREGPT]), model, None).path
    plan = planned(path)
    assert plan.model.architecture == architecture and plan.model.hub_id is not None
    assert 'revision = "<commit sha>"' in path.read_text()  # said, as a comment


def test_an_existing_file_is_never_replaced(tmp_path: Path) -> None:
    data = jsonl(tmp_path / "d.jsonl", [SHAREGPT])
    Path("d.toml").write_text("mine")
    with pytest.raises(InitError, match=r"d\.toml exists: qlc init never replaces a file"):
        init_spec(data, None, None)
    assert Path("d.toml").read_text() == "mine"


def test_hostile_names_stay_values_or_are_refused(tmp_path: Path) -> None:
    odd = tmp_path / 'dé\x7f 😀 "q".jsonl'
    plan = planned(init_spec(jsonl(odd, [{"body\u2028x": "some text"}]), None,
                             Path("sub/dir/s.toml")).path)  # fmt: skip
    assert plan.data.local_path == str(odd) and plan.data.text_field == "body\u2028x"
    with pytest.raises(InitError, match="the detected values do not make a valid spec"):
        init_spec(jsonl(tmp_path / "n.jsonl", [{"te\x00xt": "a"}]), None, None)
    assert not Path("n.toml").exists()


def test_rows_of_no_known_shape_are_refused_with_what_qlc_reads(tmp_path: Path) -> None:
    with pytest.raises(InitError, match="cannot tell its format from the first rows"):
        init_spec(jsonl(tmp_path / "d.jsonl", [{"n": 1, "m": [1, 2]}]), None, None)


def test_without_data_the_spec_says_where_to_put_it(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = call_cli(["init"], capsys)
    assert code == 0, err
    assert out.splitlines()[0] == "finetune.toml: format 'chat' (no data file given)"
    assert "warning: no --data: put one JSON object per line in data.jsonl" in err
    assert planned(Path("finetune.toml")).data.local_path == "data.jsonl"
    code, _, err = call_cli(["validate", "--inputs", "finetune.toml"], capsys)
    assert code == 2 and "data.path = 'data.jsonl': no such file" in err


def test_every_key_is_commented_and_the_next_commands_printed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    jsonl(tmp_path / "x.jsonl", [SHAREGPT])
    code, out, _ = call_cli(["init", "--data", "x.jsonl", "-o", "spec.toml"], capsys)
    assert code == 0
    assert out.splitlines()[1:] == [
        "next:",
        "  qlc validate --inputs spec.toml",
        "  qlc data spec.toml",
        "  qlc run spec.toml --local",
    ]
    lines = Path("spec.toml").read_text().splitlines()
    keys = [i for i, line in enumerate(lines) if " = " in line and not line.startswith("#")]
    assert all(lines[i - 1].startswith("# ") for i in keys)
    code, _, err = call_cli(["init", "--data", "x.jsonl", "-o", "spec.toml"], capsys)
    assert code == 2 and "spec.toml exists" in err


@pytest.mark.slow
def test_init_for_the_tiny_model_trains_with_run_local_unchanged(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shutil.copytree(REPO / "specs" / "tiny" / "model", tmp_path / "specs" / "tiny" / "model")
    turns = [[{"from": "human", "value": f"What is {i} and {i}?"},
              {"from": "gpt", "value": f"{2 * i}."}, {"from": "human", "value": "Twice that?"},
              {"from": "gpt", "value": f"{4 * i}."}] for i in range(8)]  # fmt: skip
    jsonl(tmp_path / "x.jsonl", [{"conversations": t} for t in turns])
    code, _, err = call_cli(["init", "--data", "x.jsonl", "--model", "specs/tiny/model"], capsys)
    assert code == 0, err
    spec = Path("x.toml")
    before = spec.read_bytes()
    code, _, err = call_cli(["run", "x.toml", "--local"], capsys)
    assert code == 0, err[-3000:]
    assert spec.read_bytes() == before
    (run,) = (tmp_path / "runs" / "x").iterdir()
    predicate = json.loads((run / "manifest.json").read_text())["predicate"]
    assert predicate["status"] == "succeeded" and predicate["metrics"]["steps"] == 2
    assert predicate["effective"]["data_format"] == "sharegpt"
    report = json.loads((run / "data_report.json").read_text())["train"]
    assert report["examples"] == 8 and report["rows_without_text"] == 0
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
