"""Checkpoints both engines write: checkpoint-N folders under the run's checkpoints/, each made
complete by a marker written last, which names the engine and the effective plan's hash. A run
resumes only from a complete checkpoint of its own plan, and says so."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qlc import contract
from qlc.trainer.errors import UserError


def marker(step: int, engine: str, plan_sha256: str) -> dict[str, Any]:
    return {"step": step, "engine": engine, "plan_sha256": plan_sha256}


def write_marker(folder: Path, step: int, engine: str, plan_sha256: str) -> None:
    contract.write_json_atomic(folder / contract.COMPLETE_MARKER, marker(step, engine, plan_sha256))


def read_marker(folder: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((folder / contract.COMPLETE_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def complete_checkpoints(directory: Path) -> list[tuple[int, Path, dict[str, Any]]]:
    """(step, folder, marker) of every complete checkpoint, by step."""
    found = []
    for folder in directory.glob("checkpoint-*"):
        step = folder.name.rsplit("-", 1)[-1]
        data = read_marker(folder) if step.isdigit() and folder.is_dir() else None
        if data is not None:
            found.append((int(step), folder, data))
    return sorted(found, key=lambda item: item[0])


def resumable(directory: Path, plan_sha256: str, engine: str) -> Path | None:
    """The latest complete checkpoint, which must be this plan's; UserError for another's."""
    found = complete_checkpoints(directory)
    if not found:
        return None
    _, folder, data = found[-1]
    if data.get("plan_sha256") != plan_sha256 or data.get("engine") != engine:
        raise UserError(
            f"{folder} was written by another plan (plan sha256 "
            f"{str(data.get('plan_sha256'))[:12]}..., engine {data.get('engine')!r}; this run: "
            f"{plan_sha256[:12]}..., engine {engine!r}): it belongs to another run. Start a new "
            "run directory (qlc run makes one), or resume with the spec that wrote it"
        )
    return folder
