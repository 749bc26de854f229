"""`qlc export` on the command line: what it writes, what it prints, how it refuses."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from export_support import (
    GUANACO,
    IMAGE,
    ROLE,
    guanaco_with_checkpoints,
    validate_aws,
    validate_kubernetes,
)
from typer.testing import CliRunner

from qlc.cli import UserError, app
from qlc.compiler.context import compile_spec

REPO_ROOT = Path(__file__).resolve().parents[2]
EFS = ["--volume", "fs-0123456789abcdef0", "--efs-access-point", "fsap-0123456789abcdef0",
       "--execution-role", ROLE]  # fmt: skip


def test_export_writes_a_jobset_and_prints_the_run_directory_and_requirements(
    tmp_path: Path,
) -> None:
    spec = guanaco_with_checkpoints(tmp_path)
    arguments = ["export", str(spec), "--target", "kubernetes", "--image", IMAGE, "--nodes",
                 "2", "--volume", "qlc-runs", "-o", str(tmp_path / "out")]  # fmt: skip
    done = CliRunner().invoke(app, arguments)
    assert done.exit_code == 0, done.output
    jobset = validate_kubernetes((tmp_path / "out" / "job.yaml").read_text(encoding="utf-8"))
    run_id = jobset.metadata.labels["qlc.dev/run-id"]
    run_dir = f"runs/guanaco-llama2-7b-chat/{run_id}"
    assert f"run id: {run_id}" in done.output
    assert f"run directory: PVC qlc-runs: {run_dir} (/qlc/output/{run_dir} in the job)" in (
        done.output
    )
    assert "REQUIRED: the PVC qlc-runs must be ReadWriteMany" in done.output


def test_two_exports_of_one_spec_write_two_run_directories(tmp_path: Path) -> None:
    spec = guanaco_with_checkpoints(tmp_path)
    dirs = []
    for out in ("a", "b"):
        arguments = ["export", str(spec), "--target", "kubernetes", "--image", IMAGE,
                     "--volume", "qlc-runs", "-o", str(tmp_path / out)]  # fmt: skip
        done = CliRunner().invoke(app, arguments)
        assert done.exit_code == 0, done.output
        job = yaml.safe_load((tmp_path / out / "job.yaml").read_text(encoding="utf-8"))
        env = {e["name"]: e.get("value") for e in job["spec"]["template"]["spec"]["containers"][0]
               ["env"]}  # fmt: skip
        dirs.append(env["QLC_OUTPUT_DIR"])
    assert dirs[0] != dirs[1]


def test_export_refuses_retries_without_checkpoints_with_exit_2(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "qlc", "export", str(GUANACO), "--target", "kubernetes",
         "--image", IMAGE, "--volume", "qlc-runs", "-o", str(tmp_path / "out")],
        capture_output=True, text=True, cwd=tmp_path, check=False,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "train.save_steps" in done.stderr and "--retries 0" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "out").exists()
    done = subprocess.run(
        [sys.executable, "-m", "qlc", "export", str(GUANACO), "--target", "kubernetes",
         "--image", IMAGE, "--volume", "qlc-runs", "--retries", "0", "-o", str(tmp_path / "out")],
        capture_output=True, text=True, cwd=tmp_path, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    job = yaml.safe_load((tmp_path / "out" / "job.yaml").read_text(encoding="utf-8"))
    assert job["spec"]["backoffLimit"] == 0


def test_export_refuses_a_local_input_with_exit_2(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "qlc", "export", str(REPO_ROOT / "specs" / "tiny.toml"),
         "--target", "skypilot", "--image", IMAGE, "-o", str(tmp_path / "out")],
        capture_output=True, text=True, cwd=tmp_path, check=False,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "a local input" in done.stderr and "model.path = 'tiny/model'" in done.stderr
    assert not (tmp_path / "out").exists()


def test_object_store_inputs_export_and_need_the_network(tmp_path: Path) -> None:
    from qlc.runtime.export import export
    from qlc.runtime.launch import LocalInputs, needs_network

    text = (REPO_ROOT / "specs" / "tiny.toml").read_text(encoding="utf-8")
    text = text.replace('path = "tiny/model"', 'path = "s3://qlc-bucket/tiny/model"')
    text = text.replace('path = "tiny/data.jsonl"', 'path = "az://qlc-container/data.jsonl"')
    text = text.replace('name = "tiny"', 'name = "tiny"\noutput_dir = "s3://qlc-bucket/runs"')
    plan = compile_spec(text.encode(), "tiny-s3.toml", require_lock=False).plan
    assert plan.model.local_path is None and plan.object_stores == ["az://", "s3://"]
    assert needs_network(plan, LocalInputs(None, None, None))
    result = export(plan, IMAGE, "skypilot", retries=0)  # the job downloads them itself
    assert "QLC_DATA_PATH" not in result.env and "QLC_MODEL_PATH" not in result.env


def test_export_refuses_a_tag_with_exit_2(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "qlc", "export", str(GUANACO), "--target", "gcp-batch",
         "--image", "registry.example.com/qlc/guanaco:latest", "-o", str(tmp_path)],
        capture_output=True, text=True, cwd=tmp_path, check=False,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "has no digest" in done.stderr and "Traceback" not in done.stderr
    assert not list(tmp_path.iterdir())


def test_export_uses_the_pushed_digest_of_the_build_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from qlc.runtime import records

    spec = guanaco_with_checkpoints(tmp_path)
    plan = compile_spec(spec.read_bytes(), str(spec), require_lock=False).plan
    record = records.BuildRecord(
        job=plan.job.name, tag="qlc/guanaco:abc", image_id="sha256:" + "1" * 64,
        image_key="k", context_hash="sha256:x", context_dir="/x", spec_path=str(spec),
        spec_sha256=plan.spec_sha256, lock_sha256=None, base_image="b",
        base_image_overridden=False, base_image_id=None, base_image_digests=[],
        qlc_version="0.1.0", built_at="2026-11-26T00:00:00Z", build_seconds=1.0,
        cache_hit=False, log_path=None, registry_digest=IMAGE, pushed_ref="x:abc",
    )  # fmt: skip
    records.save_build(tmp_path, record)
    monkeypatch.chdir(tmp_path)
    done = CliRunner().invoke(app, ["export", str(spec), "--target", "skypilot"])
    assert isinstance(done.exception, UserError)  # a local "runs": skypilot needs a bucket
    assert "local path" in str(done.exception)
    done = CliRunner().invoke(app, ["export", str(spec), "--target", "aws-batch", *EFS])
    assert done.exit_code == 0, done.output
    written = tmp_path / "export" / record.job / "aws-batch" / "job-definition.json"
    definition = validate_aws("job-definition.json", written.read_text(encoding="utf-8"))
    assert definition["containerProperties"]["image"] == IMAGE
    assert "run directory: EFS fs-0123456789abcdef0 (access point fsap-" in done.output


def test_export_help_documents_the_options() -> None:
    done = CliRunner().invoke(app, ["export", "--help"], terminal_width=200)
    assert done.exit_code == 0
    for option in ("--efs-access-point", "--job-role", "--spot", "--check", "--retries",
                   "--nodes", "--volume"):  # fmt: skip
        assert option in done.output
    assert "ReadWriteMany" in done.output and "train.save_steps" in done.output
