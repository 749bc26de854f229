"""Build records and the project's state folder (.qlc/), written atomically.

Layout under the project directory (the current directory unless given):
  .qlc/contexts/<context-hash>/   build contexts as sent to the daemon
  .qlc/logs/                      full build logs
  .qlc/builds/<job>.json          the latest build of each job
  .qlc/last-build.json            the latest build of the project (what `qlc run` runs)

Every JSON file is written to a unique temporary file in the same folder, flushed, then
renamed into place, so concurrent builds never leave a half-written record; updates of an
existing record (a push adds its digest) hold an exclusive lock on .qlc/records.lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

STATE_DIR = ".qlc"


class RecordError(Exception):
    """A record that is missing or unreadable, worded for people."""


class BuildRecord(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    job: str
    tag: Annotated[str, Field(description="qlc/<job>:<image key, 12 hex>")]
    image_id: str
    image_key: Annotated[str, Field(description="sha256 of the context hash and base override")]
    context_hash: str
    context_dir: str
    spec_path: Annotated[str, Field(description="Absolute path of the spec file")]
    spec_sha256: str
    lock_sha256: str | None
    base_image: Annotated[str, Field(description="FROM reference used (override or pinned)")]
    base_image_overridden: bool
    base_image_id: str | None
    base_image_digests: list[str]
    qlc_version: str
    built_at: str
    build_seconds: float
    cache_hit: bool
    log_path: str | None
    registry_digest: str | None = None
    pushed_ref: str | None = None


def state_dir(project_dir: Path) -> Path:
    return project_dir / STATE_DIR


def build_record_path(project_dir: Path, job: str) -> Path:
    return state_dir(project_dir) / "builds" / f"{job}.json"


def last_build_path(project_dir: Path) -> Path:
    return state_dir(project_dir) / "last-build.json"


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON (sorted keys) so readers see the old file or the new one, never a mix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; records are for everyone
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RecordError(f"{path}: no {what} here") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RecordError(f"{path}: cannot read the {what}: {error}") from None
    if not isinstance(data, dict):
        raise RecordError(f"{path}: the {what} is not a JSON object")
    return data


def save_build(project_dir: Path, record: BuildRecord) -> BuildRecord:
    """Record a build as the job's and the project's latest, and return what was saved. A
    rebuild that found the same image (a cache hit) keeps that image's push: its registry
    digest still names it."""
    with records_locked(project_dir):
        record = with_previous_push(project_dir, record)
        data = record.model_dump(mode="json")
        write_json_atomic(build_record_path(project_dir, record.job), data)
        write_json_atomic(last_build_path(project_dir), data)
    return record


def with_previous_push(project_dir: Path, record: BuildRecord) -> BuildRecord:
    if record.registry_digest is not None:
        return record
    try:
        previous = job_build(project_dir, record.job)
    except RecordError:
        return record
    if previous is None or previous.registry_digest is None:
        return record
    if (previous.tag, previous.image_id) != (record.tag, record.image_id):
        return record
    return record.model_copy(
        update={"registry_digest": previous.registry_digest, "pushed_ref": previous.pushed_ref}
    )


def load_build(path: Path) -> BuildRecord:
    data = read_json(path, "build record")
    try:
        return BuildRecord.model_validate(data)
    except ValidationError as error:
        raise RecordError(
            f"{path}: not a qlc build record ({error.error_count()} problems): "
            "rebuild with `qlc build SPEC`"
        ) from None


def last_build(project_dir: Path) -> BuildRecord:
    path = last_build_path(project_dir)
    if not path.is_file():
        raise RecordError(
            f"no build in {project_dir.resolve()}: run `qlc build SPEC` first, "
            "or name a spec or image: `qlc run SPEC`"
        )
    return load_build(path)


def job_build(project_dir: Path, job: str) -> BuildRecord | None:
    path = build_record_path(project_dir, job)
    return load_build(path) if path.is_file() else None


@contextlib.contextmanager
def records_locked(project_dir: Path) -> Iterator[None]:
    """An exclusive lock for read-modify-write updates of records."""
    lock_path = state_dir(project_dir) / "records.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def record_push(project_dir: Path, job: str, pushed_ref: str, registry_digest: str) -> BuildRecord:
    """Add a registry digest to a job's build record (and to last-build if it is that build)."""
    with records_locked(project_dir):
        record = job_build(project_dir, job)
        if record is None:
            raise RecordError(f"no build of job {job!r} in {project_dir}: run `qlc build` first")
        updated = record.model_copy(
            update={"registry_digest": registry_digest, "pushed_ref": pushed_ref}
        )
        write_json_atomic(build_record_path(project_dir, job), updated.model_dump(mode="json"))
        last = last_build_path(project_dir)
        if last.is_file() and read_json(last, "build record").get("tag") == record.tag:
            write_json_atomic(last, updated.model_dump(mode="json"))
        return updated


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
