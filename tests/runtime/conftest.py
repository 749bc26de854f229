"""Runtime fixtures: a fake engine for unit tests, a tiny project, one trained tiny run. The
daemon, the base image and the tiny spec's image (docker_ready, tiny_image) are the whole
suite's: tests/conftest.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from runtime_fakes import FakeEngine, copy_tiny_project


@pytest.fixture
def fake_engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def tiny_project(tmp_path: Path) -> Path:
    return copy_tiny_project(tmp_path / "project")


@pytest.fixture(scope="session")
def trained_tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One real tiny training run in this Python (tiny_runs.train_tiny_run), trained once and
    read by the generate and merge tests; a test that breaks a run copies it first."""
    from tiny_runs import train_tiny_run

    return train_tiny_run(tmp_path_factory.mktemp("tiny-run"))
