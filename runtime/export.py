"""Export a built image as ready-to-submit job files for batch services.

`export(plan, image_ref, target, ...)` returns an `Export`: the job files for one of TARGETS,
the run id fixed now (the same for every retry of the job), the run directory and what the
person submitting must know. The job files reference the image by digest, request the GPUs,
set shared memory, run as the image's user, pass secret names (never values), write under
<output>/<job>/<run id>, retry on preemption only (never after a user error, exit 2) with a
grace period for the trainer's checkpoint, and, for several nodes, start torchrun with elastic
c10d rendezvous the service's way. The formats live in templates/jobs/; this module computes
the target-neutral values and the refusals, runtime/export_targets.py the per-target ones.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from qlc.compiler.plan import Plan
from qlc.compiler.render import template_environment
from qlc.contract import (
    CONTAINER_APP_DIR,
    CONTAINER_VENV,
    ENV_OUTPUT_DIR,
    ENV_RUN_ID,
    ENV_USER_ERROR_FILE,
    EXIT_PREEMPTED,
    EXIT_USER_ERROR,
    OBJECT_STORE_SCHEMES,
    PREEMPTED_FLAG,
    PREEMPTION_GRACE_S,
    SCRIPT_FILE,
    USER_ERROR_FLAG,
)
from qlc.runtime.launch import ImageRef, new_run_id, trainer_env

TARGETS = ("kubernetes", "aws-batch", "gcp-batch", "skypilot")
OUTPUT_MOUNT = "/qlc/output"  # where every target mounts the output bucket or volume
RDZV_PORT = 29500
PYTHON = f"{CONTAINER_VENV}/bin/python"
TORCHRUN = f"{CONTAINER_VENV}/bin/torchrun"
SCRIPT = f"{CONTAINER_APP_DIR}/{SCRIPT_FILE}"
# torchrun forwards SIGTERM to the training processes and waits this long before SIGKILL,
# leaving itself a few seconds of the grace period to exit.
TORCHRUN_SHUTDOWN_S = PREEMPTION_GRACE_S - 10
YAML_WIDTH = 2**16  # long lines stay whole (a folded line is harder to read and to diff)
DIGEST_REF = re.compile(r"^(?P<repo>[a-z0-9][a-z0-9._:/-]*[a-z0-9])@sha256:[0-9a-f]{64}$")


class ExportError(Exception):
    """A job file qlc will not write, worded for people (the CLI exits 2)."""


@dataclass(frozen=True)
class ExportOptions:
    """How the job runs beyond what the plan says (the CLI's options)."""

    nodes: int = 1
    gpus_per_node: int | None = None
    kueue_queue: str | None = None
    volume: str | None = None
    retries: int = 3
    instance_type: str | None = None
    accelerator: str | None = None
    job_queue: str | None = None
    cpus: int | None = None
    memory_gib: int | None = None
    project: str | None = None
    execution_role: str | None = None
    job_role: str | None = None
    efs_access_point: str | None = None
    spot: bool = False


@dataclass(frozen=True)
class JobShape:
    """What every target's job file says, in target-neutral terms."""

    name: str
    image: str
    run_id: str
    nodes: int
    gpus: int
    shm_size: str
    shm_bytes: int
    env: dict[str, str]
    secrets: list[str]
    output_uri: str | None
    output_volume: str | None
    run_path: str  # the run directory, relative to the output bucket or volume
    retries: int
    options: ExportOptions
    gpu_archs: list[str]

    @property
    def run_dir(self) -> str:
        """The run directory inside the container."""
        return f"{OUTPUT_MOUNT}/{self.run_path}"

    @property
    def multi(self) -> bool:
        return self.nodes > 1


@dataclass(frozen=True)
class Export:
    """Job files and what comes with them."""

    target: str
    files: dict[str, str]
    run_id: str
    run_dir: str  # inside the container
    run_location: str  # where it lands: bucket URI, or volume and path
    gpu: str | None  # the GPU the instance type or accelerator means, when known
    env: dict[str, str]  # the job's environment (secrets are not in it)
    notes: list[str] = field(default_factory=list)


def export(
    plan: Plan, image_ref: str, target: str, run_id: str | None = None, **options: Any
) -> Export:
    """Job files for `target` running `image_ref` (repo@sha256:...) as `plan` says."""
    from qlc.runtime import export_targets

    chosen = ExportOptions(**options)
    if target not in TARGETS:
        raise ExportError(f"unknown target {target!r}: choose one of {', '.join(TARGETS)}")
    shape = job_shape(plan, image_ref, chosen, run_id or new_run_id())
    result: Export = export_targets.render(target, shape)
    return result


def job_shape(plan: Plan, image_ref: str, options: ExportOptions, run_id: str) -> JobShape:
    check_image_ref(image_ref)
    check_inputs(plan)
    check_retries(plan, options)
    if options.nodes < 1:
        raise ExportError(f"--nodes must be at least 1 (got {options.nodes})")
    gpus = job_gpus(plan, options)
    output_dir = plan.job.output_dir
    is_uri = output_dir.startswith(OBJECT_STORE_SCHEMES)
    if not is_uri and options.volume is None:
        raise ExportError(
            f"job.output_dir = {output_dir!r} is a local path, which a batch job cannot reach: "
            "set job.output_dir to an object-store URI (s3://, gs://, az://) in the spec, "
            "or pass --volume NAME (a Kubernetes PVC or an AWS EFS file system) for the runs"
        )
    below = [] if is_uri else [posixpath.normpath(output_dir)]
    run_path = "/".join(part for part in [*below, plan.job.name, run_id] if part != ".")
    shape = JobShape(
        name=plan.job.name, image=image_ref, run_id=run_id, nodes=options.nodes, gpus=gpus,
        shm_size=plan.runtime.shm_size, shm_bytes=size_in_bytes(plan.runtime.shm_size),
        env={}, secrets=sorted(plan.runtime.secrets),
        output_uri=output_dir.rstrip("/") if is_uri else None, output_volume=options.volume,
        run_path=run_path, retries=options.retries, options=options,
        gpu_archs=list(plan.gpu_archs),
    )  # fmt: skip
    env = trainer_env(
        plan, output_dir=shape.run_dir, image=ImageRef(None, image_ref, None), run_id=run_id
    )
    if shape.multi:  # every node's launcher reads it (the run directory is shared)
        env[ENV_USER_ERROR_FILE] = f"{shape.run_dir}/{USER_ERROR_FLAG}"
    return replace(shape, env=dict(sorted(env.items())))


def job_gpus(plan: Plan, options: ExportOptions) -> int:
    spec_gpus = plan.runtime.gpus
    gpus = spec_gpus if options.gpus_per_node is None else options.gpus_per_node
    if gpus < 0:
        raise ExportError(f"--gpus-per-node must be 0 or more (got {gpus})")
    if gpus < spec_gpus:
        raise ExportError(
            f"--gpus-per-node {gpus} is fewer than the spec's runtime.gpus = {spec_gpus}, which "
            "the training script in the image checks on every node: request at least "
            f"{spec_gpus}, or lower runtime.gpus in the spec and rebuild"
        )
    return int(gpus)


def check_inputs(plan: Plan) -> None:
    """Refuse inputs the job cannot reach: a local model.path or data.path is a file on this
    machine, which is not in the image nor on the service (a mixture's local sources and a
    chat template file too); an object-store one (s3://, gs://, az://) is downloaded by the
    job itself, with the target's credentials. (The one place that decides which inputs an
    exported job can read.)"""
    files = [(file.key, file.path) for file in plan.data.local_inputs()]
    inputs = [("model.path", plan.model.local_path), *files]
    local = [(key, value) for key, value in inputs if value is not None]
    if local:
        what = ", ".join(f"{key} = {value!r}" for key, value in local)
        raise ExportError(
            f"{what}: a local input, which the exported job cannot read (it is neither in the "
            "image nor on the batch service). Use a hub source instead (model.id, data.id) "
            "or upload it to an object store and give its URI as the path (s3://, gs://, "
            "az://; pin it with model.sha256 / data.sha256)"
        )


def check_retries(plan: Plan, options: ExportOptions) -> None:
    """Retries resume from checkpoints: without train.save_steps a retry starts at step 0."""
    if options.retries < 0:
        raise ExportError(f"--retries must be 0 or more (got {options.retries})")
    if options.retries > 0 and plan.train.schedule.save_steps is None:
        raise ExportError(
            f"--retries {options.retries} but the spec sets no train.save_steps: a retried job "
            "would start again from step 0. Set train.save_steps in the spec (and rebuild), "
            "or pass --retries 0"
        )


def check_image_ref(image_ref: str) -> None:
    if DIGEST_REF.fullmatch(image_ref):
        repo = image_ref.split("@", 1)[0]
        if ":" in repo.rsplit("/", 1)[-1]:
            raise ExportError(
                f"image {image_ref!r} names both a tag and a digest: give repo@sha256:... only"
            )
        return
    if "@" not in image_ref:
        raise ExportError(
            f"image {image_ref!r} has no digest: a job file must pin the image by digest "
            "(repo@sha256:<64 hex>). Push it first with `qlc push SPEC --registry HOST/REPO`, "
            "which prints and records the pushed digest"
        )
    raise ExportError(
        f"image {image_ref!r} is not a digest reference: expected repo@sha256:<64 hex digits>"
    )


def size_in_bytes(size: str) -> int:
    """Docker-style size ('16g', '512m', '1024') in bytes."""
    match = re.fullmatch(r"(\d+)([kmgKMG]?)", size)
    if match is None:
        raise ExportError(f"runtime.shm_size = {size!r} is not a size like '16g'")
    factor = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30}[match.group(2).lower()]
    return int(match.group(1)) * factor


def launch_command() -> list[str]:
    """One node's command: the image's training script, which starts torchrun itself for
    several GPUs and exits 2 on a user error. Several nodes run `node_script`."""
    return [PYTHON, SCRIPT]


def node_script(shape: JobShape, endpoint: str, host_test: str | None = None) -> str:
    """POSIX shell for one node of a multi-node job: torchrun with elastic c10d rendezvous at
    `endpoint` (a shell word: the first node's address, from the service's variables), id =
    the run id, no restarts of its own (the service restarts nodes); `host_test` is a shell
    condition true on the node that hosts the rendezvous, where its address alone cannot tell.

    SIGTERM is passed on to torchrun, which gives the training processes the grace period to
    checkpoint. torchrun exits 1 whatever failed; rank 0 leaves the user-error flag in the
    shared run directory, so every node exits 2 after a user error, and every process that
    stopped with a checkpoint leaves the preemption flag, so its node exits 143 (retried),
    the node that was not signalled too. No user text enters it."""
    per_node = max(shape.gpus, 1)
    conf = ""
    preempted = f'"${ENV_OUTPUT_DIR}/{PREEMPTED_FLAG}"'
    lines = [f'rm -f "${ENV_USER_ERROR_FILE}" {preempted}']
    if host_test is not None:
        lines.append(f"if {host_test}; then host=1; else host=0; fi")
        conf = ' --rdzv-conf "is_host=$host"'
    lines += [
        f"{TORCHRUN} --nnodes {shape.nodes} --nproc-per-node {per_node} --rdzv-backend c10d "
        f'--rdzv-endpoint "{endpoint}:{RDZV_PORT}" --rdzv-id "${ENV_RUN_ID}"{conf} '
        f"--max-restarts 0 --shutdown-timeout {TORCHRUN_SHUTDOWN_S} {SCRIPT} &",
        "child=$!",
        "trap 'kill -TERM \"$child\" 2>/dev/null' TERM INT",
        'wait "$child"; code=$?',
        'while kill -0 "$child" 2>/dev/null; do wait "$child"; code=$?; done',
        f'if [ -e "${ENV_USER_ERROR_FILE}" ]; then exit {EXIT_USER_ERROR}; fi',
        f"if [ -e {preempted} ]; then exit {EXIT_PREEMPTED}; fi",
        'exit "$code"',
    ]
    return "\n".join(lines) + "\n"


def render_template(template: str, **values: Any) -> str:
    """A job file from templates/jobs/, through the compiler's template environment."""
    environment = template_environment(ensure_ascii=False)  # JSON job files keep text readable
    text: str = environment.get_template(f"jobs/{template}").render(**values)
    return text


def json_file(rendered: str) -> str:
    """A rendered JSON template, re-indented the same way every time (and proven to parse)."""
    return json.dumps(json.loads(rendered), indent=2, ensure_ascii=False) + "\n"


def yaml_file(rendered: str) -> str:
    """A rendered YAML template (comment lines, then the document as JSON) as YAML, written by
    the serializer: every string is quoted and escaped as YAML needs (control characters, DEL,
    C1, NEL, U+2028/2029, U+FFFE: ASCII-only output with escapes), so it reads back equal."""
    lines = rendered.splitlines(keepends=True)
    split = next(index for index, line in enumerate(lines) if not line.startswith("#"))
    document = json.loads("".join(lines[split:]))
    body: str = yaml.dump(
        document, Dumper=_JobFileDumper, sort_keys=False, allow_unicode=False,
        default_flow_style=False, width=YAML_WIDTH, explicit_start=True,
    )  # fmt: skip
    return "".join(lines[:split]) + body


class _JobFileDumper(yaml.SafeDumper):  # type: ignore[misc]  # PyYAML ships no types
    """The safe dumper, writing text of several lines (a node's shell script) as a literal
    block where YAML allows one; the emitter falls back to a quoted, escaped string where
    the text has characters a block cannot hold."""


def _represent_text(dumper: yaml.SafeDumper, text: str) -> yaml.ScalarNode:
    style = "|" if "\n" in text else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style=style)


_JobFileDumper.add_representer(str, _represent_text)


def write_export(files: dict[str, str], directory: Path, overwrite: bool = False) -> list[Path]:
    """Write job files into `directory`; refuse to replace existing ones unless asked."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = [directory / name for name in sorted(files)]
    existing = [str(path) for path in paths if path.exists()]
    if existing and not overwrite:
        raise ExportError(
            f"{', '.join(existing)} already exist: pass --force to replace, or choose -o DIR"
        )
    for path in paths:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(files[path.name], encoding="utf-8")
        os.replace(tmp, path)
    return paths
