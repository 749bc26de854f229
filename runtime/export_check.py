"""`qlc export --check`: what would fail once the job runs on the service, found here first.

Two steps, run in this order by the CLI:

1. `preflight`: what needs no training. The image's GPU architectures against the GPU the
   instance type or accelerator means; the memory estimate against that GPU's memory; and the
   output location: the job's image runs a small probe as the job's user, with the job's own
   environment, against a local directory mounted where the job mounts its output. The probe
   creates the run directory, writes, appends, renames a directory over another one (the
   adapter's publish, the checkpoints) and removes what it wrote.
2. `smoke`: the job's own command in smoke mode (a tiny model of the same architecture, a few
   steps on CPU) in the same container setup, with the hub reachable when the spec reads
   from it: inputs unreachable, secrets missing and every other failure of a start show here.

Every check returns a Finding; nothing here decides the exit code.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from qlc.compiler.memory import check_fit, estimate
from qlc.compiler.plan import Plan
from qlc.compiler.shapes import GIB, UnknownGpu, UnknownShape, find_gpu
from qlc.contract import CONTAINER_GID, CONTAINER_UID, CONTAINER_USER, ENV_OUTPUT_DIR, ENV_SMOKE
from qlc.runtime.docker_engine import ContainerRequest, Engine, EngineError, Mount
from qlc.runtime.export import OUTPUT_MOUNT, PYTHON, Export, launch_command
from qlc.runtime.export_gpus import COMPUTE_CAPABILITY, runs_on

PROBE_TIMEOUT_S = 120
# The variables each object store's client reads credentials (and a non-AWS endpoint) from.
CREDENTIAL_ENV = {
    "s3://": ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_REGION",
              "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"),
    "gs://": ("GOOGLE_CLOUD_PROJECT",),
    "az://": ("AZURE_STORAGE_ACCOUNT_NAME", "AZURE_STORAGE_ACCOUNT_KEY", "AZURE_STORAGE_SAS_TOKEN",
              "AZURE_STORAGE_CONNECTION_STRING"),
}  # fmt: skip
# The output probe (no user text in it): each step's failure, or null, as one JSON line.
PROBE = """
import json, os, shutil, sys
run = sys.argv[1]  # the job's run directory
probe = os.path.join(run, ".qlc-check")
done = []
def step(what, action):
    try:
        action()
    except OSError as error:
        done.append([what, f"{error.strerror or error} ({error.filename})"])
        print(json.dumps(done)); sys.exit(0)
    done.append([what, None])
def write(path, text, mode="w"):
    with open(path, mode) as handle:
        handle.write(text)
def publish():
    os.makedirs(os.path.join(probe, "staging", "part"))
    os.makedirs(os.path.join(probe, "published"))
    os.rename(os.path.join(probe, "published"), os.path.join(probe, "old"))
    os.rename(os.path.join(probe, "staging"), os.path.join(probe, "published"))
step("create the run directory", lambda: os.makedirs(probe))
step("write a file", lambda: write(os.path.join(probe, "metrics.jsonl"), "{}\\n"))
step("append to a file", lambda: write(os.path.join(probe, "metrics.jsonl"), "{}\\n", "a"))
step("replace a file by renaming", lambda: (write(os.path.join(probe, "t.tmp"), "x"),
     os.replace(os.path.join(probe, "t.tmp"), os.path.join(probe, "metrics.jsonl"))))
step("rename directories (publish the adapter)", publish)
step("remove what it wrote", lambda: shutil.rmtree(probe))
print(json.dumps(done))
"""


@dataclass(frozen=True)
class Finding:
    check: str
    ok: bool | None  # None: could not be checked here (says why)
    detail: str


def preflight(
    plan: Plan, result: Export, engine: Engine, image: str, stand_in: Path
) -> list[Finding]:
    """The checks that need no training (step 1), cheapest first."""
    return [
        archs_finding(plan, result.gpu),
        memory_finding(plan, result.gpu),
        output_finding(engine, image, result, stand_in),
    ]


def archs_finding(plan: Plan, gpu: str | None) -> Finding:
    archs = plan.gpu_archs
    if plan.runtime.gpus == 0:
        return Finding("gpu-archs", True, "a CPU job: no GPU architecture needed")
    if gpu is None:
        return Finding("gpu-archs", None, "the job's GPU is not known here (no instance type "
                       "or accelerator qlc knows): cannot compare it with the image's "
                       f"architectures {archs}")  # fmt: skip
    capability = COMPUTE_CAPABILITY[gpu]
    if runs_on(archs, capability):
        return Finding("gpu-archs", True, f"the image's architectures {archs} run on {gpu} "
                       f"(compute capability {capability})")  # fmt: skip
    return Finding("gpu-archs", False, (
        f"the image is built for GPU architectures {archs}, none of which runs on {gpu} "
        f"(compute capability {capability}): add \"{capability}\" to runtime.gpu_archs and "
        "rebuild, or pick an instance type with another GPU"))  # fmt: skip


def memory_finding(plan: Plan, gpu: str | None) -> Finding:
    if plan.runtime.gpus == 0:
        return Finding("memory", True, "a CPU job: no GPU memory needed")
    if gpu is None:
        return Finding("memory", None, "the job's GPU is not known here: compare with "
                       "`qlc explain SPEC --gpu NAME`")  # fmt: skip
    try:
        card = find_gpu(gpu)
        fit = check_fit(estimate(plan, None, card), card)
    except (UnknownGpu, UnknownShape) as error:
        return Finding("memory", None, f"no estimate for {gpu}: {error}")
    needed, total = fit.needed / GIB, card.memory_bytes / GIB
    if fit.fits:
        return Finding("memory", True, f"predicted {needed:.1f} GiB (peak, CUDA context and "
                       f"headroom) fits {card.name}'s {total:.1f} GiB")  # fmt: skip
    return Finding("memory", False, (
        f"predicted {needed:.1f} GiB (peak, CUDA context and headroom) is more than "
        f"{card.name}'s {total:.1f} GiB: pick a GPU with more memory, or lower data.max_length "
        "or train.batch_size, or set train.memory = \"lean\" (see `qlc explain SPEC --gpu "
        f"{card.name}`)"))  # fmt: skip


def prepare_stand_in(stand_in: Path) -> None:
    """The local directory for the output mount, as the job file makes the service present
    it: owned by the image's user (fsGroup, EFS access point, gcsfuse --uid)."""
    stand_in.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        os.chown(stand_in, CONTAINER_UID, CONTAINER_GID)
    else:  # another owner cannot be given away: let everyone write, as the owner would
        stand_in.chmod(0o777)


def job_request(
    image: str, env: Mapping[str, str], stand_in: Path, command: tuple[str, ...], network: str
) -> ContainerRequest:
    """The job's container, here: its user, environment and output mount path."""
    return ContainerRequest(
        image=image, environment=dict(env), user=CONTAINER_USER, command=command,
        mounts=(Mount(str(stand_in), OUTPUT_MOUNT, read_only=False),), network=network,
        labels={"qlc.check": "export"},
    )  # fmt: skip


def output_finding(engine: Engine, image: str, result: Export, stand_in: Path) -> Finding:
    command = (PYTHON, "-c", PROBE, result.env[ENV_OUTPUT_DIR])
    request = job_request(image, result.env, stand_in, command, "none")
    code, lines = run_to_end(engine, request)
    where = f"{result.run_dir} (as {CONTAINER_USER})"
    try:
        steps = json.loads(lines[-1]) if lines else None
    except ValueError:
        steps = None
    if not isinstance(steps, list):
        tail = " | ".join(lines[-5:]) or "no output"
        return Finding("output", False, f"the probe did not run in the image (exit {code}): "
                       f"{tail}")  # fmt: skip
    failed = [(what, why) for what, why in steps if why is not None]
    if failed:
        what, why = failed[0]
        return Finding("output", False, (
            f"{where}: cannot {what}: {why}. The job's user must own the output location, "
            "or be in a group that may write it"))  # fmt: skip
    return Finding("output", True, f"{where}: created, written, appended, renamed, removed")


def run_to_end(engine: Engine, request: ContainerRequest) -> tuple[int, list[str]]:
    """Run a container to its end; its exit code and output lines (-1 and the daemon's words
    when it cannot start). It is removed after."""
    if engine.find_image(request.image) is None:
        engine.pull(request.image)
    container = engine.create(request)
    try:
        try:
            engine.start(container)
        except EngineError as error:  # e.g. the command is not in the image
            return -1, [str(error)]
        code = engine.wait(container)
        return code, list(engine.logs(container))
    finally:
        engine.remove(container)


def store_credentials(plan: Plan, environ: Mapping[str, str]) -> dict[str, str]:
    """This machine's credentials for the object stores the plan reads, passed to the smoke
    run only (the job gets its own from the platform: IRSA, workload identity, roles)."""
    names = [name for scheme in plan.object_stores for name in CREDENTIAL_ENV[scheme]]
    return {name: environ[name] for name in names if environ.get(name)}


def smoke(
    engine: Engine,
    image: str,
    plan: Plan,
    result: Export,
    stand_in: Path,
    environ: Mapping[str, str],
    log_path: Path,
    console: Console,
) -> Finding:
    """Step 2: the job's single-node command in smoke mode, as the job runs it. Needs the
    trainer in the image (run it after `preflight` passed)."""
    from qlc.runtime.run import redactor
    from qlc.runtime.supervise import supervise_container

    secrets = {name: environ[name] for name in plan.runtime.secrets if environ.get(name)}
    missing = [name for name in plan.runtime.secrets if name not in secrets]
    if missing:
        return Finding("smoke", False, f"the secrets {', '.join(missing)} are not set here: "
                       "export them to run the smoke check (the job reads them from the "
                       "service's secret store)")  # fmt: skip
    env = {**result.env, ENV_SMOKE: "1", **store_credentials(plan, environ), **secrets}
    network = "bridge" if plan.needs_network else "none"
    command = tuple(launch_command())
    request = job_request(image, env, stand_in, command, network)
    title = f"smoke check of {result.target} run {result.run_id}"
    outcome = supervise_container(engine, request, log_path, redactor(secrets), console, title)
    if outcome.exit_code == 0:
        return Finding("smoke", True, f"the job's command trained in smoke mode (log {log_path})")
    tail = " | ".join(outcome.tail[-5:]) or outcome.detail
    kind = "a user error (inputs, data, settings)" if outcome.exit_code == 2 else outcome.ended
    return Finding("smoke", False, f"exit {outcome.exit_code}, {kind}: {tail} (log {log_path})")
