"""Fixtures of the trainer's tests: the tiny spec compiled once, its plan and tokenizer, and one
real CPU training run of it shared read-only by every test that reads a finished run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fast_support import save_tiny_llama
from trainer_support import TINY_MODEL, assert_ok, compile_to, run_train

from qlc.compiler.plan import Plan
from qlc.trainer.model import ModelSource, load_tokenizer


@pytest.fixture(scope="session")
def tiny_context(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """specs/tiny.toml compiled with its lock: train.py, plan.json and the trainer package."""
    return compile_to("tiny.toml", tmp_path_factory.mktemp("tiny-context"))


@pytest.fixture(scope="session")
def tiny_plan(tiny_context: Path) -> Plan:
    return Plan.model_validate_json((tiny_context / "plan.json").read_bytes())


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_plan: Plan) -> Any:
    """The tiny model's tokenizer as the trainer loads it (pad token set, right padding).
    Read-only: a test that changes it works on a copy."""
    return load_tokenizer(tiny_plan, ModelSource(str(TINY_MODEL), None, local=True))


@pytest.fixture(scope="session")
def tiny_run(tiny_context: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """One uninterrupted, deterministic run of specs/tiny.toml: its run directory and stdout."""
    out = tmp_path_factory.mktemp("tiny-run") / "run"
    result = run_train(tiny_context, out)
    assert_ok(result)
    return out, result.stdout


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))
