"""Helpers for the training-script tests: compile a spec, then run or import its train.py."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from qlc.compiler.context import compile_spec

REPO = Path(__file__).resolve().parents[2]
SPECS = REPO / "specs"
GUANACO = REPO / "data" / "guanaco-llama2-1k" / "train.parquet"
TINY_MODEL = SPECS / "tiny" / "model"


def compile_to(spec_name: str, dest: Path, source: bytes | None = None) -> Path:
    """Compile specs/<spec_name> (or `source` under that name) and write its context to dest."""
    path = SPECS / spec_name
    lock = path.with_suffix(".lock")
    context = compile_spec(
        path.read_bytes() if source is None else source,
        f"specs/{spec_name}",
        lock.read_bytes() if lock.is_file() and source is None else None,
        require_lock=False,
    )
    dest.mkdir(parents=True, exist_ok=True)
    for name, data in context.files.items():
        (dest / name).write_bytes(data)
    return dest


def edit_plan(context: Path, **sections: dict[str, Any]) -> None:
    """Change spec values inside a context's plan.json (the script reads them at run time)."""
    plan = json.loads((context / "plan.json").read_text())
    for section, values in sections.items():
        plan["spec"][section].update(values)
    (context / "plan.json").write_text(json.dumps(plan, indent=2, sort_keys=True))


def train_env(out: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QLC_")}
    env.update(QLC_OUTPUT_DIR=str(out), PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    env.update(extra)
    return env


def run_train(
    context: Path, out: Path, timeout: int = 400, **extra: str
) -> subprocess.CompletedProcess:
    """Run the compiled train.py from specs/ (where the specs' relative paths start)."""
    return subprocess.run(
        [sys.executable, str(context / "train.py")],
        cwd=SPECS,
        env=train_env(out, **extra),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def start_train(context: Path, out: Path, **extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(context / "train.py")],
        cwd=SPECS,
        env=train_env(out, **extra),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def assert_ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stdout[-3000:] + "\n" + result.stderr[-6000:]


def load_script(context: Path, name: str = "qlc_train_under_test") -> ModuleType:
    """Import a compiled train.py as a module (it has no side effects on import)."""
    spec = importlib.util.spec_from_file_location(name, context / "train.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def progress(stdout: str) -> list[dict[str, Any]]:
    prefix = "QLC_PROGRESS "
    return [
        json.loads(line[len(prefix) :]) for line in stdout.splitlines() if line.startswith(prefix)
    ]


def manifest(out: Path) -> dict[str, Any]:
    return json.loads((out / "manifest.json").read_text())


@pytest.fixture(scope="session")
def tiny_context(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return compile_to("tiny.toml", tmp_path_factory.mktemp("tiny-context"))


@pytest.fixture(scope="session")
def script(tiny_context: Path) -> ModuleType:
    return load_script(tiny_context)


@pytest.fixture(scope="session")
def tiny_tokenizer(script: ModuleType) -> Any:
    spec = json.loads((Path(script.__file__).parent / "plan.json").read_text())["spec"]
    return script.load_tokenizer(spec, str(TINY_MODEL), None)


@pytest.fixture(scope="session")
def tiny_run(tiny_context: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """One uninterrupted run of specs/tiny.toml (deterministic): its output dir and stdout."""
    out = tmp_path_factory.mktemp("tiny-run")
    result = run_train(tiny_context, out)
    assert_ok(result)
    return out, result.stdout
