"""Per-target values for the job file templates in templates/jobs/ (one function a target).

Each function takes the target-neutral JobShape from runtime/export.py, computes what its
service's format needs (names, rendezvous, output wiring, retry rules, GPU checks) and renders
the template. Kubernetes lives in runtime/export_kubernetes.py.
"""

from __future__ import annotations

import re
from typing import Any

from qlc.contract import CONTAINER_GID, CONTAINER_UID, EXIT_USER_ERROR, PREEMPTION_GRACE_S
from qlc.runtime.export import (
    OUTPUT_MOUNT,
    Export,
    ExportError,
    JobShape,
    json_file,
    launch_command,
    node_script,
    render_template,
    yaml_file,
)
from qlc.runtime.export_gpus import (
    AWS_GPU_FAMILIES,
    AWS_INSTANCES,
    COMPUTE_CAPABILITY,
    GCP_ACCELERATORS,
    GCP_DEFAULT_MACHINES,
    GCP_GPU_MACHINES,
    SKYPILOT_ACCELERATORS,
    runs_on,
)
from qlc.runtime.export_kubernetes import kubernetes

GCP_CPU_MACHINE = "n2-standard-8"
GCP_PREEMPTED_EXIT_CODE = 50001  # Batch's exit code for a task whose VM was preempted
GCP_MAX_RETRIES = 10  # TaskSpec.maxRetryCount's range is [0, 10]
# gcsfuse renames a directory only when it holds fewer objects than this; qlc renames the
# adapter it publishes and its checkpoints (a few dozen files each).
GCSFUSE_RENAME_DIR_LIMIT = 100_000
AWS_MAX_ATTEMPTS = 10
EFS_ID = re.compile(r"fs-[0-9a-f]{8,40}")
EFS_ACCESS_POINT = re.compile(r"fsap-[0-9a-f]{8,40}")
IAM_ROLE = re.compile(r"arn:aws[a-z-]*:iam::\d{12}:role/[\w+=,.@/-]+")


def render(target: str, shape: JobShape) -> Export:
    renderers = {
        "kubernetes": kubernetes,
        "aws-batch": aws_batch,
        "gcp-batch": gcp_batch,
        "skypilot": skypilot,
    }
    return renderers[target](shape)


def refuse_volume(shape: JobShape, target: str) -> None:
    if shape.output_volume is not None:
        raise ExportError(
            f"--volume is for kubernetes (a PVC) and aws-batch (an EFS file system); {target} "
            "writes runs to the bucket in job.output_dir"
        )


def pairs(env: dict[str, str]) -> list[dict[str, str]]:
    return [{"name": key, "value": value} for key, value in sorted(env.items())]


def command_of(shape: JobShape, endpoint: str) -> list[str]:
    if shape.multi:
        return ["/bin/sh", "-c", node_script(shape, endpoint)]
    command: list[str] = launch_command()
    return command


# --- AWS Batch ------------------------------------------------------------------------------


def aws_batch(shape: JobShape) -> Export:
    options = shape.options
    if shape.retries + 1 > AWS_MAX_ATTEMPTS:
        raise ExportError(f"AWS Batch allows at most {AWS_MAX_ATTEMPTS - 1} retries "
                          f"(got {shape.retries})")  # fmt: skip
    if shape.output_uri is not None:
        raise ExportError(
            f"AWS Batch cannot mount {shape.output_uri}: set job.output_dir to a relative path "
            "and pass --volume fs-... (an EFS file system), or export for skypilot, which "
            "mounts s3:// buckets"
        )
    if options.spot:
        raise ExportError(
            "--spot: AWS Batch multi-node parallel jobs do not run on Spot, and a single-node "
            "job runs on Spot when its job queue's compute environment is of type SPOT (the "
            "job definition cannot ask for it): drop --spot and pick the job queue"
            if not shape.multi else
            "--spot: AWS Batch multi-node parallel jobs do not run on Spot compute "
            "environments: drop --spot and submit to a queue with an on-demand EC2 "
            "compute environment"
        )  # fmt: skip
    name = f"{re.sub(r'[^A-Za-z0-9_-]', '-', shape.name)}-{shape.run_id}"
    container = aws_container(shape)
    files = {"job-definition.json": json_file(render_template(
        "aws-batch.job-definition.json.j2", name=name, multi=shape.multi, nodes=shape.nodes,
        attempts=shape.retries + 1, evaluate_on_exit=aws_retry_rules(), tags=aws_tags(shape),
        container=container))}  # fmt: skip
    if options.job_queue is not None:
        files["submit-job.json"] = json_file(render_template(
            "aws-batch.submit-job.json.j2", name=name, queue=options.job_queue,
            multi=shape.multi, nodes=shape.nodes, tags=aws_tags(shape)))  # fmt: skip
    known = AWS_INSTANCES.get(options.instance_type or "")
    return Export(
        target="aws-batch", files=files, run_id=shape.run_id, env=shape.env, run_dir=shape.run_dir,
        run_location=f"EFS {shape.output_volume} (access point {options.efs_access_point}): "
        f"{shape.run_path}", gpu=known[3] if known and shape.gpus else None,
        notes=aws_notes(shape),
    )  # fmt: skip


def aws_retry_rules() -> list[dict[str, str]]:
    """Retry only when the instance went away (Spot reclaimed, host failure); exit 2 and any
    other failure end the job. The first matching entry decides."""
    return [
        {"onExitCode": str(EXIT_USER_ERROR), "action": "EXIT"},
        {"onStatusReason": "Host EC2*", "action": "RETRY"},
        {"onReason": "*", "action": "EXIT"},
    ]


def aws_container(shape: JobShape) -> dict[str, Any]:
    options = shape.options
    endpoint = "${AWS_BATCH_JOB_MAIN_NODE_PRIVATE_IPV4_ADDRESS:-localhost}"  # unset on node 0
    container = {
        "image": shape.image, "command": command_of(shape, endpoint),
        "environment": pairs(shape.env),
        "secrets": [{"name": secret, "valueFrom": secret} for secret in shape.secrets],
        "resourceRequirements": aws_resources(shape),
        "linuxParameters": {"sharedMemorySize": shape.shm_bytes // 2**20},
        "volumes": [{"name": "output", "efsVolumeConfiguration": efs_volume(shape)}],
        "mountPoints": [{"sourceVolume": "output", "containerPath": OUTPUT_MOUNT,
                         "readOnly": False}],
    }  # fmt: skip
    if shape.multi and options.instance_type:
        container["instanceType"] = options.instance_type
    if shape.secrets:
        container["executionRoleArn"] = aws_role(options.execution_role, "--execution-role", (
            f"aws-batch injects the secrets {', '.join(shape.secrets)} from SSM Parameter Store "
            "(parameters of the same names) through an execution role"))  # fmt: skip
    if options.job_role is not None:
        container["jobRoleArn"] = aws_role(options.job_role, "--job-role", "")
    return container


def efs_volume(shape: JobShape) -> dict[str, Any]:
    """The EFS file system through an access point whose POSIX user is the image's: a fresh
    file system's root belongs to root, where UID 10001 cannot create the run directory."""
    volume, point = shape.output_volume or "", shape.options.efs_access_point
    if not EFS_ID.fullmatch(volume):
        raise ExportError(f"--volume {volume!r} is not an EFS file system id (fs-...)")
    create = (
        f"aws efs create-access-point --file-system-id {volume} --posix-user "
        f"Uid={CONTAINER_UID},Gid={CONTAINER_GID} --root-directory 'Path=/qlc,CreationInfo="
        f"{{OwnerUid={CONTAINER_UID},OwnerGid={CONTAINER_GID},Permissions=0755}}'"
    )
    if point is None:
        raise ExportError(
            f"--volume {volume}: AWS Batch mounts EFS as root-owned, where the image's user "
            f"(UID {CONTAINER_UID}) cannot write: pass --efs-access-point fsap-... of an access "
            f"point with POSIX user {CONTAINER_UID}:{CONTAINER_GID}, e.g. one made with: {create}"
        )
    if not EFS_ACCESS_POINT.fullmatch(point):
        raise ExportError(f"--efs-access-point {point!r} is not an EFS access point id (fsap-...)")
    iam = "ENABLED" if shape.options.job_role is not None else "DISABLED"
    # An access point requires transit encryption (and IAM authorization requires it too).
    return {"fileSystemId": volume, "transitEncryption": "ENABLED",
            "authorizationConfig": {"accessPointId": point, "iam": iam}}  # fmt: skip


def aws_notes(shape: JobShape) -> list[str]:
    notes = [
        f"the EFS access point {shape.options.efs_access_point} must have POSIX user "
        f"{CONTAINER_UID}:{CONTAINER_GID} and a root directory owned by it",
        "a job definition cannot set the grace period after SIGTERM: set "
        f"ECS_CONTAINER_STOP_TIMEOUT={PREEMPTION_GRACE_S}s (and, on Spot, "
        "ECS_ENABLE_SPOT_INSTANCE_DRAINING=true) in the compute environment's launch template "
        "so the trainer can write its checkpoint",
    ]
    if shape.options.job_role is None:
        notes.append("no --job-role: EFS is mounted without IAM authorization, so the file "
                     "system policy must allow that")  # fmt: skip
    if shape.multi:
        notes.insert(0, "multi-node parallel jobs cannot run on Spot: submit to a job queue "
                        "with an on-demand EC2 compute environment")  # fmt: skip
    return notes


def aws_resources(shape: JobShape) -> list[dict[str, str]]:
    """GPUs, vCPUs and MiB: as asked, else the whole known instance (memory less 10% for the
    agent), else 8 vCPUs and 32 GiB per GPU."""
    instance_cpus, instance_gib = aws_instance(shape.options.instance_type, shape.gpus)
    per_gpu = max(shape.gpus, 1)
    cpus = shape.options.cpus or instance_cpus or 8 * per_gpu
    gib = shape.options.memory_gib or (int(instance_gib * 0.9) if instance_gib else 32 * per_gpu)
    resources = [{"type": "VCPU", "value": str(cpus)}, {"type": "MEMORY", "value": str(gib * 1024)}]
    if shape.gpus:
        resources.insert(0, {"type": "GPU", "value": str(shape.gpus)})
    return resources


def aws_role(role: str | None, option: str, why: str) -> str:
    if role is None:
        raise ExportError(f"{why}: pass {option} arn:aws:iam::ACCOUNT:role/NAME")
    if not IAM_ROLE.fullmatch(role):
        raise ExportError(f"{option} {role!r} is not an IAM role ARN")
    return role


def aws_tags(shape: JobShape) -> dict[str, str]:
    return {"managed-by": "qlc", "qlc:job": shape.name, "qlc:run-id": shape.run_id}


def aws_instance(instance: str | None, gpus: int) -> tuple[int | None, int | None]:
    """(vCPUs, GiB) of a known instance type; refuse one that cannot serve the GPUs."""
    if instance is None:
        return None, None
    family = instance.split(".", 1)[0]
    if gpus and family not in AWS_GPU_FAMILIES:
        raise ExportError(
            f"AWS instance type {instance!r} has no GPUs but {gpus} per node are requested: "
            f"use a GPU family ({', '.join(AWS_GPU_FAMILIES)}) or --gpus-per-node 0"
        )
    known = AWS_INSTANCES.get(instance)
    if known is None:
        return None, None
    if gpus > known[0]:
        raise ExportError(
            f"AWS instance type {instance!r} has {known[0]} GPU(s) but {gpus} per node are "
            "requested: pick a larger type or lower --gpus-per-node"
        )
    return known[1], known[2]


# --- Google Cloud Batch ---------------------------------------------------------------------


def gcp_batch(shape: JobShape) -> Export:
    machine, accelerators, gpu = gcp_machine(shape)
    refuse_volume(shape, "gcp-batch")
    uri = shape.output_uri
    if uri is None or not uri.startswith("gs://"):
        raise ExportError(
            "GCP Batch mounts Cloud Storage buckets only: set job.output_dir to "
            f"gs://BUCKET/PATH (got {uri or shape.run_path!r})"
        )
    if shape.retries > GCP_MAX_RETRIES:
        raise ExportError(f"GCP Batch allows at most {GCP_MAX_RETRIES} retries "
                          f"(got {shape.retries})")  # fmt: skip
    if shape.multi and shape.retries:
        raise ExportError(
            "GCP Batch retries a preempted task alone, on a new VM the other tasks' rendezvous "
            "cannot take back (the hosts file is fixed at start): pass --retries 0 for "
            "several nodes, or export for kubernetes or skypilot, which restart all nodes"
        )
    # gcsfuse: the image's user owns the files, the container (not root) may enter, and
    # directories holding fewer than the limit's objects can be renamed.
    fuse = [f"--uid={CONTAINER_UID}", f"--gid={CONTAINER_GID}", "--implicit-dirs",
            f"--rename-dir-limit={GCSFUSE_RENAME_DIR_LIMIT}", "-o allow_other"]  # fmt: skip
    volumes = [{"gcs": {"remotePath": uri.removeprefix("gs://")}, "mountPath": OUTPUT_MOUNT,
                "mountOptions": fuse}]  # fmt: skip
    # One source for the address and the ranks: the first host of the hosts file hosts the
    # rendezvous, which assigns every node's rank.
    command = command_of(shape, '$(head -n 1 "$BATCH_HOSTS_FILE")')
    text = render_template(
        "gcp-batch.job.json.j2",
        nodes=shape.nodes, multi=shape.multi, image=shape.image,
        entrypoint=command[0], commands=command[1:], options=f"--shm-size={shape.shm_size}",
        variables=shape.env, secret_variables=gcp_secrets(shape), volumes=volumes,
        retries=shape.retries, retry_exit_codes=[GCP_PREEMPTED_EXIT_CODE],
        provisioning="SPOT" if shape.options.spot else "STANDARD",
        machine=machine, accelerators=accelerators, gpus=shape.gpus, labels=gcp_labels(shape),
    )  # fmt: skip
    notes = [
        f"submit with a job id of your choice, e.g. gcloud batch jobs submit "
        f"{gcp_job_id(shape)} --config job.json --location REGION",
        "a preempted VM gets the 30 s Compute Engine allows (no job setting lengthens it): "
        "train.save_steps bounds what a preemption loses",
    ]
    return Export(
        target="gcp-batch", files={"job.json": json_file(text)}, run_id=shape.run_id, env=shape.env,
        run_dir=shape.run_dir, run_location=f"{uri}/{shape.run_path}", gpu=gpu, notes=notes,
    )  # fmt: skip


def gcp_machine(shape: JobShape) -> tuple[str, list[dict[str, Any]], str | None]:
    """The machine type, attached accelerators and the GPU; refuse a machine without GPUs."""
    gpus, machine = shape.gpus, shape.options.instance_type
    if gpus == 0:
        return machine or GCP_CPU_MACHINE, [], None
    accelerator = shape.options.accelerator
    if accelerator is not None:
        if machine is None:
            raise ExportError("--accelerator on gcp-batch attaches GPUs to an N1 machine: "
                              "also pass --instance-type (e.g. n1-standard-16)")  # fmt: skip
        return machine, [{"type": accelerator, "count": gpus}], GCP_ACCELERATORS.get(accelerator)
    if machine is None:
        machine = GCP_DEFAULT_MACHINES.get(gpus)
        if machine is None:
            raise ExportError(f"no default GCP machine type has {gpus} GPUs: pass "
                              "--instance-type (an a2/a3/g2 type)")  # fmt: skip
    built_in, gpu = GCP_GPU_MACHINES.get(machine, (0, None))
    if built_in < gpus:
        raise ExportError(
            f"GCP machine type {machine!r} has {built_in} built-in GPU(s) but {gpus} per node "
            "are requested: pick an a2/a3/g2 type with enough GPUs, or an N1 type with "
            "--accelerator TYPE (e.g. nvidia-tesla-t4)"
        )
    return machine, [], gpu


def gcp_secrets(shape: JobShape) -> dict[str, str]:
    """Secret Manager versions named after the secrets, in the project given."""
    project = shape.options.project
    if shape.secrets and project is None:
        raise ExportError(
            f"gcp-batch reads the secrets {', '.join(shape.secrets)} from Secret Manager: pass "
            "--project PROJECT_ID (secrets of the same names must exist there)"
        )
    if project is not None and not re.fullmatch(r"[a-z][a-z0-9-]{4,28}[a-z0-9]", project):
        raise ExportError(f"--project {project!r} is not a GCP project id")
    return {name: f"projects/{project}/secrets/{name}/versions/latest" for name in shape.secrets}


def gcp_job_id(shape: JobShape) -> str:
    """A job id Batch accepts (a lowercase letter first, at most 63 characters)."""
    job = re.sub(r"[^a-z0-9-]+", "-", shape.name)[:30].strip("-")
    return f"qlc-{job}-{shape.run_id.lower()}".replace("--", "-")


def gcp_labels(shape: JobShape) -> dict[str, str]:
    return {"managed-by": "qlc", "qlc-job": re.sub(r"[^a-z0-9_-]", "-", shape.name)[:63],
            "qlc-run-id": shape.run_id.lower()}  # fmt: skip


# --- SkyPilot -------------------------------------------------------------------------------


def skypilot(shape: JobShape) -> Export:
    refuse_volume(shape, "skypilot")
    uri = shape.output_uri
    if uri is None:
        raise ExportError("SkyPilot writes runs to a bucket it mounts: set job.output_dir to "
                          f"an s3:// or gs:// URI (got {shape.run_path!r})")  # fmt: skip
    if uri.startswith("az://"):
        raise ExportError("SkyPilot mounts Azure containers by their https://ACCOUNT.blob.core."
                          "windows.net/CONTAINER URL, not az://: use s3:// or gs:// for "
                          "skypilot")  # fmt: skip
    accelerators, gpu = skypilot_accelerators(shape)
    resources: dict[str, Any] = {"image_id": f"docker:{shape.image}",
                                 "use_spot": shape.options.spot}  # fmt: skip
    if accelerators:
        resources["accelerators"] = accelerators
    if shape.retries:  # preemptions are recovered; failures of the training itself are not
        resources["job_recovery"] = {"strategy": "FAILOVER", "max_restarts_on_errors": 0}
    command = command_of(shape, '$(echo "$SKYPILOT_NODE_IPS" | head -n 1)')
    run = command[2] if shape.multi else "exec " + " ".join(command) + "\n"
    text = render_template(
        "skypilot.task.yaml.j2",
        run_id=shape.run_id, recover=bool(shape.retries), name=f"{shape.name}-{shape.run_id}",
        nodes=shape.nodes, resources=resources, envs=shape.env, secrets=shape.secrets,
        secrets_map={secret: None for secret in shape.secrets},
        file_mounts={OUTPUT_MOUNT: {"source": uri, "mode": "MOUNT_CACHED"}},
        run_options=[f"--shm-size={shape.shm_size}"], run=run,
    )  # fmt: skip
    notes = ["SkyPilot sets no grace period after SIGTERM: train.save_steps bounds what a "
             "preemption loses"]  # fmt: skip
    if shape.retries:
        notes.insert(0, "a managed job recovers every preemption (SkyPilot has no limit for "
                        "them); --retries only turns recovery on")  # fmt: skip
    return Export(
        target="skypilot", files={"task.yaml": yaml_file(text)}, run_id=shape.run_id, env=shape.env,
        run_dir=shape.run_dir, run_location=f"{uri}/{shape.run_path}", gpu=gpu, notes=notes,
    )  # fmt: skip


def skypilot_accelerators(shape: JobShape) -> tuple[dict[str, int] | None, str | None]:
    """({name: GPUs per node}, the GPU when one is named): the accelerator asked for, else
    any accelerator the image's GPU architectures run on."""
    if shape.gpus == 0:
        return None, None
    chosen = shape.options.accelerator
    if chosen is not None:
        return {chosen: shape.gpus}, SKYPILOT_ACCELERATORS.get(chosen)
    names = [
        name
        for name, gpu in SKYPILOT_ACCELERATORS.items()
        if runs_on(shape.gpu_archs, COMPUTE_CAPABILITY[gpu])
    ]
    if not names:
        raise ExportError(f"no SkyPilot accelerator is known for GPU architectures "
                          f"{shape.gpu_archs}: pass --accelerator NAME (e.g. H100)")  # fmt: skip
    return {name: shape.gpus for name in names}, None
