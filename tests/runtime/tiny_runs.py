"""A real tiny training run for the tests that read one (generate, merge), and the CLI caller
they share. conftest's `tiny_run` fixture trains it once per session; tests only read it
(those that break a run copy it first)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from qlc import cli
from qlc.compiler.context import compile_spec

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
    """Compile and run the training script as `qlc compile` + `python train.py` would (CPU,
    4-bit through bitsandbytes); the run directory, with its plan beside it."""
    lock = (REPO / "specs" / "tiny.lock").read_bytes()
    context = compile_spec(tiny_spec(TRAIN), "specs/tiny.toml", lock)
    ctx, run = directory / "context", directory / "run"
    ctx.mkdir(parents=True)
    for name, data in context.files.items():
        (ctx / name).parent.mkdir(parents=True, exist_ok=True)
        (ctx / name).write_bytes(data)
    env = {
        **os.environ,
        "QLC_OUTPUT_DIR": str(run),
        "QLC_MODEL_PATH": str(TINY / "model"),
        "QLC_DATA_PATH": str(TINY / "data.jsonl"),
    }
    done = subprocess.run(
        [sys.executable, str(ctx / "train.py")], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return run


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
