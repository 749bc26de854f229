"""Per-target values for the job file templates in templates/jobs/ (one function a target).

Each function takes the target-neutral JobShape from runtime/export.py, computes what its
engine's format needs (names, rendezvous, output wiring, GPU checks) and renders the template.
"""

from __future__ import annotations

import json
import re
from typing import Any

from qlc.runtime.export import (
    IMAGE_UID,
    MASTER_PORT,
    OUTPUT_MOUNT,
    ExportError,
    JobShape,
    launch_command,
    render_template,
    torchrun_script,
)

# GPUs, vCPUs and GiB of memory of the AWS instance types qlc knows (AWS instance type pages).
AWS_INSTANCES = {
    "g4dn.xlarge": (1, 4, 16), "g4dn.2xlarge": (1, 8, 32), "g4dn.12xlarge": (4, 48, 192),
    "g4dn.metal": (8, 96, 384), "g5.xlarge": (1, 4, 16), "g5.2xlarge": (1, 8, 32),
    "g5.4xlarge": (1, 16, 64), "g5.8xlarge": (1, 32, 128), "g5.12xlarge": (4, 48, 192),
    "g5.24xlarge": (4, 96, 384), "g5.48xlarge": (8, 192, 768), "g6.xlarge": (1, 4, 16),
    "g6.2xlarge": (1, 8, 32), "g6.12xlarge": (4, 48, 192), "g6.48xlarge": (8, 192, 768),
    "p3.2xlarge": (1, 8, 61), "p3.8xlarge": (4, 32, 244), "p3.16xlarge": (8, 64, 488),
    "p4d.24xlarge": (8, 96, 1152), "p4de.24xlarge": (8, 96, 1152), "p5.48xlarge": (8, 192, 2048),
}  # fmt: skip
# Instance families with NVIDIA GPUs; any other family cannot serve a GPU request.
AWS_GPU_FAMILIES = ("g4dn", "g5", "g6", "g6e", "gr6", "p3", "p3dn", "p4d", "p4de", "p5",
                    "p5e", "p5en", "p6")  # fmt: skip
# GPUs built into GCP accelerator-optimized machine types (GCP GPU machine types page).
GCP_GPU_MACHINES = {
    "a2-highgpu-1g": 1, "a2-highgpu-2g": 2, "a2-highgpu-4g": 4, "a2-highgpu-8g": 8,
    "a2-megagpu-16g": 16, "a2-ultragpu-1g": 1, "a2-ultragpu-2g": 2, "a2-ultragpu-4g": 4,
    "a2-ultragpu-8g": 8, "a3-highgpu-8g": 8, "a3-megagpu-8g": 8, "g2-standard-4": 1,
    "g2-standard-8": 1, "g2-standard-12": 1, "g2-standard-16": 1, "g2-standard-24": 2,
    "g2-standard-32": 1, "g2-standard-48": 4, "g2-standard-96": 8,
}  # fmt: skip
GCP_DEFAULT_MACHINES = {1: "a2-highgpu-1g", 2: "a2-highgpu-2g", 4: "a2-highgpu-4g",
                        8: "a2-highgpu-8g", 16: "a2-megagpu-16g"}  # fmt: skip
GCP_CPU_MACHINE = "n2-standard-8"
GCP_PREEMPTED_EXIT_CODE = 50001  # Batch's exit code for a task whose VM was preempted
# Compute capability -> SkyPilot accelerator names of that architecture.
SKYPILOT_GPUS = {"7.0": ["V100"], "7.5": ["T4"], "8.0": ["A100", "A100-80GB"], "8.6": ["A10G"],
                 "8.9": ["L4", "L40S"], "9.0": ["H100", "H200"]}  # fmt: skip
K8S_SECRET = "qlc-secrets"
AWS_MAX_ATTEMPTS = 10


def render(target: str, shape: JobShape) -> dict[str, str]:
    renderers = {
        "kubernetes": kubernetes,
        "aws-batch": aws_batch,
        "gcp-batch": gcp_batch,
        "skypilot": skypilot,
    }
    return renderers[target](shape)


def dns_label(name: str) -> str:
    """A Kubernetes DNS-1123 label from a job name; room is left for '-<index>' pod names."""
    return re.sub(r"[^a-z0-9-]", "-", name.lower())[:52].strip("-")


def labels(shape: JobShape) -> dict[str, str]:
    return {"app.kubernetes.io/managed-by": "qlc", "qlc.dev/job": dns_label(shape.name)}


def output_env(shape: JobShape) -> dict[str, str]:
    """QLC_OUTPUT_DIR: where the engine mounts the output location in the container.

    The training script writes plain files, so every target mounts the bucket or volume;
    a relative output_dir becomes a folder on the volume."""
    subdir = shape.output_subdir
    return {"QLC_OUTPUT_DIR": f"{OUTPUT_MOUNT}/{subdir}" if subdir else OUTPUT_MOUNT}


def refuse_volume(shape: JobShape, target: str) -> None:
    if shape.output_volume is not None:
        raise ExportError(
            f"--volume is for kubernetes (a PVC) and aws-batch (an EFS file system); {target} "
            "writes runs to the bucket in job.output_dir"
        )


def pairs(env: dict[str, str]) -> list[dict[str, str]]:
    return [{"name": key, "value": value} for key, value in sorted(env.items())]


def quantity(size: str) -> str:
    """A Docker size ('16g') as a Kubernetes quantity ('16Gi')."""
    unit = size[-1].lower()
    return size[:-1] + {"k": "Ki", "m": "Mi", "g": "Gi"}[unit] if unit in "kmg" else size


def kubernetes(shape: JobShape) -> dict[str, str]:
    name = dns_label(shape.name)
    multi = shape.nodes > 1
    if shape.output_volume is None:
        raise ExportError(
            f"Kubernetes cannot mount {shape.output_uri} by itself: create a "
            "PersistentVolumeClaim backed by the bucket (Mountpoint for Amazon S3 CSI, "
            "Cloud Storage FUSE CSI or Azure Blob CSI driver) and pass --volume CLAIM"
        )
    # Kubernetes expands $(NAME) in env values; $$( keeps a user's text literal.
    plain = {key: value.replace("$(", "$$(") for key, value in shape.env.items()}
    env: list[dict[str, Any]] = pairs({**plain, **output_env(shape)})
    env += [
        {"name": secret, "valueFrom": {"secretKeyRef": {"name": K8S_SECRET, "key": secret}}}
        for secret in shape.secrets
    ]
    command = launch_command(shape)
    if multi:
        index = "metadata.annotations['batch.kubernetes.io/job-completion-index']"
        env += [
            {"name": "NODE_RANK", "valueFrom": {"fieldRef": {"fieldPath": index}}},
            {"name": "MASTER_ADDR", "value": f"{name}-0.{name}"},
        ]
        script = torchrun_script(shape, str(shape.nodes), "$NODE_RANK", "$MASTER_ADDR")
        command = ["/bin/sh", "-c", script]
    volumes: list[dict[str, Any]] = [
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": quantity(shape.shm_size)}}
    ]
    volumes.append({"name": "output", "persistentVolumeClaim": {"claimName": shape.output_volume}})
    mounts = [{"name": "dshm", "mountPath": "/dev/shm"},
              {"name": "output", "mountPath": OUTPUT_MOUNT}]  # fmt: skip
    job_labels = labels(shape)
    if shape.options.kueue_queue is not None:
        job_labels["kueue.x-k8s.io/queue-name"] = shape.options.kueue_queue
    limits = {"nvidia.com/gpu": str(shape.gpus)} if shape.gpus else {}
    text = render_template(
        "kubernetes.yaml.j2",
        name=name, secret_object=K8S_SECRET, multi=multi, nodes=shape.nodes,
        master_port=MASTER_PORT,
        labels=labels(shape), job_labels=job_labels, pod_labels=labels(shape),
        backoff_limit=shape.retries, uid=IMAGE_UID, image=shape.image, command=command, env=env,
        resources={"limits": limits} if limits else {}, volumes=volumes, mounts=mounts,
    )  # fmt: skip
    return {"job.yaml": text}


def aws_batch(shape: JobShape) -> dict[str, str]:
    if shape.retries + 1 > AWS_MAX_ATTEMPTS:
        raise ExportError(f"AWS Batch allows at most {AWS_MAX_ATTEMPTS - 1} retries "
                          f"(got {shape.retries})")  # fmt: skip
    instance = shape.options.instance_type
    name = re.sub(r"[^A-Za-z0-9_-]", "-", shape.name)
    if shape.output_uri is not None:
        raise ExportError(
            f"AWS Batch cannot mount {shape.output_uri}: set job.output_dir to a relative path "
            "and pass --volume fs-... (an EFS file system), or export for skypilot, which "
            "mounts s3:// buckets"
        )
    multi = shape.nodes > 1
    command = launch_command(shape)
    if multi:
        master = "${AWS_BATCH_JOB_MAIN_NODE_PRIVATE_IPV4_ADDRESS:-localhost}"
        script = torchrun_script(
            shape, "$AWS_BATCH_JOB_NUM_NODES", "$AWS_BATCH_JOB_NODE_INDEX", master
        )
        command = ["/bin/sh", "-c", script]
    container = {
        "image": shape.image, "command": command,
        "environment": pairs({**shape.env, **output_env(shape)}),
        "secrets": [{"name": secret, "valueFrom": secret} for secret in shape.secrets],
        "resourceRequirements": aws_resources(shape),
        "linuxParameters": {"sharedMemorySize": shape.shm_bytes // 2**20},
        "volumes": [{"name": "output", "efsVolumeConfiguration": {
            "fileSystemId": shape.output_volume, "transitEncryption": "ENABLED"}}],
        "mountPoints": [{"sourceVolume": "output", "containerPath": OUTPUT_MOUNT,
                         "readOnly": False}],
    }  # fmt: skip
    if multi and instance:
        container["instanceType"] = instance
    if shape.secrets:
        container["executionRoleArn"] = aws_execution_role(shape)
    files = {"job-definition.json": pretty_json(render_template(
        "aws-batch.job-definition.json.j2", name=name, multi=multi, nodes=shape.nodes,
        attempts=shape.retries + 1, tags=aws_tags(shape), container=container))}  # fmt: skip
    if shape.options.job_queue is not None:
        files["submit-job.json"] = pretty_json(render_template(
            "aws-batch.submit-job.json.j2", name=name, queue=shape.options.job_queue,
            multi=multi, nodes=shape.nodes, tags=aws_tags(shape)))  # fmt: skip
    return files


def aws_resources(shape: JobShape) -> list[dict[str, str]]:
    """GPUs, vCPUs and MiB: as asked, else the whole known instance (memory less 10% for the
    agent), else 8 vCPUs and 32 GiB per GPU."""
    _, instance_cpus, instance_gib = aws_instance(shape.options.instance_type, shape.gpus)
    per_gpu = max(shape.gpus, 1)
    cpus = shape.options.cpus or instance_cpus or 8 * per_gpu
    gib = shape.options.memory_gib or (int(instance_gib * 0.9) if instance_gib else 32 * per_gpu)
    resources = [{"type": "VCPU", "value": str(cpus)}, {"type": "MEMORY", "value": str(gib * 1024)}]
    if shape.gpus:
        resources.insert(0, {"type": "GPU", "value": str(shape.gpus)})
    return resources


def aws_execution_role(shape: JobShape) -> str:
    """The role AWS Batch assumes to read the secrets (SSM parameters of the same names)."""
    role = shape.options.execution_role
    if role is None:
        raise ExportError(
            f"aws-batch injects the secrets {', '.join(shape.secrets)} from SSM Parameter Store "
            "(parameters of the same names) through an execution role: pass "
            "--execution-role arn:aws:iam::ACCOUNT:role/NAME"
        )
    if not re.fullmatch(r"arn:aws[a-z-]*:iam::\d{12}:role/[\w+=,.@/-]+", role):
        raise ExportError(f"--execution-role {role!r} is not an IAM role ARN")
    return str(role)


def aws_tags(shape: JobShape) -> dict[str, str]:
    return {"managed-by": "qlc", "qlc:job": shape.name}


def aws_instance(instance: str | None, gpus: int) -> tuple[int | None, int | None, int | None]:
    """(GPUs, vCPUs, GiB) of a known instance type; refuse one that cannot serve the GPUs."""
    if instance is None:
        return None, None, None
    family = instance.split(".", 1)[0]
    if gpus and family not in AWS_GPU_FAMILIES:
        raise ExportError(
            f"AWS instance type {instance!r} has no GPUs but {gpus} per node are requested: "
            f"use a GPU family ({', '.join(AWS_GPU_FAMILIES)}) or --gpus-per-node 0"
        )
    known = AWS_INSTANCES.get(instance)
    if known is None:
        return None, None, None
    if gpus > known[0]:
        raise ExportError(
            f"AWS instance type {instance!r} has {known[0]} GPU(s) but {gpus} per node are "
            "requested: pick a larger type or lower --gpus-per-node"
        )
    return known


def gcp_batch(shape: JobShape) -> dict[str, str]:
    machine, accelerators = gcp_machine(shape)
    refuse_volume(shape, "gcp-batch")
    uri = shape.output_uri
    if uri is None or not uri.startswith("gs://"):
        raise ExportError(
            "GCP Batch mounts Cloud Storage buckets only: set job.output_dir to "
            f"gs://BUCKET/PATH (got {uri or shape.output_subdir!r})"
        )
    # gcsfuse options: the image's user owns the files; the container (not root) may enter.
    fuse = [f"--uid={IMAGE_UID}", f"--gid={IMAGE_UID}", "--implicit-dirs", "-o allow_other"]
    volumes = [{"gcs": {"remotePath": uri.removeprefix("gs://")}, "mountPath": OUTPUT_MOUNT,
                "mountOptions": fuse}]  # fmt: skip
    variables = {**shape.env, **output_env(shape)}
    command = launch_command(shape)
    if shape.nodes > 1:
        master = '$(head -n 1 "$BATCH_HOSTS_FILE")'
        script = torchrun_script(shape, "$BATCH_TASK_COUNT", "$BATCH_TASK_INDEX", master)
        command = ["/bin/sh", "-c", script]
    secret_variables = gcp_secrets(shape)
    text = render_template(
        "gcp-batch.job.json.j2",
        nodes=shape.nodes, multi=shape.nodes > 1, image=shape.image,
        entrypoint=command[0], commands=command[1:], options=f"--shm-size={shape.shm_size}",
        variables=variables, secret_variables=secret_variables, volumes=volumes,
        retries=shape.retries, preempted_exit_code=GCP_PREEMPTED_EXIT_CODE,
        machine=machine, accelerators=accelerators, gpus=shape.gpus, labels=gcp_labels(shape),
    )  # fmt: skip
    return {"job.json": pretty_json(text)}


def gcp_machine(shape: JobShape) -> tuple[str, list[dict[str, Any]]]:
    """The machine type and attached accelerators; refuse a machine without the GPUs."""
    gpus, machine = shape.gpus, shape.options.instance_type
    if gpus == 0:
        return machine or GCP_CPU_MACHINE, []
    if shape.options.accelerator is not None:
        if machine is None:
            raise ExportError("--accelerator on gcp-batch attaches GPUs to an N1 machine: "
                              "also pass --instance-type (e.g. n1-standard-16)")  # fmt: skip
        return machine, [{"type": shape.options.accelerator, "count": gpus}]
    if machine is None:
        machine = GCP_DEFAULT_MACHINES.get(gpus)
        if machine is None:
            raise ExportError(f"no default GCP machine type has {gpus} GPUs: pass "
                              "--instance-type (an a2/a3/g2 type)")  # fmt: skip
    built_in = GCP_GPU_MACHINES.get(machine, 0)
    if built_in < gpus:
        raise ExportError(
            f"GCP machine type {machine!r} has {built_in} built-in GPU(s) but {gpus} per node "
            "are requested: pick an a2/a3/g2 type with enough GPUs, or an N1 type with "
            "--accelerator TYPE (e.g. nvidia-tesla-t4)"
        )
    return machine, []


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


def gcp_labels(shape: JobShape) -> dict[str, str]:
    return {"managed-by": "qlc", "qlc-job": re.sub(r"[^a-z0-9_-]", "-", shape.name)[:63]}


def skypilot(shape: JobShape) -> dict[str, str]:
    refuse_volume(shape, "skypilot")
    uri = shape.output_uri
    if uri is None:
        raise ExportError("SkyPilot writes runs to a bucket it mounts: set job.output_dir to "
                          f"an s3:// or gs:// URI (got {shape.output_subdir!r})")  # fmt: skip
    if uri.startswith("az://"):
        raise ExportError("SkyPilot mounts Azure containers by their https://ACCOUNT.blob.core."
                          "windows.net/CONTAINER URL, not az://: use s3:// or gs:// for "
                          "skypilot")  # fmt: skip
    file_mounts = {OUTPUT_MOUNT: {"source": uri, "mode": "MOUNT"}}
    envs = {**shape.env, **output_env(shape)}
    if shape.nodes > 1:
        master = '$(echo "$SKYPILOT_NODE_IPS" | head -n 1)'
        run = torchrun_script(shape, "$SKYPILOT_NUM_NODES", "$SKYPILOT_NODE_RANK", master)
    else:
        run = "exec " + " ".join(launch_command(shape))
    text = render_template(
        "skypilot.task.yaml.j2",
        name=shape.name, nodes=shape.nodes, image_id=f"docker:{shape.image}",
        accelerators=skypilot_accelerators(shape), retries=shape.retries, envs=envs,
        secrets={secret: None for secret in shape.secrets}, file_mounts=file_mounts,
        run_options=[f"--shm-size={shape.shm_size}"], run=run,
    )  # fmt: skip
    return {"task.yaml": text}


def skypilot_accelerators(shape: JobShape) -> dict[str, int] | None:
    """{name: GPUs per node}: any accelerator of the architectures the image was built for."""
    if shape.gpus == 0:
        return None
    if shape.options.accelerator is not None:
        return {shape.options.accelerator: shape.gpus}
    names = [name for arch in shape.gpu_archs for name in SKYPILOT_GPUS.get(arch, [])]
    if not names:
        raise ExportError(f"no SkyPilot accelerator is known for GPU architectures "
                          f"{shape.gpu_archs}: pass --accelerator NAME (e.g. H100)")  # fmt: skip
    return {name: shape.gpus for name in names}


def pretty_json(text: str) -> str:
    """Re-indent a rendered JSON template the same way every time (and prove it parses)."""
    return json.dumps(json.loads(text), indent=2, ensure_ascii=False) + "\n"
