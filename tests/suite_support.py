"""Helpers shared by every test folder (importable because tests/conftest.py puts this
folder on the path): the tiny project as the runtime tests and the session image use it."""

from __future__ import annotations

import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def copy_tiny_project(target: Path) -> Path:
    """The tiny spec, its lock and assets in a fresh project; returns the spec path."""
    specs = target / "specs"
    specs.mkdir(parents=True)
    for name in ("tiny.toml", "tiny.lock"):
        shutil.copy2(REPO / "specs" / name, specs / name)
    shutil.copytree(REPO / "specs" / "tiny", specs / "tiny")
    for path in [target, *target.rglob("*")]:  # the container user reads inputs as "other"
        path.chmod(0o755 if path.is_dir() else 0o644)
    return specs / "tiny.toml"
