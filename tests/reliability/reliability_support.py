"""Shared helpers of the reliability suite: the case tally, small project builders and the
CLI run in-process.

Every test calls `count(node, n)` for the cases it tried (fuzz examples, payloads, faults);
conftest.py adds the pass/fail outcome per pytest item and prints one table at the end.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import signal
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from qlc import cli
from qlc.compiler.context import compile_spec

REPO = Path(__file__).resolve().parents[2]
SPECS = REPO / "specs"
TINY_SPEC = SPECS / "tiny.toml"
TINY_LOCK = SPECS / "tiny.lock"

CATEGORIES = {
    "test_bad_input": "1 bad input",
    "test_injection": "2 injection",
    "test_export_roundtrip": "2 injection",
    "test_faults": "3 faults",
    "test_secrets": "4 secrets, isolation",
    "test_concurrency": "5 load",
    "test_output_paths": "6 output paths",
    "test_input_files": "7 input files",
    "test_echoes": "8 echoed input",
}

CASES: Counter[str] = Counter()
COUNTED: set[str] = set()


def category_of(nodeid: str) -> str:
    module = nodeid.split("::", 1)[0].rsplit("/", 1)[-1].removesuffix(".py")
    return CATEGORIES.get(module, "other")


def count(nodeid: str, cases: int = 1) -> None:
    """Record `cases` attempted cases for the test `nodeid`."""
    CASES[category_of(nodeid)] += cases
    COUNTED.add(nodeid)


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def hash_tree(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): sha256_file(p)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def tiny_project(
    dest: Path, edits: dict[str, str] | None = None, drop: tuple[str, ...] = ()
) -> Path:
    """Copy the tiny spec, its lock and assets into dest; return the spec path.

    `edits` replaces whole `key = value` lines (matched by the text before ' = ') and `drop`
    removes lines starting with those keys; sections stay as in specs/tiny.toml.
    """
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copytree(SPECS / "tiny", dest / "tiny", dirs_exist_ok=True)
    lines = []
    for line in TINY_SPEC.read_text().splitlines():
        key = line.split(" = ", 1)[0].strip()
        if key in drop:
            continue
        if edits and key in edits:
            line = f"{key} = {edits[key]}"
        lines.append(line)
    spec = dest / "tiny.toml"
    spec.write_text("\n".join(lines) + "\n")
    shutil.copy(TINY_LOCK, dest / "tiny.lock")
    for path in [dest, *dest.rglob("*")]:  # a container's non-root user reads inputs as "other"
        path.chmod(0o755 if path.is_dir() else 0o644)
    return spec


def compile_dir(spec: Path, dest: Path) -> Path:
    """Compile a spec (with its lock beside it) into dest, as `qlc compile` writes it."""
    context = compile_spec(spec.read_bytes(), spec.name, spec.with_suffix(".lock").read_bytes())
    dest.mkdir(parents=True, exist_ok=True)
    for name, data in context.files.items():
        (dest / name).write_bytes(data)
    return dest


def read_manifest(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "manifest.json").read_text())


# ---------------------------------------------------------------------------------------------
# The CLI in-process.


class Hung(Exception):
    """A command that did not return in time (it blocked, on a FIFO for instance)."""


@contextlib.contextmanager
def scratch_cwd(path: Path) -> Iterator[None]:
    old = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Raise Hung in this (main) thread after `seconds`: a blocked open() or read() of a FIFO
    is interrupted by the signal, so a hang fails the test instead of stopping the suite."""

    def expire(signum: int, frame: object) -> None:
        raise Hung(f"still running after {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def invoke(argv: list[str], seconds: float = 120) -> tuple[int, str, str]:
    """Run `qlc ARGV` through the real entry point; return (exit code, stdout, stderr).
    Hung when it takes longer than `seconds`."""
    stdout, stderr = io.StringIO(), io.StringIO()
    old_argv = sys.argv
    sys.argv = ["qlc", *argv]
    code: int = 0
    try:
        with (
            deadline(seconds),
            contextlib.redirect_stdout(stdout),
            contextlib.redirect_stderr(stderr),
        ):
            cli.main()
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    finally:
        sys.argv = old_argv
    return code, stdout.getvalue(), stderr.getvalue()
