"""Kubernetes job files: a batch/v1 Job for one node, a JobSet (jobset.x-k8s.io) for several.

Both retry only preemption. The pod failure policy of every Job fails it at once on a user
error (exit 2) or any exit other than a platform kill (143, 137), and counts a pod with the
DisruptionTarget condition (preempted, evicted) like a kill. A single-node Job retries what
counts up to backoffLimit. In a JobSet each node's Job has backoffLimit 0, so a counted
failure fails that Job with reason BackoffLimitExceeded: the JobSet's first failure policy
rule restarts the whole set (gang restart, up to maxRestarts); any other failed Job fails the
set. The nodes find each other through the JobSet's headless Service: torchrun's c10d
rendezvous is hosted by the first node, at its stable DNS name.
"""

from __future__ import annotations

import re
from typing import Any

from qlc.contract import (
    CONTAINER_GID,
    CONTAINER_UID,
    EXIT_USER_ERROR,
    PREEMPTION_GRACE_S,
    RETRYABLE_EXIT_CODES,
)
from qlc.runtime.export import (
    OUTPUT_MOUNT,
    Export,
    ExportError,
    JobShape,
    launch_command,
    node_script,
    render_template,
    yaml_file,
)

K8S_SECRET = "qlc-secrets"
K8S_CONTAINER = "train"
REPLICATED_JOB = "node"
NAME_ROOM = 24  # of a job name in object names: <job>-<run id>-node-<i>-0 fits 63 characters
JOB_INDEX_ENV = "JOBSET_JOB_INDEX"
JOB_INDEX_ANNOTATION = "jobset.sigs.k8s.io/job-index"
DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")
LABEL_VALUE = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?")


def dns_label(text: str) -> str:
    """A DNS-1123 label made of `text` (lowercase letters, digits and '-')."""
    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")


def object_name(shape: JobShape) -> str:
    """<job>-<run id>: two exports of one spec are two objects."""
    job = dns_label(shape.name)[:NAME_ROOM].strip("-")
    return f"{job}-{dns_label(shape.run_id)}"


def labels(shape: JobShape) -> dict[str, str]:
    return {"app.kubernetes.io/managed-by": "qlc", "qlc.dev/job": dns_label(shape.name)[:63],
            "qlc.dev/run-id": shape.run_id}  # fmt: skip


def pod_failure_rules() -> list[dict[str, Any]]:
    exit_codes = {"containerName": K8S_CONTAINER, "operator": "In", "values": [EXIT_USER_ERROR]}
    other = {"containerName": K8S_CONTAINER, "operator": "NotIn",
             "values": sorted(RETRYABLE_EXIT_CODES)}  # fmt: skip
    return [
        {"action": "FailJob", "onExitCodes": exit_codes},
        {"action": "Count", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
        {"action": "FailJob", "onExitCodes": other},
    ]


def jobset_rules() -> list[dict[str, Any]]:
    return [
        {"name": "preempted", "action": "RestartJobSet",
         "onJobFailureReasons": ["BackoffLimitExceeded"]},
        {"name": "failed", "action": "FailJobSet"},
    ]  # fmt: skip


def quantity(size: str) -> str:
    """A Docker size ('16g') as a Kubernetes quantity ('16Gi')."""
    unit = size[-1].lower()
    return size[:-1] + {"k": "Ki", "m": "Mi", "g": "Gi"}[unit] if unit in "kmg" else size


def check_options(shape: JobShape) -> str:
    """The claim name; refusals for what a Kubernetes job file cannot say."""
    claim: str | None = shape.output_volume
    if claim is None:
        raise ExportError(
            f"Kubernetes cannot mount {shape.output_uri} by itself: create a "
            "PersistentVolumeClaim backed by the bucket (Mountpoint for Amazon S3 CSI, "
            "Cloud Storage FUSE CSI or Azure Blob CSI driver) and pass --volume CLAIM"
        )
    if not DNS_SUBDOMAIN.fullmatch(claim):
        raise ExportError(f"--volume {claim!r} is not a PersistentVolumeClaim name "
                          "(lowercase letters, digits, '-' and '.')")  # fmt: skip
    queue = shape.options.kueue_queue
    if queue is not None and not LABEL_VALUE.fullmatch(queue):
        raise ExportError(f"--kueue-queue {queue!r} is not a LocalQueue name")
    if shape.options.spot:
        raise ExportError(
            "--spot: a Kubernetes job lands on Spot nodes through the cluster's node labels "
            "and taints, which qlc does not know: drop --spot and add the nodeSelector and "
            "tolerations of your Spot node pool to the pod template"
        )
    return claim


def pod_values(shape: JobShape, claim: str) -> dict[str, Any]:
    """What templates/jobs/kubernetes.pod.json.j2 receives."""
    # Kubernetes expands $(NAME) in env values and commands; $$( keeps the text literal.
    plain = {key: value.replace("$(", "$$(") for key, value in shape.env.items()}
    env: list[dict[str, Any]] = [{"name": k, "value": v} for k, v in sorted(plain.items())]
    env += [
        {"name": secret, "valueFrom": {"secretKeyRef": {"name": K8S_SECRET, "key": secret}}}
        for secret in shape.secrets
    ]
    command = launch_command()
    if shape.multi:
        index = f"metadata.annotations['{JOB_INDEX_ANNOTATION}']"
        env.append({"name": JOB_INDEX_ENV, "valueFrom": {"fieldRef": {"fieldPath": index}}})
        name = object_name(shape)
        endpoint = f"{name}-{REPLICATED_JOB}-0-0.{name}"  # the first pod; subdomain = name
        script = node_script(shape, endpoint, f'[ "${JOB_INDEX_ENV}" = 0 ]')
        command = ["/bin/sh", "-c", script.replace("$(", "$$(")]
    limits = {"nvidia.com/gpu": str(shape.gpus)} if shape.gpus else {}
    return {
        "pod_labels": labels(shape), "grace_s": PREEMPTION_GRACE_S, "uid": CONTAINER_UID,
        "gid": CONTAINER_GID, "container": K8S_CONTAINER, "image": shape.image,
        "command": command, "env": env, "resources": {"limits": limits} if limits else {},
        "mounts": [{"name": "dshm", "mountPath": "/dev/shm"},
                   {"name": "output", "mountPath": OUTPUT_MOUNT}],
        "volumes": [
            {"name": "dshm", "emptyDir": {"medium": "Memory",
                                          "sizeLimit": quantity(shape.shm_size)}},
            {"name": "output", "persistentVolumeClaim": {"claimName": claim}},
        ],
    }  # fmt: skip


def kubernetes(shape: JobShape) -> Export:
    claim = check_options(shape)
    job_labels = labels(shape)
    if shape.options.kueue_queue is not None:
        job_labels["kueue.x-k8s.io/queue-name"] = shape.options.kueue_queue
    values = {
        **pod_values(shape, claim), "name": object_name(shape), "run_id": shape.run_id,
        "job_labels": job_labels, "retries": shape.retries, "secret_object": K8S_SECRET,
        "pod_failure_rules": pod_failure_rules(), "claim": claim, "nodes": shape.nodes,
        "jobset_rules": jobset_rules(), "replicated_job": REPLICATED_JOB,
    }  # fmt: skip
    template = "kubernetes.jobset.yaml.j2" if shape.multi else "kubernetes.job.yaml.j2"
    notes = [
        f"the PVC {claim} must let UID/GID {CONTAINER_UID} write (the pod sets fsGroup "
        f"{CONTAINER_GID}; some CSI drivers need their own uid/gid mount options)"
    ]
    if shape.multi:
        notes = [
            f"REQUIRED: the PVC {claim} must be ReadWriteMany: all {shape.nodes} nodes mount "
            "it, rank 0 writes the run directory and every node reads it to resume",
            "needs the JobSet controller (jobset.x-k8s.io) in the cluster; with Kueue "
            "(--kueue-queue) the nodes are admitted together (gang scheduling)",
            *notes,
        ]
    return Export(
        target="kubernetes", files={"job.yaml": yaml_file(render_template(template, **values))},
        run_id=shape.run_id, env=shape.env, run_dir=shape.run_dir,
        run_location=f"PVC {claim}: {shape.run_path}", gpu=None, notes=notes,
    )  # fmt: skip
