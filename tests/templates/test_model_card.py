"""The model card: a YAML header that parses, the right base model, the run's real hashes.

The run directory here is assembled from real parts (the tiny spec's compiled plan, adapter-like
files, metrics lines, a data report) without training, so these tests run in milliseconds; the
slow runtime tests check a card written next to a trained adapter.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from qlc.compiler.context import compile_spec
from qlc.templates.model_card import write_model_card, yaml_string

REPO = Path(__file__).resolve().parents[2]


def tiny_plan() -> dict[str, Any]:
    spec = REPO / "specs" / "tiny.toml"
    lock = spec.with_suffix(".lock")
    context = compile_spec(spec.read_bytes(), "specs/tiny.toml", lock.read_bytes())
    return json.loads(context.files["plan.json"])


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_run(tmp_path: Path, model: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"weights of this test")
    (adapter / "adapter_config.json").write_text('{"r": 8}')
    records = [{"event": "train", "step": s, "loss": 3.0 - s / 10} for s in range(1, 6)]
    records.append({"event": "eval", "step": 5, "eval_loss": 2.7})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    report = {"split": "train", "rows": 56, "examples": 56, "truncated": 3}
    (tmp_path / "data_report.json").write_text(json.dumps({"train": report, "eval": None}))
    return {
        "subject": [],
        "predicate": {
            "qlc_version": "0.1.0",
            "spec": {"name": "specs/tiny.toml", "sha256": "a" * 64},
            "plan_sha256": "b" * 64,
            "lock_sha256": "c" * 64,
            "inputs": {"model": model, "data": data},
            "run": {"seed": 42, "deterministic": True},
            "metrics": {"final_loss": 2.6, "eval_loss": 2.7, "train_seconds": 1.5},
            "image": {"id": None, "digest": None, "base": None},
        },
    }


def split_card(text: str) -> tuple[dict[str, Any], str]:
    assert text.startswith("---\n")
    header, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(header), body


def test_card_names_the_hub_base_model_dataset_and_every_hash(tmp_path: Path) -> None:
    model = {"id": "org/base-7b", "revision": "0123abcd", "path": None, "files": {}}
    data = {"id": "org/chat-data", "revision": "r1", "path": None, "files": {}}
    manifest = make_run(tmp_path, model, data)
    card = write_model_card(tmp_path, tiny_plan(), manifest)

    assert card == tmp_path / "adapter" / "README.md"
    header, body = split_card(card.read_text(encoding="utf-8"))
    assert header["base_model"] == "org/base-7b"
    assert header["library_name"] == "peft"
    assert header["datasets"] == ["org/chat-data"]
    assert {"qlora", "qlc"} <= set(header["tags"])
    assert header["pipeline_tag"] == "text-generation"
    weights = (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes()
    assert f"sha256:{sha(weights)}" in body
    assert "sha256:" + "b" * 64 in body  # the plan
    assert "sha256:" + "a" * 64 in body  # the spec
    assert "0123abcd" in body
    assert "qlc reproduce manifest.json" in body
    assert "2.6" in body and "train\\_seconds" in body  # final metrics
    assert "lora.r | 8" in body  # the spec's hyperparameters
    assert "truncated | 3" in body  # the data report
    assert "![training loss](loss.svg)" in body
    assert (tmp_path / "adapter" / "loss.svg").read_text().startswith("<svg")


def test_local_base_model_lists_its_file_hashes(tmp_path: Path) -> None:
    files = {"model.safetensors": "d" * 64, "config.json": "e" * 64}
    model = {"id": None, "revision": None, "path": "/inputs/model", "files": files}
    data = {
        "id": None,
        "revision": None,
        "path": "/inputs/data/x.jsonl",
        "files": {"x.jsonl": "f" * 64},
    }
    plan = tiny_plan()
    header, body = split_card(
        write_model_card(tmp_path, plan, make_run(tmp_path, model, data)).read_text()
    )
    assert header["base_model"] == plan["spec"]["model"]["path"]
    assert header["datasets"] == ["x.jsonl"]
    assert "model.safetensors | sha256:" + "d" * 64 in body
    assert "x.jsonl | sha256:" + "f" * 64 in body


def test_hostile_strings_stay_inside_their_yaml_values(tmp_path: Path) -> None:
    hostile = 'org/x"\n---\nlibrary_name: evil\n\u2028\x85 \U0001f600 \\'
    model = {"id": hostile, "revision": None, "path": None, "files": {}}
    data = {"id": "a: b # c", "revision": None, "path": None, "files": {}}
    header, _ = split_card(
        write_model_card(tmp_path, tiny_plan(), make_run(tmp_path, model, data)).read_text()
    )
    assert header["base_model"] == hostile
    assert header["library_name"] == "peft"
    assert header["datasets"] == ["a: b # c"]


def test_no_plot_without_two_losses(tmp_path: Path) -> None:
    model = {"id": "org/m", "revision": None, "path": None, "files": {}}
    manifest = make_run(tmp_path, model, {"id": "org/d", "files": {}})
    (tmp_path / "metrics.jsonl").write_text(
        '{"event": "train", "step": 1, "loss": 1.0}\nnot json\n'
    )
    body = write_model_card(tmp_path, tiny_plan(), manifest).read_text()
    assert "loss.svg" not in body
    assert not (tmp_path / "adapter" / "loss.svg").exists()


@given(st.text())
def test_yaml_string_round_trips(value: str) -> None:
    if any(0xD800 <= ord(c) <= 0xDFFF for c in value):  # lone surrogates are no text
        return
    assert yaml.safe_load(f"key: {yaml_string(value)}") == {"key": value}
    assert yaml_string(value).isascii()


@pytest.mark.parametrize("value", ["", "null", "true", "1.0", "- x", "[a]", "{a: 1}", "&a *a !t"])
def test_yaml_string_keeps_yaml_keywords_as_strings(value: str) -> None:
    assert yaml.safe_load(f"key: {yaml_string(value)}") == {"key": value}
