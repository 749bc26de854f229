"""Shared helpers of the reliability suite: the case tally and small project builders.

Every test calls `count(node, n)` for the cases it tried (fuzz examples, payloads, faults);
conftest.py adds the pass/fail outcome per pytest item and prints one table at the end.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

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
