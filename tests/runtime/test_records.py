from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import pytest

from qlc.runtime import records


def make_record(job: str, tag: str, number: int = 1) -> records.BuildRecord:
    return records.BuildRecord(
        job=job,
        tag=tag,
        image_id="sha256:" + f"{number:064x}",
        image_key="k" * 64,
        context_hash="sha256:" + "c" * 64,
        context_dir="/ctx",
        spec_path="/p/specs/x.toml",
        spec_sha256="s" * 64,
        lock_sha256=None,
        base_image="qlc-base:bookworm",
        base_image_overridden=True,
        base_image_id=None,
        base_image_digests=[],
        qlc_version="0",
        built_at="2026-01-01T00:00:00+00:00",
        build_seconds=1.0,
        cache_hit=False,
        log_path=None,
    )


def test_write_json_atomic_leaves_no_temporary_files(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b.json"
    records.write_json_atomic(target, {"z": 1, "a": [1, 2]})
    records.write_json_atomic(target, {"z": 2})
    assert json.loads(target.read_text()) == {"z": 2}
    assert [p.name for p in target.parent.iterdir()] == ["b.json"]
    assert target.stat().st_mode & 0o044 == 0o044  # readable beyond the owner


def test_last_build_without_a_build_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(records.RecordError, match="qlc build SPEC"):
        records.last_build(tmp_path)


def test_corrupt_record_is_a_clear_error(tmp_path: Path) -> None:
    path = records.last_build_path(tmp_path)
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    with pytest.raises(records.RecordError, match="cannot read"):
        records.last_build(tmp_path)


def test_record_push_updates_job_and_last_build(tmp_path: Path) -> None:
    records.save_build(tmp_path, make_record("tiny", "qlc/tiny:abc"))
    updated = records.record_push(tmp_path, "tiny", "localhost:5000/tiny:abc", "sha256:" + "d" * 64)
    assert records.last_build(tmp_path) == updated
    assert records.job_build(tmp_path, "tiny").registry_digest == "sha256:" + "d" * 64


def _save_many(project: str, job: str, count: int) -> None:
    for number in range(count):
        records.save_build(Path(project), make_record(job, f"qlc/{job}:{number:012x}", number))


def test_concurrent_builds_never_leave_a_broken_record(tmp_path: Path) -> None:
    jobs = [f"job{n}" for n in range(4)]
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_save_many, args=(str(tmp_path), job, 25)) for job in jobs]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
        assert worker.exitcode == 0
    for job in jobs:
        assert records.job_build(tmp_path, job).tag == f"qlc/{job}:{24:012x}"
    assert records.last_build(tmp_path).job in jobs
    leftovers = [p for p in (tmp_path / ".qlc").rglob("*.tmp")]
    assert leftovers == []
