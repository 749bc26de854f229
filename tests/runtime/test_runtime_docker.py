"""The whole runtime against a real daemon: `qlc build` + `qlc run` of the tiny spec on CPU in
a container, reproduce, and the faults it must survive. The image is built once per session
(tiny_image); each run trains the tiny model for 12 steps (about a minute on 2 cores)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from runtime_fakes import copy_tiny_project, tiny_inputs

from qlc.runtime.docker_engine import ContainerRequest, DockerEngine
from qlc.runtime.inputs import HEAD_ROWS
from qlc.runtime.records import BuildRecord, last_build
from qlc.runtime.run import container_request, container_user

pytestmark = [pytest.mark.docker, pytest.mark.slow]
QLC = str(Path(sys.executable).parent / "qlc")


def qlc(
    project: Path, *args: str, env: dict[str, str] | None = None, timeout: int = 900
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [QLC, *args],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def runs_of(project: Path) -> list[Path]:
    return sorted((project / "specs" / "runs" / "tiny").glob("*"))


def manifest_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "manifest.json").read_text())


@pytest.fixture(scope="module")
def first_run(
    tiny_image: BuildRecord, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Path]:
    """`qlc build SPEC --base-image BASE` then `qlc run` (the last build) in a fresh project."""
    project = tmp_path_factory.mktemp("first-run")
    copy_tiny_project(project)
    built = qlc(project, "build", "specs/tiny.toml", "--base-image", tiny_image.base_image)
    assert built.returncode == 0, built.stderr
    assert "cache hit" in built.stdout  # same context as the session's image
    ran = qlc(project, "run")
    assert ran.returncode == 0, ran.stdout + ran.stderr
    (run_dir,) = runs_of(project)
    return project, run_dir


def test_run_in_container_records_the_truth(
    first_run: tuple[Path, Path], tiny_image: BuildRecord
) -> None:
    _, run_dir = first_run
    manifest = manifest_of(run_dir)
    predicate = manifest["predicate"]
    assert predicate["status"] == "succeeded"
    names = {s["name"] for s in manifest["subject"]}
    assert "adapter/adapter_model.safetensors" in names
    for subject in manifest["subject"]:
        assert sha256(run_dir / subject["name"]) == subject["digest"]["sha256"]
    host = predicate["host"]
    assert host["mode"] == "container" and host["exit_code"] == 0 and not host["oom_killed"]
    assert host["image_id"] == tiny_image.image_id == predicate["image"]["id"]
    assert host["network"] == "none" and host["gpus_requested"] == 0
    assert sorted(host["read_only_inputs"]) == ["/inputs/data/data.jsonl", "/inputs/model"]
    assert predicate["image"]["base"] == tiny_image.base_image
    for name in ("report.md", "loss.png", "run.log", "metrics.jsonl", "manifest.sha256"):
        assert (run_dir / name).is_file(), name
    assert "QLC_PROGRESS" in (run_dir / "run.log").read_text()


def test_environment_is_observed_inside_the_container(
    first_run: tuple[Path, Path], tiny_image: BuildRecord
) -> None:
    _, run_dir = first_run
    predicate = manifest_of(run_dir)["predicate"]
    environment = predicate["environment"]
    probe = subprocess.run(
        [
            "docker",
            "run",
            "--rm",
            "--entrypoint",
            "python",
            tiny_image.image_id,
            "-c",
            "import platform, torch; print(platform.python_version(), torch.__version__)",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    python, torch = probe.stdout.split()
    assert (environment["python"], environment["torch"]) == (python, torch)
    assert environment["user"]["uid"] != 0  # non-root inside
    if os.getuid() == 0:
        assert f"{environment['user']['uid']}:{environment['user']['gid']}" == "10001:10001"
    assert predicate["inputs"]["model"]["path"] == "/inputs/model"
    assert predicate["inputs"]["data"]["path"] == "/inputs/data/data.jsonl"


def probe(
    engine: DockerEngine, request: ContainerRequest, image: str, user: str, script: str
) -> list[str]:
    """Run a shell script with the mounts and isolation of `request`."""
    container = engine.create(
        dataclasses.replace(request, image=image, user=user, command=("sh", "-c", script))
    )
    try:
        engine.start(container)
        lines = list(engine.logs(container))
        engine.wait(container)
    finally:
        engine.remove(container)
    return lines


def test_inputs_are_read_only_and_the_user_is_not_root(
    first_run: tuple[Path, Path], tiny_image: BuildRecord, docker_ready: str
) -> None:
    """The same request qlc runs with, with probes instead of the training script."""
    project, run_dir = first_run
    inputs = tiny_inputs(project / "specs" / "tiny.toml")
    engine = DockerEngine()
    user = container_user(engine.find_image(tiny_image.image_id).user)
    request = container_request(tiny_image, inputs, run_dir, user, False, {})
    as_run = probe(
        engine, request, docker_ready, user, "id -u; touch /out/probe && echo out-writable"
    )
    assert as_run[0] != "0" and as_run[-1] == "out-writable"
    (run_dir / "probe").unlink()
    # Even the files' owner (root here, capabilities dropped) cannot write the inputs.
    writes = probe(
        engine,
        request,
        docker_ready,
        f"{os.getuid()}:{os.getgid()}",
        "touch /inputs/model/new 2>&1; (: >> /inputs/model/config.json) 2>&1; "
        "(: >> /inputs/data/data.jsonl) 2>&1; echo done",
    )
    assert sum("Read-only file system" in line for line in writes) == 3, writes


def test_reproduce_is_bit_identical_then_names_the_edited_data(
    first_run: tuple[Path, Path], tmp_path: Path
) -> None:
    project, run_dir = first_run
    same = qlc(project, "reproduce", str(run_dir / "manifest.json"))
    assert same.returncode == 0, same.stdout + same.stderr
    assert "ok   adapter: bit-identical" in same.stdout
    assert "ok   data hash: unchanged" in same.stdout
    data = project / "specs" / "tiny" / "data.jsonl"
    rows = data.read_text().splitlines()
    data.write_text("\n".join([rows[1], rows[0], *rows[2:]]) + "\n")  # two rows swapped
    edited = qlc(project, "reproduce", str(run_dir / "manifest.json"))
    assert edited.returncode == 1, edited.stdout + edited.stderr
    assert "DIFF data hash: changed: data.jsonl: sha256" in edited.stdout
    assert edited.stdout.strip().endswith("not reproduced")
    copy = tmp_path / "copied-run"
    shutil.copytree(run_dir, copy)
    manifest = copy / "manifest.json"
    manifest.write_text(
        manifest.read_text().replace('"status": "succeeded"', '"status": "succeeded" ')
    )
    forged = qlc(project, "reproduce", str(manifest))
    assert forged.returncode == 1 and "edited by hand" in forged.stdout


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.5)


def test_training_killed_mid_run_then_resumed(tiny_image: BuildRecord, tmp_path: Path) -> None:
    project = tmp_path / "killed"
    copy_tiny_project(project)
    process = subprocess.Popen(
        [QLC, "run", "specs/tiny.toml", "--base-image", tiny_image.base_image],
        cwd=project,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for(lambda: len(runs_of(project)) == 1, 120, "the run directory")
    (run_dir,) = runs_of(project)
    checkpoint = run_dir / "checkpoints" / "checkpoint-4"
    wait_for(lambda: (checkpoint / "qlc-complete.json").is_file(), 600, "checkpoint-4")
    before = {p.relative_to(checkpoint): sha256(p) for p in checkpoint.rglob("*") if p.is_file()}
    engine = DockerEngine()
    found = engine._api.containers(filters={"label": f"qlc.run-dir={run_dir}"})
    assert len(found) == 1
    engine.kill(found[0]["Id"])  # SIGKILL to the training process (PID 1)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 1, stdout + stderr
    assert "exited with status 137" in stderr and "killed" in stderr
    manifest = manifest_of(run_dir)
    assert manifest["predicate"]["status"] == "failed" and manifest["subject"] == []
    assert manifest["predicate"]["host"]["exit_code"] == 137
    after = {p.relative_to(checkpoint): sha256(p) for p in checkpoint.rglob("*") if p.is_file()}
    assert after == before  # the finished checkpoint is intact
    assert engine._api.containers(all=True, filters={"label": f"qlc.run-dir={run_dir}"}) == []
    resumed = qlc(project, "run", "--resume", str(run_dir))
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    manifest = manifest_of(run_dir)
    assert manifest["predicate"]["status"] == "succeeded"
    assert manifest["predicate"]["run"]["resumed_from"] is not None


def test_exit_code_failure_is_reported_with_its_cause(
    tiny_image: BuildRecord, tmp_path: Path
) -> None:
    project = tmp_path / "bad-data"
    spec = copy_tiny_project(project)
    data = spec.parent / "tiny" / "data.jsonl"
    # the first rows pass the host's quick check (it reads the first HEAD_ROWS); the line after
    # them is the image's to find when it reads the whole file
    rows = "".join(json.dumps({"text": f"row {n}"}) + "\n" for n in range(HEAD_ROWS))
    data.write_text(rows + "{not json\n")
    ran = qlc(project, "run", "specs/tiny.toml", "--base-image", tiny_image.base_image)
    assert ran.returncode == 2  # the data is the user's to fix: a user error, as in the image
    bad_line = f"data.jsonl:{HEAD_ROWS + 1}: not a JSON line"
    assert "exited with status 2" in ran.stderr and bad_line in ran.stderr
    assert "Loading" not in ran.stderr and "Traceback" not in ran.stderr
    (run_dir,) = runs_of(project)
    predicate = manifest_of(run_dir)["predicate"]
    assert predicate["status"] == "failed" and bad_line.split("data.jsonl")[1] in predicate["error"]
    assert manifest_of(run_dir)["subject"] == []


def test_missing_daemon_fails_clearly_and_runs_nothing(
    tiny_image: BuildRecord, tmp_path: Path
) -> None:
    project = tmp_path / "no-daemon"
    copy_tiny_project(project)
    assert (
        qlc(project, "build", "specs/tiny.toml", "--base-image", tiny_image.base_image).returncode
        == 0
    )
    before = last_build(project)
    gone = {"DOCKER_HOST": f"unix://{tmp_path}/no-daemon.sock"}
    built = qlc(project, "build", "specs/tiny.toml", env=gone)
    ran = qlc(project, "run", env=gone)
    for result in (built, ran):
        assert result.returncode == 1
        assert "Docker daemon not reachable at unix://" in result.stderr
        assert "Traceback" not in result.stderr
    assert runs_of(project) == []
    assert last_build(project) == before  # nothing previously written is lost
