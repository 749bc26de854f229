"""`qlc export --check`: the checks that need no training, against a real Docker daemon and a
real local registry, and the command line wiring them to the smoke run.

The image here is a small one made for the test (the offline base, /opt/venv and the image's
user, as templates/Dockerfile.j2 makes them) without the trainer: the output probe runs in
it, the smoke run of the job's command fails in it. Both steps also run in the session's
tiny image (the job's command trains): they pass where the job would work, and fail with the
probe's and the trainer's own words where the job's user cannot write the output."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from export_support import IMAGE, RUN_ID, guanaco_with_checkpoints, make_plan, with_store_inputs
from registry_fixture import local_registry  # noqa: F401  (the fixture)
from rich.console import Console
from runtime_fakes import copy_tiny_project, tiny_plan
from typer.testing import CliRunner

from qlc.contract import CONTAINER_UID, ENV_DATA_PATH, MANIFEST_FILE, read_manifest_file
from qlc.runtime.docker_engine import DockerEngine
from qlc.runtime.export import OUTPUT_MOUNT, export
from qlc.runtime.export_check import (
    Finding,
    archs_finding,
    memory_finding,
    output_finding,
    preflight,
    prepare_stand_in,
    smoke,
)
from qlc.runtime.records import BuildRecord

REPO_ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = """FROM {base}
RUN python3 -m venv --without-pip /opt/venv \\
    && groupadd --gid 10001 qlc && useradd --uid 10001 --gid 10001 --no-create-home qlc
USER 10001:10001
"""


@pytest.fixture(scope="module")
def probe_image(docker_ready: str) -> Iterator[str]:
    """An image with the job's Python and user, removed after the module."""
    engine = DockerEngine()
    tag = f"qlc-test/export-check:{uuid.uuid4().hex[:12]}"
    files = {"Dockerfile": DOCKERFILE.format(base=docker_ready).encode()}
    image_id = engine.build(files, tag, {}, {"qlc.test": "export-check"}, lambda line: None)
    yield tag
    import docker

    docker.from_env().images.remove(image_id, force=True)  # every tag, the pushed one too


def gcp_export(**changes: object) -> object:
    return export(make_plan("gs://b/runs"), IMAGE, "gcp-batch", run_id=RUN_ID,
                  project="qlc-test-project", **changes)  # fmt: skip


# --- output: the job's user against a stand-in for the output mount ---------------------------


@pytest.mark.docker
def test_output_is_writable_and_renamable_by_the_job_user(probe_image: str, tmp_path: Path) -> None:
    stand_in = tmp_path / "output"
    prepare_stand_in(stand_in)
    result = gcp_export()
    finding = output_finding(DockerEngine(), probe_image, result, stand_in)
    assert finding.ok is True, finding.detail
    assert f"/qlc/output/export-test.v1/{RUN_ID}" in finding.detail
    run_dir = stand_in / "export-test.v1" / RUN_ID
    assert run_dir.is_dir() and not any(run_dir.iterdir())  # the probe removed what it wrote
    assert run_dir.stat().st_uid == CONTAINER_UID


@pytest.mark.docker
def test_output_the_job_user_cannot_write_is_reported(probe_image: str, tmp_path: Path) -> None:
    stand_in = tmp_path / "output"
    stand_in.mkdir(mode=0o755)  # root's (or this user's), as a fresh file system's root is
    if os.geteuid() == CONTAINER_UID:
        pytest.skip("this user is the job's user")
    finding = output_finding(DockerEngine(), probe_image, gcp_export(), stand_in)
    assert finding.ok is False
    assert "cannot create the run directory: Permission denied" in finding.detail
    assert "(as 10001:10001)" in finding.detail


@pytest.mark.docker
def test_output_probe_without_the_image_python_is_reported(
    docker_ready: str, tmp_path: Path
) -> None:
    stand_in = tmp_path / "output"
    prepare_stand_in(stand_in)
    finding = output_finding(DockerEngine(), docker_ready, gcp_export(), stand_in)
    assert finding.ok is False and "the probe did not run in the image" in finding.detail


# --- what needs no container ------------------------------------------------------------------


def test_gpu_architectures_against_the_instance_gpu() -> None:
    plan = make_plan("gs://b/runs")
    assert "8.6" in plan.gpu_archs and "8.9" not in plan.gpu_archs
    assert archs_finding(plan, "L4").ok is True  # 8.6 code runs on 8.9
    old = archs_finding(plan, "V100")
    assert old.ok is False and 'add "7.0" to runtime.gpu_archs' in old.detail
    assert archs_finding(plan, None).ok is None
    assert archs_finding(make_plan("gs://b/runs", gpus=0), None).ok is True


def test_memory_estimate_against_the_instance_gpu() -> None:
    from qlc.compiler.context import plan_spec

    spec, _ = plan_spec((REPO_ROOT / "specs" / "guanaco.toml").read_bytes(), "guanaco.toml")
    assert memory_finding(spec, "H100").ok is True
    small = memory_finding(spec, "8GB card")
    assert small.ok is False and "is more than 8GB card's 8.0 GiB" in small.detail
    assert memory_finding(spec, "V100").ok is True  # 16 GiB: guanaco's 10.8 fit
    assert memory_finding(spec, "K80").ok is None  # no size in the GPU table
    assert memory_finding(spec, None).ok is None


def test_the_gpu_of_each_target_comes_from_its_instance_type_or_accelerator() -> None:
    plan = make_plan("gs://b/runs")
    assert gcp_export(instance_type="g2-standard-8").gpu == "L4"
    assert gcp_export().gpu == "A100-40GB"  # the default machine for one GPU
    assert export(plan, IMAGE, "skypilot", accelerator="H100").gpu == "H100"
    assert export(plan, IMAGE, "skypilot").gpu is None  # any GPU the image runs on


# --- the command line -------------------------------------------------------------------------


@pytest.mark.docker
def test_cli_check_runs_the_checks_then_the_smoke_run_and_writes_nothing_on_failure(
    probe_image: str,
    local_registry: str,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from qlc.cli import app
    from qlc.runtime.push import push

    reference = push(probe_image, f"{local_registry}/qlc/export-check").reference
    spec = guanaco_with_checkpoints(tmp_path, "gs://qlc-test-bucket/runs")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_TOKEN", "hf_check_secret_value")
    arguments = ["export", str(spec), "--target", "gcp-batch", "--image", reference,
                 "--instance-type", "g2-standard-8", "--project", "qlc-test-project",
                 "--check", "-o", str(tmp_path / "out")]  # fmt: skip
    done = CliRunner().invoke(app, arguments)
    output = done.output
    assert "ok   gpu-archs:" in output and "L4" in output
    assert "ok   memory: predicted" in output
    assert "ok   output: /qlc/output/guanaco-llama2-7b-chat/" in output
    assert "FAIL smoke: exit 2" in output  # the test image has no training script
    assert done.exit_code == 1 and not (tmp_path / "out").exists()
    assert "hf_check_secret_value" not in output
    logs = list((tmp_path / "export" / "guanaco-llama2-7b-chat").glob("check-*.log"))
    assert len(logs) == 1 and "hf_check_secret_value" not in logs[0].read_text()


# --- export --check against the tiny image (a trainer that runs) ------------------------------


def check_of(image: str, tmp_path: Path, where: str, writable: bool) -> tuple[list[Finding], Path]:
    """export --check's two steps (preflight, then the smoke run) for a kubernetes job of the
    tiny spec in the tiny image, its volume standing in at `where`. The tiny image reads a
    local data file: the test puts it on the volume and points the job's QLC_DATA_PATH at it
    (a job's volume could hold it so)."""
    spec = copy_tiny_project(tmp_path / where / "project")
    plan = tiny_plan(spec)
    result = export(with_store_inputs(plan), IMAGE, "kubernetes", volume="qlc-runs", retries=0)
    stand_in = tmp_path / where / "output"
    if writable:
        prepare_stand_in(stand_in)
    else:
        stand_in.mkdir(mode=0o755)  # root's (or this user's), as a fresh file system's root is
    shutil.copy(spec.parent / "tiny" / "data.jsonl", stand_in / "data.jsonl")
    (stand_in / "data.jsonl").chmod(0o644)
    job = replace(result, env={**result.env, ENV_DATA_PATH: f"{OUTPUT_MOUNT}/data.jsonl"})
    engine, log = DockerEngine(), tmp_path / where / "smoke.log"
    findings = preflight(plan, job, engine, image, stand_in)
    findings.append(smoke(engine, image, plan, job, stand_in, {}, log, Console(quiet=True)))
    return findings, stand_in / result.run_dir.removeprefix(OUTPUT_MOUNT + "/")


@pytest.mark.docker
@pytest.mark.slow
def test_check_passes_and_trains_the_job_command_in_the_tiny_image_as_the_job_user(
    tiny_image: BuildRecord, tmp_path: Path
) -> None:
    findings, run_dir = check_of(tiny_image.tag, tmp_path, "ok", writable=True)
    checks = [(finding.check, finding.ok) for finding in findings]
    assert checks == [("gpu-archs", True), ("memory", True), ("output", True), ("smoke", True)]
    record = read_manifest_file(run_dir / MANIFEST_FILE)["predicate"]
    assert record["status"] == "succeeded" and record["run"]["smoke"] is True
    assert record["environment"]["user"] == {"uid": CONTAINER_UID, "gid": CONTAINER_UID}
    assert run_dir.stat().st_uid == CONTAINER_UID


@pytest.mark.docker
@pytest.mark.slow
def test_check_fails_clearly_where_the_job_user_cannot_write_the_output(
    tiny_image: BuildRecord, tmp_path: Path
) -> None:
    if os.geteuid() == CONTAINER_UID:
        pytest.skip("this user is the job's user")
    (*_, output, smoked), run_dir = check_of(tiny_image.tag, tmp_path, "locked", writable=False)
    assert output.ok is False and "cannot create the run directory" in output.detail, output
    assert smoked.ok is False and smoked.detail.startswith("exit 2, a user error"), smoked
    assert f"cannot create the run directory /qlc/output/{run_dir.parent.parent.name}" in (
        smoked.detail
    )
    assert "Permission denied (as uid 10001, gid 10001)" in smoked.detail
    assert not run_dir.exists()
