"""Runtime fixtures: a fake engine for unit tests, and for `docker` tests a real daemon, the
offline base image (both made by .ci/docker.sh) and the tiny spec's image built once."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from runtime_fakes import REPO, FakeEngine, copy_tiny_project

BASE_IMAGE = os.environ.get("QLC_BASE_IMAGE", "qlc-base:bookworm")


@pytest.fixture
def fake_engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def tiny_project(tmp_path: Path) -> Path:
    return copy_tiny_project(tmp_path / "project")


@pytest.fixture(scope="session")
def docker_ready() -> str:
    """A daemon that answers and the offline base image, via the CI script (idempotent)."""
    script = REPO / ".ci" / "docker.sh"
    done = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        pytest.fail(f".ci/docker.sh failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return BASE_IMAGE


@pytest.fixture(scope="session")
def tiny_image(docker_ready: str, tmp_path_factory: pytest.TempPathFactory) -> object:
    """The tiny spec's image, built once per session (installs the locked stack: minutes)."""
    from qlc.runtime.build import build

    project = tmp_path_factory.mktemp("tiny-image")
    spec = copy_tiny_project(project)
    return build(spec, docker_ready, project_dir=project)


@pytest.fixture(scope="session")
def trained_tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One real tiny training run in this Python (tiny_runs.train_tiny_run), trained once and
    read by the generate and merge tests; a test that breaks a run copies it first."""
    from tiny_runs import train_tiny_run

    return train_tiny_run(tmp_path_factory.mktemp("tiny-run"))
