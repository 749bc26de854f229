"""run: the compiled training script in a container (or, with --local, in this Python).

The container gets the spec's GPUs through a DeviceRequest, the run directory read-write at
/out, local inputs read-only under /inputs, no capabilities, no privilege escalation, a
non-root user, and no network unless the spec reads from the hub. Secrets named in the spec
are read from this process's environment at start and handed to the container only; their
values are masked in everything qlc prints or keeps.
"""

from __future__ import annotations

import errno
import os
import shlex
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from rich.console import Console

from qlc import contract
from qlc.compiler.plan import Plan
from qlc.compiler.render import plan_json
from qlc.runtime.build import PLAN_LABEL
from qlc.runtime.docker_engine import (
    ContainerRequest,
    DockerEngine,
    Engine,
    ImageInfo,
    Mount,
    PullError,
)
from qlc.runtime.launch import (
    OBJECT_STORE_SCHEMES,
    ImageRef,
    LaunchError,
    LocalInputs,
    container_input_paths,
    container_paths,
    container_user,
    local_inputs,
    needs_network,
    new_run_id,
    trainer_env,
)
from qlc.runtime.manifest import FinalManifest, HostView, finalize
from qlc.runtime.pull import ImageMismatch, digest_reference, pull_verified
from qlc.runtime.records import (
    BuildRecord,
    RecordError,
    last_build,
    load_build,
    state_dir,
)
from qlc.runtime.supervise import Outcome, supervise_container
from qlc.userio import is_file


class RunInputError(Exception):
    """Something the user must fix before a run can start (exit 2)."""


class RunFailed(Exception):
    """The run started and did not succeed (exit 1; 2 when the trainer stopped on a problem
    the user must fix); `result` says how it ended."""

    def __init__(self, message: str, result: RunResult) -> None:
        super().__init__(message)
        self.result = result

    @property
    def user_error(self) -> bool:
        return self.result.exit_code == contract.EXIT_USER_ERROR


@dataclass(frozen=True)
class RunInputs:
    """A built plan and where its run reads and writes on this host."""

    plan: Plan
    plan_bytes: bytes
    spec_path: Path | None  # the spec the plan was built from (its folder anchors paths)
    local: LocalInputs
    output_root: Path
    needs_hub: bool

    @property
    def job(self) -> str:
        return self.plan.job.name

    @property
    def plan_sha256(self) -> str:
        return contract.sha256_bytes(self.plan_bytes)


@dataclass(frozen=True)
class RunResult:
    run_dir: Path
    status: str
    ended: str
    exit_code: int | None
    oom_killed: bool
    manifest: FinalManifest
    log_path: Path
    message: str = ""


def run_inputs(plan: Plan, spec_path: Path | None, project: Path) -> RunInputs:
    """Where a built plan's run reads (local inputs, relative to the spec's folder) and writes
    (<output_dir>/<job>/ under that folder). The spec file itself is never read."""
    where = str(spec_path) if spec_path is not None else f"image of job {plan.job.name}"
    if plan.job.output_dir.startswith(OBJECT_STORE_SCHEMES):
        raise RunInputError(
            f"{where}: job.output_dir is {plan.job.output_dir}: qlc run writes to a local "
            "directory; use `qlc export` for batch services"
        )
    base = spec_path.resolve().parent if spec_path is not None else project
    has_local = plan.model.local_path is not None or bool(plan.data.local_inputs())
    if spec_path is None and has_local:
        raise RunInputError(
            f"the image of job {plan.job.name} reads local files (model.path / data.path) "
            "relative to the spec it was built from, and no build record here names that spec: "
            "run it from the project that built it, or `qlc run SPEC`"
        )
    try:
        local = local_inputs(plan, base, where)
    except LaunchError as error:
        raise RunInputError(str(error)) from None
    return RunInputs(
        plan=plan,
        plan_bytes=plan_json(plan),
        spec_path=spec_path.resolve() if spec_path is not None else None,
        local=local,
        output_root=base / plan.job.output_dir / plan.job.name,
        needs_hub=needs_network(plan, local),
    )


def new_run_dir(output_root: Path) -> Path:
    run_dir = output_root / new_run_id()
    run_dir.mkdir(parents=True, exist_ok=False)
    return run_dir


def claim(run_dir: Path, inputs: RunInputs) -> Path:
    """The run directory, claimed for this plan: new, or a run of this plan to continue."""
    problem = contract.claim_run_dir(run_dir, inputs.plan_sha256, inputs.job, run_dir.name)
    if problem is not None:
        raise RunInputError(f"{problem}\nfix: leave out --resume to start a new run")
    return run_dir


def secret_values(plan: Plan, environ: Mapping[str, str]) -> dict[str, str]:
    """The plan's secrets present in the environment (the others are reported missing)."""
    return {name: environ[name] for name in plan.runtime.secrets if environ.get(name)}


def redactor(values: Mapping[str, str]) -> Callable[[str], str]:
    hidden = sorted((v for v in values.values() if len(v) >= 4), key=len, reverse=True)

    def redact(line: str) -> str:
        for value in hidden:
            line = line.replace(value, "***")
        return line

    return redact


def container_request(
    record: BuildRecord,
    inputs: RunInputs,
    run_dir: Path,
    user: str,
    smoke: bool,
    environ: Mapping[str, str],
    gpus: int | None = None,
    extra_env: Mapping[str, str] | None = None,
) -> ContainerRequest:
    model_path, data_path = container_paths(inputs.local)
    input_paths = container_input_paths(inputs.local)
    env = trainer_env(
        inputs.plan,
        output_dir=contract.CONTAINER_OUTPUT_DIR,
        model_path=model_path,
        data_path=data_path,
        input_paths=input_paths,
        smoke=smoke,
        image=ImageRef(record.image_id, record.registry_digest, record.base_image),
        run_id=run_dir.name,
        extra=extra_env,
    )
    if os.getuid() != 0:
        env["HOME"] = "/tmp"
    mounts = [Mount(str(run_dir), contract.CONTAINER_OUTPUT_DIR, read_only=False)]
    if inputs.local.model_dir is not None and model_path is not None:
        mounts.append(Mount(str(inputs.local.model_dir), model_path))
    if inputs.local.data_file is not None and data_path is not None:
        mounts.append(Mount(str(inputs.local.data_file), data_path))
    mounts += [Mount(str(inputs.local.files[key]), path) for key, path in input_paths.items()]
    env.update(secret_values(inputs.plan, environ))
    requested = inputs.plan.runtime.gpus if gpus is None else gpus
    return ContainerRequest(
        image=record.image_id,
        environment=env,
        mounts=tuple(mounts),
        gpus=0 if smoke and gpus is None else requested,
        shm_size=inputs.plan.runtime.shm_size,
        network="bridge" if inputs.needs_hub else "none",
        user=user,
        labels={"qlc.job": inputs.job, "qlc.run-dir": str(run_dir)},
        tmpfs={"/tmp": "rw,size=2g"},
    )


def run_container(
    record: BuildRecord,
    inputs: RunInputs,
    *,
    smoke: bool = False,
    run_dir: Path | None = None,
    engine: Engine | None = None,
    console: Console | None = None,
    environ: Mapping[str, str] | None = None,
    gpus: int | None = None,
    extra_env: Mapping[str, str] | None = None,
) -> RunResult:
    """Run a built image for its plan; write the final manifest and report; raise RunFailed."""
    console = console or Console(stderr=True, highlight=False, soft_wrap=True)
    environ = os.environ if environ is None else environ
    engine = engine or DockerEngine()
    engine.ping()
    image = local_or_pulled(record, engine, console)
    _warn_missing_secrets(inputs.plan, environ, console)
    user = container_user(image.user)
    blocked = unreadable_inputs(inputs, user)
    if blocked:
        raise RunInputError(
            f"the container's user ({user}) cannot read {len(blocked)} input files (mounted "
            f"read-only), e.g. {blocked[0]}: make them readable (`chmod -R a+rX` on the model "
            "folder / data file) or run qlc as their owner"
        )
    run_dir = claim(run_dir or new_run_dir(inputs.output_root), inputs)
    run_dir = _prepare_run_dir(run_dir, image.user)
    request = container_request(record, inputs, run_dir, user, smoke, environ, gpus, extra_env)
    redact = redactor(secret_values(inputs.plan, environ))
    log_path = run_dir / contract.RUN_LOG_FILE
    started, clock = _now(), time.monotonic()
    console.print(f"run {inputs.job}: {record.tag} -> {run_dir}", markup=False)
    outcome = supervise_container(engine, request, log_path, redact, console, inputs.job)
    host = HostView(
        mode="container",
        exit_code=outcome.exit_code,
        oom_killed=outcome.oom_killed,
        ended=outcome.ended,
        image_id=record.image_id,
        image_tag=record.tag,
        base_image=record.base_image,
        base_image_id=record.base_image_id,
        started_at=started,
        finished_at=_now(),
        duration_s=round(time.monotonic() - clock, 3),
        user=user,
        network=request.network,
        gpus_requested=request.gpus,
        read_only_inputs=[m.target for m in request.mounts if m.read_only],
        detail=outcome.detail,
        spec_path=str(inputs.spec_path) if inputs.spec_path else None,
        base_image_overridden=record.base_image_overridden,
    )
    return conclude(run_dir, host, log_path, outcome, redact)


def local_or_pulled(record: BuildRecord, engine: Engine, console: Console) -> ImageInfo:
    """The built image in the daemon, else pulled back by the digest its push recorded."""
    image = engine.find_image(record.image_id)
    if image is not None:
        return image
    reference = digest_reference(record.registry_digest)
    if reference is None:
        raise RunInputError(
            f"image {record.tag} ({record.image_id[:19]}) is not in the "
            f"daemon at {engine.endpoint}: run `qlc build {record.spec_path}`"
        )
    console.print(f"image {record.tag} is not in the daemon: pulling {reference}", markup=False)
    try:
        return pull_verified(engine, reference, record.image_id)
    except ImageMismatch as error:
        raise RunInputError(str(error)) from None
    except PullError as error:
        raise PullError(
            f"image {record.tag} is not in the daemon and {error}\nfix: make the registry "
            f"reachable (and `docker login` to it), or rebuild: `qlc build {record.spec_path}`"
        ) from None


def unreadable_inputs(inputs: RunInputs, user: str) -> list[str]:
    """Input files the container's user could not read (only checkable when we are root;
    otherwise the container runs as this user, who can read what they can read)."""
    if os.getuid() != 0:
        return []
    uid, gid = (int(part) for part in user.split(":"))
    paths: list[Path] = []
    for root in inputs.local.paths:
        paths += [root, *sorted(root.rglob("*"))] if root.is_dir() else [root]
    return [str(p) for p in paths if not _readable(p, uid, gid)]


def _readable(path: Path, uid: int, gid: int) -> bool:
    info = path.stat()
    need = 0o5 if path.is_dir() else 0o4
    if info.st_uid == uid:
        return (info.st_mode >> 6) & need == need
    if info.st_gid == gid:
        return (info.st_mode >> 3) & need == need
    return info.st_mode & need == need


def _prepare_run_dir(run_dir: Path, image_user: str) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    if os.getuid() == 0:  # the container user must be able to write /out
        uid, gid = (int(part) for part in container_user(image_user).split(":"))
        os.chown(run_dir, uid, gid)
    return run_dir


def conclude(
    run_dir: Path, host: HostView, log_path: Path, outcome: Outcome, redact: Callable[[str], str]
) -> RunResult:
    final = finalize(run_dir, host)
    if final.report_error is not None:
        Console(stderr=True, highlight=False, soft_wrap=True).print(
            f"warning: report.md could not be written in {run_dir}: "
            f"{final.report_error.strerror or final.report_error}",
            markup=False,
        )
    result = RunResult(
        run_dir=run_dir,
        status=final.status,
        ended=host.ended,
        exit_code=host.exit_code,
        oom_killed=host.oom_killed,
        manifest=final,
        log_path=log_path,
    )
    if final.write_error is not None:
        ran = (
            ""
            if outcome.ended == "exited" and outcome.exit_code == 0
            else (explain_outcome(outcome, final, run_dir) + "\n")
        )
        raise RunFailed(redact(ran + unwritable_records(final, run_dir, host)), result)
    if final.status == "succeeded" and not final.problems:
        return result
    message = redact(explain_outcome(outcome, final, run_dir))
    raise RunFailed(message, result)


def unwritable_records(final: FinalManifest, run_dir: Path, host: HostView) -> str:
    """Why the final manifest is not on disk (a full disk, mostly) and how to carry on."""
    error = final.write_error
    assert error is not None
    full = error.errno in (errno.ENOSPC, errno.EDQUOT)
    cause = "the disk is full" if full else "the run directory cannot be written"
    state = (
        "the manifest records the run as failed"
        if final.manifest_updated
        else "the manifest could not be updated either (it may still say 'running')"
    )
    local = " --local" if host.mode == "local" else ""
    spec = f" {shlex.quote(host.spec_path)}" if host.spec_path else ""
    resume = f"qlc run{local}{spec} --resume {shlex.quote(str(run_dir))}"
    remedy = "free space there" if full else "make it writable"
    return (
        f"{cause} ({error.strerror or error}): the final manifest in {run_dir} could not "
        f"be written; {state}\nfix: {remedy}, then continue the run with `{resume}`"
    )


def explain_outcome(outcome: Outcome, final: FinalManifest, run_dir: Path) -> str:
    tail = "\n".join(outcome.tail[-12:])
    where = f"run directory: {run_dir} (full log: run.log, manifest: manifest.json)"
    if outcome.ended == "not-started":
        return f"the container did not start: {outcome.detail}\n{where}"
    if outcome.ended == "lost":
        return f"{outcome.detail}\nthe run is recorded as {final.status}\n{where}"
    if outcome.oom_killed:
        return (
            "the container was killed for lack of memory (OOM)\nfix: lower "
            'train.batch_size or data.max_length, set train.memory = "lean", or give '
            f"the container more memory\n{where}"
        )
    if outcome.ended == "interrupted":
        return f"interrupted: the run stopped and is recorded as {final.status}\n{where}"
    if final.problems:
        return (
            "the run's manifest does not check out:\n  "
            + "\n  ".join(final.problems)
            + (f"\n{where}")
        )
    code = outcome.exit_code
    cause = {
        137: "killed (SIGKILL: out of memory on the host, `docker kill`, or the "
        "process was killed)",
        143: "terminated (SIGTERM)",
        130: "interrupted (SIGINT)",
        2: "the training script reported a problem to fix",
    }.get(code or 0, "failed")
    return f"the training process exited with status {code}: {cause}\nlast lines:\n{tail}\n{where}"


def _warn_missing_secrets(plan: Plan, environ: Mapping[str, str], console: Console) -> None:
    for name in plan.runtime.secrets:
        if not environ.get(name):
            console.print(
                f"warning: secret {name} is not set in this environment: the run goes without it",
                markup=False,
            )


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------------
# What to run: a spec (built first, usually a cache hit), an image, or the last build. The plan
# always comes from what was built: the image's plan label, never the spec file as it is now.


def plan_of_image(image: ImageInfo) -> Plan:
    text = image.labels.get(PLAN_LABEL)
    if text is None:
        raise RunInputError(
            f"image {image.id[:19]} carries no qlc plan (label {PLAN_LABEL}): it was not built "
            "by this qlc; rebuild it with `qlc build SPEC`"
        )
    try:
        return Plan.model_validate_json(text)
    except ValueError:
        raise RunInputError(
            f"image {image.id[:19]}: its plan was made by another qlc version: rebuild it "
            "with `qlc build SPEC`"
        ) from None


def run(
    target: str | None = None,
    *,
    local: bool = False,
    smoke: bool = False,
    base_image: str | None = None,
    project_dir: Path | None = None,
    run_dir: Path | None = None,
    engine: Engine | None = None,
    console: Console | None = None,
    environ: Mapping[str, str] | None = None,
    gpus: int | None = None,
    extra_env: Mapping[str, str] | None = None,
) -> RunResult:
    """`qlc run [SPEC|IMAGE]`: raise RunInputError (exit 2) or RunFailed (exit 1)."""
    project = (project_dir or Path.cwd()).resolve()
    console = console or Console(stderr=True, highlight=False, soft_wrap=True)
    if target is not None and not target.strip():
        raise RunInputError(
            "the target is empty: name a spec file or an image qlc built, "
            "or leave it out to run the last build"
        )
    if local:
        from qlc.runtime.run_local import run_local

        return run_local(
            _local_spec(target, project), project, smoke=smoke, run_dir=run_dir,
            console=console, environ=environ, extra_env=extra_env,
        )  # fmt: skip
    engine = engine or DockerEngine()
    record = resolve_target(target, project, base_image, engine, console)
    image = local_or_pulled(record, engine, console)
    spec_path = Path(record.spec_path) if record.spec_path else None
    inputs = run_inputs(plan_of_image(image), spec_path, project)
    return run_container(
        record, inputs, smoke=smoke, run_dir=run_dir, engine=engine, console=console,
        environ=environ, gpus=gpus, extra_env=extra_env,
    )  # fmt: skip


def resolve_target(
    target: str | None, project: Path, base_image: str | None, engine: Engine, console: Console
) -> BuildRecord:
    from qlc.runtime.build import build

    if target is None:
        try:
            return last_build(project)
        except RecordError as error:
            raise RunInputError(str(error)) from None
    if target.endswith(".toml") or is_file(Path(target)):
        if not is_file(Path(target)):
            raise RunInputError(f"{target}: no such spec file")
        # a changed spec rebuilds (build says so); the record keeps the push of the same image
        return build(Path(target), base_image, project_dir=project, engine=engine, console=console)
    image = engine.find_image(target)
    record = find_record_for_image(project, image.id) if image is not None else None
    if record is None:
        raise RunInputError(
            f"{target}: not a spec file, and no image built in {project} "
            "has that name: run `qlc run SPEC` (it builds first)"
        )
    return record


def find_record_for_image(project: Path, image_id: str) -> BuildRecord | None:
    for path in sorted((state_dir(project) / "builds").glob("*.json")):
        try:
            record = load_build(path)
        except RecordError:
            continue
        if record.image_id == image_id:
            return record
    return None


def _local_spec(target: str | None, project: Path) -> Path:
    if target is None:
        try:
            return Path(last_build(project).spec_path)
        except RecordError as error:
            raise RunInputError(str(error)) from None
    if not is_file(Path(target)):
        raise RunInputError(f"{target}: --local runs a spec file (no such file)")
    return Path(target)
