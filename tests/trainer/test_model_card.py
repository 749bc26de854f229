"""The model card: a YAML header that parses, the base model named as what it is (a hub id, or a
local folder that is no hub id), the run's effective settings and substitutions, sizes people
read (GiB), and the run's real hashes.

The run directory here is assembled from real parts (compiled plans, adapter-like files, metrics
lines, a data report) without training, so these tests take milliseconds; test_recipe checks a
card written next to a trained adapter.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st
from trainer_support import edited_spec, plan_of

from qlc import contract
from qlc.compiler.plan import Plan
from qlc.trainer import provenance
from qlc.trainer.model_card import write_model_card, yaml_string


@pytest.fixture(scope="module")
def hub_plan() -> Plan:
    """The guanaco spec (a hub model and dataset) with train.memory = "lean": substitutions."""
    source = edited_spec("guanaco.toml", {"[train]\n": '[train]\nmemory = "lean"\n'})
    return plan_of("guanaco.toml", source)


def make_run(
    run: Path, plan: Plan, model: dict[str, Any], data: dict[str, Any], **metrics: Any
) -> dict[str, Any]:
    adapter = run / contract.ADAPTER_DIR
    adapter.mkdir(parents=True)
    (adapter / "adapter_model.safetensors").write_bytes(b"weights of this test")
    (adapter / "adapter_config.json").write_text('{"r": 8}')
    records = [{"event": "train", "step": s, "loss": 3.0 - s / 10} for s in range(1, 6)]
    records.append({"event": "eval", "step": 5, "eval_loss": 2.7})
    (run / contract.METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in records))
    report = {"split": "train", "rows": 56, "examples": 56, "truncated": 3}
    (run / contract.DATA_REPORT_FILE).write_text(json.dumps({"train": report, "eval": None}))
    manifest: dict[str, Any] = {
        "subject": [],
        "predicate": {
            "qlc_version": "0.1.0",
            "spec": {"name": plan.spec_name, "sha256": "a" * 64},
            "plan_sha256": "b" * 64,
            "lock_sha256": None,
            "inputs": {"model": model, "data": data},
            "run": {"seed": 42, "deterministic": True},
            "metrics": {"final_loss": 2.6, "eval_loss": 2.7, "train_seconds": 1.5, **metrics},
            "image": {"id": None, "digest": None, "base": None},
            "substitutions": [s.model_dump(mode="json") for s in plan.substitutions],
            "effective": provenance.effective_settings(plan),
        },
    }
    return manifest


def split_card(text: str) -> tuple[dict[str, Any], str]:
    assert text.startswith("---\n")
    header, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(header), body


def test_card_names_the_hub_base_model_dataset_and_every_hash(
    tmp_path: Path, hub_plan: Plan
) -> None:
    model = {
        "id": "NousResearch/Llama-2-7b-chat-hf",
        "revision": "0123abcd",
        "path": None,
        "files": {},
    }
    data = {"id": "mlabonne/guanaco-llama2-1k", "revision": "r1", "path": None, "files": {}}
    card = write_model_card(tmp_path, hub_plan, make_run(tmp_path, hub_plan, model, data))

    assert card == tmp_path / "adapter" / "README.md"
    header, body = split_card(card.read_text(encoding="utf-8"))
    assert header["base_model"] == "NousResearch/Llama-2-7b-chat-hf"
    assert header["library_name"] == "peft" and header["pipeline_tag"] == "text-generation"
    assert header["datasets"] == ["mlabonne/guanaco-llama2-1k"]
    assert {"qlora", "qlc", "base_model:adapter:NousResearch/Llama-2-7b-chat-hf"} <= set(
        header["tags"]
    )
    weights = (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes()
    assert f"sha256:{contract.sha256_bytes(weights)}" in body
    assert "sha256:" + "b" * 64 in body  # the plan
    assert "sha256:" + "a" * 64 in body  # the spec
    assert "| lock | none |" in body  # no lock: said so, never "sha256: None"
    assert "0123abcd" in body
    assert "qlc reproduce manifest.json" in body
    assert "| final\\_loss | 2.6 |" in body and "| train\\_seconds | 1.5 |" in body
    assert "| lora\\_r | 64 |" in body  # the effective settings
    assert "| optimizer | paged\\_adamw\\_8bit |" in body
    assert "Substitutions (asked for by the spec):" in body
    assert "| train.optimizer | paged\\_adamw\\_32bit | paged\\_adamw\\_8bit |" in body
    assert "| truncated | 3 |" in body  # the data report
    assert "![training loss](loss.svg)" in body
    assert (tmp_path / "adapter" / "loss.svg").read_text().startswith("<svg")


def test_a_local_base_model_is_no_hub_id_and_lists_its_file_hashes(
    tmp_path: Path, tiny_plan: Plan
) -> None:
    files = {"model.safetensors": "d" * 64, "config.json": "e" * 64}
    model = {"id": None, "revision": None, "path": "/inputs/model", "files": files}
    data = {
        "id": None,
        "revision": None,
        "path": "/inputs/data/data.jsonl",
        "files": {"data.jsonl": "f" * 64},
    }
    card = write_model_card(tmp_path, tiny_plan, make_run(tmp_path, tiny_plan, model, data))
    header, body = split_card(card.read_text())
    assert "base_model" not in header  # "tiny/model" is a folder, not a hub id
    assert not any(tag.startswith("base_model:") for tag in header["tags"])
    assert header["datasets"] == ["data.jsonl"]
    assert "on the local model folder `model`" in body
    assert "| base model | /inputs/model |" in body
    assert "| base model file model.safetensors | sha256:" + "d" * 64 in body
    assert "| data file data.jsonl | sha256:" + "f" * 64 in body
    assert "Substitutions" not in body  # the tiny spec asks for none


def test_memory_shows_in_gib(tmp_path: Path, tiny_plan: Plan) -> None:
    model = {"id": None, "revision": None, "path": "m", "files": {}}
    manifest = make_run(tmp_path, tiny_plan, model, {"files": {}}, peak_memory_bytes=786345984)
    body = write_model_card(tmp_path, tiny_plan, manifest).read_text()
    assert "| peak\\_memory\\_bytes | 0.73 GiB |" in body and "786345984" not in body


def test_hostile_strings_stay_inside_their_yaml_values(tmp_path: Path, hub_plan: Plan) -> None:
    hostile = 'org/x"\n---\nlibrary_name: evil\n\u2028\x85 \U0001f600 \\'
    plan = hub_plan.model_copy(
        update={
            "model": hub_plan.model.model_copy(update={"hub_id": hostile}),
            "data": hub_plan.data.model_copy(update={"hub_id": "a: b # c"}),
        }
    )
    model = {"id": hostile, "revision": None, "path": None, "files": {}}
    manifest = make_run(tmp_path, plan, model, {"id": "a: b # c", "files": {}})
    header, body = split_card(write_model_card(tmp_path, plan, manifest).read_text())
    assert header["base_model"] == hostile
    assert header["library_name"] == "peft"
    assert header["datasets"] == ["a: b # c"]
    assert "\n---\nlibrary_name: evil" not in body


def test_no_plot_without_two_losses(tmp_path: Path, tiny_plan: Plan) -> None:
    model = {"id": None, "revision": None, "path": "m", "files": {}}
    manifest = make_run(tmp_path, tiny_plan, model, {"files": {}})
    (tmp_path / contract.METRICS_FILE).write_text(
        '{"event": "train", "step": 1, "loss": 1.0}\nnot json\n'
    )
    body = write_model_card(tmp_path, tiny_plan, manifest).read_text()
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
