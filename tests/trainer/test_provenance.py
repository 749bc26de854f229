"""The manifest the trainer writes: the contract's schema from the first write on, the
effective settings of the plan that runs, the inputs' hashes, the adapter as subjects of a
succeeded run only, the records' hashes; and the atomic writes every record goes through."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any

import pytest
from trainer_support import TINY_DATA, TINY_MODEL

from qlc import contract
from qlc.compiler.plan import Plan
from qlc.trainer import provenance
from qlc.trainer.runenv import RunEnv


@pytest.fixture
def made(tiny_plan: Plan, tmp_path: Path) -> dict[str, Any]:
    env = RunEnv.read({contract.ENV_OUTPUT_DIR: str(tmp_path), contract.ENV_RUN_ID: "r-1"})
    return provenance.new_manifest(tiny_plan, "b" * 64, "c" * 64, env)


def test_a_new_manifest_follows_the_schema(made: dict[str, Any], tiny_plan: Plan) -> None:
    assert contract.manifest_problems(made) == []
    predicate = made["predicate"]
    assert predicate["status"] == "running" and made["subject"] == []
    assert predicate["spec"] == {"name": "specs/tiny.toml", "sha256": tiny_plan.spec_sha256}
    assert predicate["plan_sha256"] == "b" * 64 and predicate["lock_sha256"] == "c" * 64
    assert predicate["run"]["run_id"] == "r-1" and predicate["run"]["engine"] == "reference"
    environment = predicate["environment"]
    assert environment["packages"]["torch"] and environment["packages"]["trl"]
    assert environment["user"] == {"uid": os.getuid(), "gid": os.getgid()}
    assert environment["gpus"] == [] or environment["driver"]


def test_tracking_entries_are_checked_and_a_run_from_before_trackers_still_reads(
    made: dict[str, Any],
) -> None:
    assert made["predicate"]["tracking"] == []
    made["predicate"]["tracking"] = [{"tracker": "tensorboard"}]
    assert contract.manifest_problems(made) == ["predicate.tracking[0]: needs tracker, error"]
    del made["predicate"]["tracking"]
    assert contract.manifest_problems(made) == []


def test_the_effective_settings_are_the_plans_rows(made: dict[str, Any], tiny_plan: Plan) -> None:
    scaled = tiny_plan.schedule.for_world(2)
    plan = tiny_plan.model_copy(
        update={"train": tiny_plan.train.model_copy(update={"schedule": scaled})}
    )
    provenance.record_plan(made, plan)
    effective = made["predicate"]["effective"]
    definition = effective.pop("eval_loss_definition")  # tiny holds out 1/8: in words
    assert definition == contract.EVAL_LOSS_DEFINITION
    assert effective == {row.name: row.value for row in plan.settings()}
    assert effective["eval_metric"] == "token-weighted cross-entropy"
    assert effective["world_size"] == 2 and effective["examples_per_step"] == 8
    assert made["predicate"]["run"]["examples_per_step"] == 8
    assert made["predicate"]["run"]["grad_accum"] == 1


def test_the_adapter_is_a_subject_only_of_a_succeeded_run(
    made: dict[str, Any], tmp_path: Path
) -> None:
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_model.safetensors").write_bytes(b"weights")
    (tmp_path / contract.METRICS_FILE).write_text('{"loss": 1.0}\n')
    (tmp_path / contract.SAMPLE_FILE).write_text("{}")
    made["predicate"]["metrics"] = {"eval_loss": float("nan"), "steps": 3}
    provenance.finish_manifest(made, tmp_path, "failed", "boom")
    assert made["subject"] == [] and made["predicate"]["error"] == "boom"
    assert made["predicate"]["metrics"] == {"eval_loss": None, "steps": 3}  # NaN is no JSON
    provenance.finish_manifest(made, tmp_path, "succeeded", None)
    digest = contract.sha256_bytes(b"weights")
    assert made["subject"] == [
        {"name": "adapter/adapter_model.safetensors", "digest": {"sha256": digest}}
    ]
    assert made["predicate"]["records"] == {
        contract.METRICS_FILE: contract.sha256_file(tmp_path / contract.METRICS_FILE),
        contract.SAMPLE_FILE: contract.sha256_file(tmp_path / contract.SAMPLE_FILE),
    }
    assert made["predicate"]["run"]["finished_at"] and made["predicate"]["status"] == "succeeded"
    provenance.write_manifest(tmp_path, made)
    assert contract.read_manifest_file(tmp_path / contract.MANIFEST_FILE) == made


def test_local_inputs_are_recorded_with_their_files_hashes() -> None:
    model = provenance.input_record(None, None, str(TINY_MODEL), "model")
    assert model["id"] is None and model["path"] == str(TINY_MODEL)
    assert model["files"]["model.safetensors"] == contract.sha256_file(
        TINY_MODEL / "model.safetensors"
    )
    data = provenance.input_record(None, None, str(TINY_DATA), "dataset")
    assert data["files"] == {"data.jsonl": contract.sha256_file(TINY_DATA)}


def test_a_hub_input_missing_from_the_cache_keeps_its_revision(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    record = provenance.input_record("org/never-downloaded", "abc", None, "model")
    assert record == {"id": "org/never-downloaded", "revision": "abc", "path": None, "files": {}}


def test_a_manifest_that_breaks_the_schema_is_never_written(
    made: dict[str, Any], tmp_path: Path
) -> None:
    provenance.write_manifest(tmp_path, made)
    before = (tmp_path / contract.MANIFEST_FILE).read_bytes()
    made["predicate"]["status"] = "done"
    with pytest.raises(contract.ManifestError, match=r"predicate\.status: one of running"):
        provenance.write_manifest(tmp_path, made)
    assert (tmp_path / contract.MANIFEST_FILE).read_bytes() == before


# --- atomic writes --------------------------------------------------------------------------


def test_a_full_disk_keeps_the_old_file_and_leaves_no_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / contract.MANIFEST_FILE
    contract.write_json_atomic(target, {"status": "running"})

    def full_disk(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)  # the data is written, then the disk is full
    with pytest.raises(OSError, match="No space left"):
        contract.write_json_atomic(target, {"status": "succeeded"})
    monkeypatch.undo()
    assert json.loads(target.read_text()) == {"status": "running"}
    assert sorted(p.name for p in tmp_path.iterdir()) == [contract.MANIFEST_FILE]


def test_an_atomic_write_replaces_a_link_and_never_follows_it(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_text("keep me")
    target = tmp_path / "run" / contract.MANIFEST_FILE
    target.parent.mkdir()
    target.symlink_to(elsewhere)
    contract.write_bytes_atomic(target, b"new")
    assert not target.is_symlink() and target.read_bytes() == b"new"
    assert elsewhere.read_text() == "keep me"
    assert oct(target.stat().st_mode & 0o777) == "0o644"
