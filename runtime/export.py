"""Export a built image as ready-to-submit job files for batch engines.

`export(plan, image_ref, target, ...)` returns {file name: content} for one of TARGETS; the
job files reference the image by digest, request the GPUs, set shared memory, point the run
directory at the spec's output location, pass secret names (never values), retry on
preemption (the training script resumes from its last checkpoint) and, for several nodes,
set up torch distributed rendezvous the engine's way. The formats themselves live in
templates/jobs/; this module computes the values they receive. `write_export` writes them.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qlc.compiler.plan import Plan
from qlc.compiler.render import template_environment

TARGETS = ("kubernetes", "aws-batch", "gcp-batch", "skypilot")
OBJECT_STORE_SCHEMES = ("s3://", "gs://", "az://")
OUTPUT_MOUNT = "/qlc/output"
MASTER_PORT = 29500
IMAGE_UID = 10001  # the user templates/Dockerfile.j2 runs the training script as
DIGEST_REF = re.compile(r"^(?P<repo>[a-z0-9][a-z0-9._:/-]*[a-z0-9])@sha256:[0-9a-f]{64}$")


class ExportError(Exception):
    """A job file qlc will not write, worded for people (the CLI exits 2)."""


@dataclass(frozen=True)
class ExportOptions:
    """How the job runs beyond what the plan says."""

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


@dataclass(frozen=True)
class JobShape:
    """What every target's job file says, in target-neutral terms."""

    name: str
    image: str
    nodes: int
    gpus: int
    shm_size: str
    shm_bytes: int
    env: dict[str, str]
    secrets: list[str]
    output_uri: str | None
    output_volume: str | None
    output_subdir: str | None
    retries: int
    options: ExportOptions
    gpu_archs: list[str]


def export(
    plan: Plan,
    image_ref: str,
    target: str,
    nodes: int = 1,
    gpus_per_node: int | None = None,
    kueue_queue: str | None = None,
    **more: Any,
) -> dict[str, str]:
    """Job files for `target` running `image_ref` (repo@sha256:...) as `plan` says."""
    options = ExportOptions(
        nodes=nodes, gpus_per_node=gpus_per_node, kueue_queue=kueue_queue, **more
    )
    if target not in TARGETS:
        raise ExportError(f"unknown target {target!r}: choose one of {', '.join(TARGETS)}")
    shape = job_shape(plan, image_ref, options)
    from qlc.runtime import export_targets

    files: dict[str, str] = export_targets.render(target, shape)
    return files


def job_shape(plan: Plan, image_ref: str, options: ExportOptions) -> JobShape:
    check_image_ref(image_ref)
    if options.nodes < 1:
        raise ExportError(f"--nodes must be at least 1 (got {options.nodes})")
    if options.retries < 0:
        raise ExportError(f"retries must be 0 or more (got {options.retries})")
    runtime, job = plan.runtime, plan.job
    spec_gpus = runtime.gpus
    gpus = spec_gpus if options.gpus_per_node is None else options.gpus_per_node
    if gpus < 0:
        raise ExportError(f"--gpus-per-node must be 0 or more (got {gpus})")
    if gpus < spec_gpus:
        raise ExportError(
            f"--gpus-per-node {gpus} is fewer than the spec's runtime.gpus = {spec_gpus}, which "
            "the training script in the image checks on every node: request at least "
            f"{spec_gpus}, or lower runtime.gpus in the spec and rebuild"
        )
    output_dir = job.output_dir
    is_uri = output_dir.startswith(OBJECT_STORE_SCHEMES)
    if not is_uri and options.volume is None:
        raise ExportError(
            f"job.output_dir = {output_dir!r} is a local path, which a batch job cannot reach: "
            "set job.output_dir to an object-store URI (s3://, gs://, az://) in the spec, "
            "or pass --volume NAME (a Kubernetes PVC or an AWS EFS file system) for the runs"
        )
    shm_size = runtime.shm_size
    env = {**runtime.env, "QLC_IMAGE_DIGEST": image_ref}
    return JobShape(
        name=job.name,
        image=image_ref,
        nodes=options.nodes,
        gpus=int(gpus),
        shm_size=shm_size,
        shm_bytes=size_in_bytes(shm_size),
        env=dict(sorted(env.items())),
        secrets=sorted(runtime.secrets),
        output_uri=output_dir if is_uri else None,
        output_volume=options.volume,
        output_subdir=None if is_uri else output_dir,
        retries=options.retries,
        options=options,
        gpu_archs=list(plan.gpu_archs),
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


def launch_command(shape: JobShape) -> list[str]:
    """The command on one node, for a single node (several nodes are target-specific)."""
    if shape.gpus > 1:
        return ["torchrun", "--standalone", "--nproc-per-node", str(shape.gpus), "/qlc/train.py"]
    return ["python", "/qlc/train.py"]


def torchrun_script(shape: JobShape, nodes: str, rank: str, master: str) -> str:
    """A POSIX shell line starting torchrun on every node; arguments are shell expressions
    of the engine's own variables (no user text enters it)."""
    per_node = max(shape.gpus, 1)
    return (
        f'exec torchrun --nnodes "{nodes}" --nproc-per-node {per_node} --node-rank "{rank}" '
        f'--master-addr "{master}" --master-port {MASTER_PORT} /qlc/train.py'
    )


def render_template(template: str, **values: Any) -> str:
    """A job file from templates/jobs/, through the compiler's template environment."""
    environment = template_environment(ensure_ascii=False)  # job files keep text readable
    return environment.get_template(f"jobs/{template}").render(**values)


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
