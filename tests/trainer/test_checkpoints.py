"""Checkpoints: complete only once their marker is written (last), and resumed only by a run of
the plan and engine that wrote them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qlc import contract
from qlc.trainer.checkpoints import complete_checkpoints, resumable, write_marker
from qlc.trainer.errors import UserError

PLAN = "a" * 64


def checkpoint(directory: Path, step: int, complete: bool, plan: str = PLAN) -> Path:
    folder = directory / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "adapter_model.safetensors").write_bytes(b"weights")
    if complete:
        write_marker(folder, step, "reference", plan)
    return folder


def test_the_latest_complete_checkpoint_is_resumed(tmp_path: Path) -> None:
    checkpoint(tmp_path, 2, complete=True)
    latest = checkpoint(tmp_path, 10, complete=True)  # 10 after 2: by step, not by name
    checkpoint(tmp_path, 12, complete=False)  # the run died while writing it
    (tmp_path / "checkpoint-x").mkdir()
    (tmp_path / "checkpoint-14").write_text("a file")
    broken = checkpoint(tmp_path, 16, complete=False)
    (broken / contract.COMPLETE_MARKER).write_text("{not json")
    assert [step for step, _, _ in complete_checkpoints(tmp_path)] == [2, 10]
    assert resumable(tmp_path, PLAN, "reference") == latest
    marker = json.loads((latest / contract.COMPLETE_MARKER).read_text())
    assert marker == {"step": 10, "engine": "reference", "plan_sha256": PLAN}


def test_nothing_to_resume_without_a_complete_checkpoint(tmp_path: Path) -> None:
    assert resumable(tmp_path / "missing", PLAN, "reference") is None
    checkpoint(tmp_path, 4, complete=False)
    assert resumable(tmp_path, PLAN, "reference") is None


def test_another_plans_checkpoint_is_refused(tmp_path: Path) -> None:
    checkpoint(tmp_path, 4, complete=True, plan="b" * 64)
    with pytest.raises(UserError) as caught:
        resumable(tmp_path, PLAN, "reference")
    message = str(caught.value)
    assert "checkpoint-4 was written by another plan (plan sha256 bbbbbbbbbbbb..." in message
    assert "this run: aaaaaaaaaaaa..., engine 'reference'" in message
    assert "Start a new run directory" in message


def test_another_engines_checkpoint_is_refused(tmp_path: Path) -> None:
    checkpoint(tmp_path, 4, complete=True)
    with pytest.raises(UserError, match=r"engine 'reference'; this run: aaaa.*engine 'fast'"):
        resumable(tmp_path, PLAN, "fast")
