"""train.py's atomic JSON writes: the whole new file or the old one, and nothing left behind."""

from __future__ import annotations

import errno
import json
from pathlib import Path
from types import ModuleType

import pytest


def test_a_full_disk_keeps_the_old_file_and_leaves_no_tmp(
    script: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "manifest.json"
    script.write_json_atomic(target, {"status": "running"})
    real_write = Path.write_text

    def full_disk(self: Path, text: str, *args: object, **kwargs: object) -> int:
        real_write(self, text[:10], encoding="utf-8")  # part of it, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full_disk)
    with pytest.raises(OSError, match="No space left"):
        script.write_json_atomic(target, {"status": "succeeded"})
    monkeypatch.undo()
    assert json.loads(target.read_text()) == {"status": "running"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]
