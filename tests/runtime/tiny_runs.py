"""A real tiny training run for the tests that read one (generate, merge), and the CLI caller
they share. conftest's `tiny_run` fixture trains it once per session; tests only read it
(those that break a run copy it first)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from suite_support import copy_tiny_project

from qlc import cli

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "specs" / "tiny"
# A high learning rate for a few steps: the adapter visibly moves the model's answers and
# logits (far more than merge's tolerance).
TRAIN = (
    'max_steps = 6\nbatch_size = 4\nlearning_rate = 5e-2\nlr_scheduler = "constant"\n'
    'optimizer = "adamw_torch"\nlogging_steps = 1\n'
)


def tiny_spec(train_overrides: str) -> bytes:
    """specs/tiny.toml with its [train] section replaced (the lock does not depend on it)."""
    source = (REPO / "specs" / "tiny.toml").read_text(encoding="utf-8")
    head, _, rest = source.partition("[train]")
    tail = rest[rest.index("\n[") :] if "\n[" in rest else ""
    return (head + "[train]\n" + train_overrides + tail).encode()


def train_tiny_run(directory: Path) -> Path:
    """A finished tiny run as `qlc run SPEC --local` leaves it (CPU, 4-bit through
    bitsandbytes): trained, finalized by the runtime (records, report, manifest.sha256)."""
    from rich.console import Console

    from qlc.runtime.run_local import run_local

    project = directory / "project"
    spec = copy_tiny_project(project)
    spec.write_bytes(tiny_spec(TRAIN))
    result = run_local(spec, project, console=Console(quiet=True), environ=dict(os.environ))
    assert result.status == "succeeded", result.message
    return result.run_dir


def call_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run `qlc ARGS` in this process through the real entry point (exit-code mapping)."""
    capsys.readouterr()
    saved = sys.argv
    sys.argv = ["qlc", *args]
    try:
        cli.main()
        code = 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 1
    finally:
        sys.argv = saved
    captured = capsys.readouterr()
    return code, captured.out, captured.err
