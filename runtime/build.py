"""build: spec -> compiled context (in memory; a copy on disk to read) -> image tagged by
content hash -> build record.

The tag is `qlc/<job>:<key>` where key is the first 12 hex of the context's content hash
(or, with --base-image, of sha256(content hash + the override), since the override is an
input of the image too). An image with that tag and matching qlc labels is a cache hit:
nothing is sent to the daemon's build endpoint.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console

from qlc import __version__
from qlc.compiler.render import plan_json
from qlc.contract import CONTEXT_MARKER
from qlc.runtime.docker_engine import BuildError, DockerEngine, Engine, EngineError
from qlc.runtime.progress import BuildProgress
from qlc.runtime.records import BuildRecord, RecordError, job_build, save_build, state_dir

if TYPE_CHECKING:
    from qlc.compiler.context import BuildContext

CONTEXT_LABEL = "qlc.context.sha256"
BASE_LABEL = "qlc.base-image"
PLAN_LABEL = "qlc.plan"  # the image's plan: the build context's plan.json, what every run reads
PULL_FAILURES = (
    "pull access denied",
    "manifest unknown",
    "no such host",
    "dial tcp",
    "repository does not exist",
    "connection refused",
    "i/o timeout",
    "not found: manifest",
    "failed to resolve",
    "toomanyrequests",
    "no basic auth credentials",
)


class BuildFailure(Exception):
    """The image could not be built: the message names the cause and the fix."""


@dataclass(frozen=True)
class Compiled:
    context: BuildContext
    spec_path: Path
    spec_name: str


def spec_display_name(spec_path: Path, project_dir: Path) -> str:
    """The name the compiler records: relative to the project when inside it, so the
    context (and the tag) do not depend on how the path was spelt."""
    resolved = spec_path.resolve()
    try:
        return resolved.relative_to(project_dir.resolve()).as_posix()
    except ValueError:
        return resolved.name


def compile_for_build(spec_path: Path, project_dir: Path, require_lock: bool = True) -> Compiled:
    from qlc.compiler.context import compile_spec
    from qlc.compiler.load import read_spec_and_lock

    source, lock = read_spec_and_lock(spec_path)
    name = spec_display_name(spec_path, project_dir)
    context = compile_spec(source, name, lock, require_lock=require_lock)
    return Compiled(context=context, spec_path=spec_path.resolve(), spec_name=name)


def image_key(content_hash: str, base_override: str | None) -> str:
    hex_digest = content_hash.removeprefix("sha256:")
    if base_override is None:
        return hex_digest
    return hashlib.sha256(f"{content_hash}\nBASE_IMAGE={base_override}".encode()).hexdigest()


def image_tag(job: str, key: str) -> str:
    return f"qlc/{job}:{key[:12]}"


def write_context_dir(context: BuildContext, project_dir: Path) -> Path:
    """Write the context under .qlc/contexts/<hash>/ (atomically); reuse it when intact.

    The folder is for people to read; builds send `context.files` from memory."""
    target = state_dir(project_dir) / "contexts" / context.content_hash.removeprefix("sha256:")
    if context_matches(target, context):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    for name, data in context.files.items():
        (staging / name).parent.mkdir(parents=True, exist_ok=True)
        (staging / name).write_bytes(data)
    (staging / CONTEXT_MARKER).write_text(context.content_hash + "\n")
    if target.exists() and not context_matches(target, context):
        # Edited by hand or half-written: it is a cache, rebuilt from the spec. Moved aside
        # first, so a concurrent build never sees a half-deleted folder.
        aside = target.with_name(f".stale-{os.getpid()}-{time.monotonic_ns()}")
        with contextlib.suppress(FileNotFoundError):
            os.replace(target, aside)
            shutil.rmtree(aside, ignore_errors=True)
    try:
        os.replace(staging, target)
    except OSError:  # a concurrent build of the same spec won the rename
        shutil.rmtree(staging, ignore_errors=True)
    return target


def context_matches(directory: Path, context: BuildContext) -> bool:
    """True when the folder holds exactly the compiled files, byte for byte."""
    if not directory.is_dir():
        return False
    present = {
        p.relative_to(directory).as_posix() for p in directory.rglob("*") if not p.is_dir()
    } - {CONTEXT_MARKER}
    if present != set(context.files):
        return False
    return all((directory / name).read_bytes() == data for name, data in context.files.items())


def build(
    spec_path: Path,
    base_image: str | None = None,
    *,
    project_dir: Path | None = None,
    engine: Engine | None = None,
    console: Console | None = None,
    require_lock: bool = True,
) -> BuildRecord:
    """Build (or find in the cache) the image of a spec; record it and return the record."""
    started = time.monotonic()
    project = (project_dir or Path.cwd()).resolve()
    console = console or Console(stderr=True, highlight=False, soft_wrap=True)
    compiled = compile_for_build(spec_path, project, require_lock)
    context = compiled.context
    for warning in context.warnings:
        console.print(f"warning: {warning}", markup=False)
    plan = context.plan
    job = plan.job.name
    base_ref = base_image or plan.base_image.reference
    key = image_key(context.content_hash, base_image)
    tag = image_tag(job, key)
    engine = engine or DockerEngine()
    engine.ping()
    labels = {
        CONTEXT_LABEL: context.content_hash,
        BASE_LABEL: base_ref,
        PLAN_LABEL: plan_json(plan).decode(),
    }
    _say_if_changed(project, job, plan.spec_sha256, compiled.spec_path, console)
    context_dir = write_context_dir(context, project)
    existing = engine.find_image(tag)
    cache_hit = existing is not None and all(existing.labels.get(k) == v for k, v in labels.items())
    if cache_hit and existing is not None:
        image_id, log_path = existing.id, _previous_log(project, job, tag)
    else:
        image_id, log_path = _run_build(
            engine, context, context_dir, tag, labels, base_image, base_ref, project, console
        )
    base_info = engine.find_image(base_ref)
    record = BuildRecord(
        job=job,
        tag=tag,
        image_id=image_id,
        image_key=key,
        context_hash=context.content_hash,
        context_dir=str(context_dir),
        spec_path=str(compiled.spec_path),
        spec_sha256=plan.spec_sha256,
        lock_sha256=plan.lock.sha256 if plan.lock else None,
        base_image=base_ref,
        base_image_overridden=base_image is not None,
        base_image_id=base_info.id if base_info else None,
        base_image_digests=list(base_info.repo_digests) if base_info else [],
        qlc_version=__version__,
        built_at=datetime.now(UTC).isoformat(timespec="seconds"),
        build_seconds=round(time.monotonic() - started, 3),
        cache_hit=cache_hit,
        log_path=log_path,
    )
    return save_build(project, record)  # with the push of the same image, if any


def _run_build(
    engine: Engine,
    context: BuildContext,
    context_dir: Path,
    tag: str,
    labels: dict[str, str],
    base_override: str | None,
    base_ref: str,
    project: Path,
    console: Console,
) -> tuple[str, str]:
    if not context_matches(context_dir, context):
        raise BuildFailure(
            f"{context_dir} changed after it was compiled: refusing to build "
            "files that are not the compiler's; run the build again"
        )
    log_dir = state_dir(project) / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    name = tag.split("/", 1)[1].replace(":", "-")
    log_path = log_dir / f"build-{name}-{stamp}-{os.getpid()}-{threading.get_ident() % 10000}.log"
    buildargs = {"BASE_IMAGE": base_override} if base_override else {}
    with log_path.open("w", encoding="utf-8") as log, BuildProgress(console, f"build {tag}") as bar:

        def on_line(line: str) -> None:
            log.write(line + "\n")
            log.flush()
            bar.feed(line)

        try:
            # The checked bytes themselves, never the folder: it could change after the check.
            image_id = engine.build(context.files, tag, buildargs, labels, on_line)
        except BuildError as error:
            raise BuildFailure(explain_build_error(error, base_ref, log_path)) from None
        except EngineError:
            raise
        except Exception as error:  # the SDK's transport errors mid-stream
            raise BuildFailure(f"the build of {tag} stopped: {error} (log: {log_path})") from None
    return image_id, str(log_path)


def explain_build_error(error: BuildError, base_ref: str, log_path: Path) -> str:
    """Name the cause (base image, pip install, other step) and the fix."""
    message = error.message
    lowered = message.lower()
    tail = "\n".join(error.log_tail[-15:])
    if any(marker in lowered for marker in PULL_FAILURES) or (
        "not found" in lowered and base_ref.split("@")[0].split(":")[0] in message
    ):
        return (
            f"base image {base_ref} is not available: {message}\n"
            f"fix: make it available locally (`docker pull`/`docker load` it where a "
            f"registry is reachable), or build on a local base with "
            f"`--base-image qlc-base:bookworm` (made by docker/make-base-image.sh). "
            f"Full log: {log_path}"
        )
    if "pip install" in tail or "pip install" in message or "pip" in lowered:
        pip_errors = [line for line in error.log_tail if line.startswith("ERROR")]
        cause = pip_errors[-1] if pip_errors else message
        return (
            f"pip install failed inside the image: {cause}\n"
            f"fix: check that the build can reach PyPI (network, proxy, CA bundle in "
            f"the base image); a hash mismatch means the lock is stale: `qlc lock SPEC`. "
            f"Full log: {log_path}"
        )
    return f"the image build failed: {message}\nlast lines:\n{tail}\nFull log: {log_path}"


def _say_if_changed(
    project: Path, job: str, spec_sha256: str, spec_path: Path, console: Console
) -> None:
    """`qlc run SPEC` builds first: say so when the spec changed since the job's last build."""
    try:
        previous = job_build(project, job)
    except RecordError:
        return
    if previous is not None and previous.spec_sha256 != spec_sha256:
        console.print(
            f"{spec_path} changed since the last build of {job} ({previous.tag}): building "
            "its image again",
            markup=False,
        )


def _previous_log(project: Path, job: str, tag: str) -> str | None:
    previous = job_build(project, job)
    return previous.log_path if previous is not None and previous.tag == tag else None
