"""A real two-node job on this machine: the pod of the exported JobSet run as two containers of
the session's tiny image on a user-defined Docker network, with the job file's command, user
and environment (torchrun's c10d rendezvous at the first node's DNS name, gloo on CPU), and a
host directory mounted in both as the ReadWriteMany volume.

One node is sent SIGTERM mid-run (a preemption): both stop after the same step with one
checkpoint and exit 143, which the JobSet's failure policy retries by restarting the whole set;
the test restarts both as fresh containers, and the job resumes from its checkpoint and ends
with one manifest whose adapter is bit-identical to an uninterrupted run's (the spec is
deterministic). The two runs are two exports of one spec: two run directories under the same
output setting, neither reading the other's checkpoints.

The tiny image reads local files (its lock has no object-store backend). A job reads its
inputs from an object store, so the job file is exported for the same plan with object-store
inputs (inputs appear nowhere in a job file), and the tiny files are mounted where `qlc run`
mounts local inputs.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from export_support import IMAGE, with_store_inputs
from runtime_fakes import copy_tiny_project, tiny_plan

from qlc import contract
from qlc.runtime.docker_engine import ContainerRequest, DockerEngine, Mount
from qlc.runtime.export import OUTPUT_MOUNT, Export, export
from qlc.runtime.export_check import prepare_stand_in
from qlc.runtime.export_kubernetes import JOB_INDEX_ENV, REPLICATED_JOB
from qlc.runtime.launch import LocalInputs, container_paths, local_inputs
from qlc.runtime.records import BuildRecord

pytestmark = [pytest.mark.docker, pytest.mark.slow]
NODES = 2
STOP_AT_STEP = 2  # SIGTERM once this step is logged (the tiny run trains 12)
RUN_TIMEOUT_S = 900


def pod_of(result: Export) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """The JobSet's name, its pod spec and the training container."""
    jobset = yaml.safe_load(result.files["job.yaml"])
    (replicated,) = jobset["spec"]["replicatedJobs"]
    assert replicated["replicas"] == NODES
    pod = replicated["template"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    return jobset["metadata"]["name"], pod, container


def node_requests(image: str, result: Export, share: Path, inputs: LocalInputs,
                  network: str) -> list[ContainerRequest]:  # fmt: skip
    """Each node's container as the JobSet makes its pod: command, user, environment (the
    downward API's job index; Kubernetes turns $$( into $(), the first node answering to the
    rendezvous endpoint's DNS name."""
    name, pod, container = pod_of(result)
    context = pod["securityContext"]
    model_path, data_path = container_paths(inputs)
    assert inputs.model_dir and inputs.data_file and model_path and data_path
    env = {item["name"]: item["value"].replace("$$(", "$(") for item in container["env"]
           if "value" in item}  # fmt: skip
    env.update({contract.ENV_MODEL_PATH: model_path, contract.ENV_DATA_PATH: data_path})
    mounts = (
        Mount(str(share), OUTPUT_MOUNT, read_only=False),
        Mount(str(inputs.model_dir), model_path),
        Mount(str(inputs.data_file), data_path),
    )
    suffix = uuid.uuid4().hex[:8]
    return [
        ContainerRequest(
            image=image, environment={**env, JOB_INDEX_ENV: str(index)}, mounts=mounts,
            shm_size="1g", network=network, user=f"{context['runAsUser']}:{context['runAsGroup']}",
            command=tuple(container["command"]), labels={"qlc.test": "two-node-job"},
            name=f"qlc-test-{suffix}-node-{index}",
            aliases=(f"{name}-{REPLICATED_JOB}-{index}-0.{name}",),
        )
        for index in range(NODES)
    ]  # fmt: skip


class Job:
    """The nodes of one job, started together and removed at the end."""

    def __init__(self, engine: DockerEngine, requests: list[ContainerRequest]) -> None:
        self.engine, self.requests, self.ids = engine, requests, []

    def start(self) -> None:
        self.remove()
        self.ids = [self.engine.create(request) for request in self.requests]
        for container in self.ids:
            self.engine.start(container)

    def wait(self) -> list[int]:
        codes = [self.engine.wait(container) for container in self.ids]
        if any(code not in (0, contract.EXIT_PREEMPTED) for code in codes):
            logs = ["\n".join(list(self.engine.logs(c))[-60:]) for c in self.ids]
            pytest.fail(f"exit codes {codes}:\n" + "\n---\n".join(logs))
        return codes

    def remove(self) -> None:
        for container in self.ids:
            self.engine.remove(container)
        self.ids = []


@pytest.fixture
def network() -> Iterator[str]:
    engine = DockerEngine()
    name = f"qlc-test-{uuid.uuid4().hex[:12]}"
    network_id = engine.create_network(name, {"qlc.test": "two-node-job"})
    try:
        yield name
    finally:
        engine.remove_network(network_id)


def adapter(manifest: dict[str, Any]) -> dict[str, str]:
    """The adapter's weights and configuration by sha256 (the model card names the run)."""
    names = {f"{contract.ADAPTER_DIR}/{name}" for name in contract.ADAPTER_FILES}
    found = {s["name"]: s["digest"]["sha256"] for s in manifest["subject"] if s["name"] in names}
    assert set(found) == names
    return found


def train_steps(run_dir: Path) -> list[int]:
    path = run_dir / contract.METRICS_FILE
    lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
    records = [json.loads(line) for line in lines if line.strip()]
    return [r["step"] for r in records if r.get("event") == "train"]


def wait_for_step(job: Job, run_dir: Path, step: int) -> None:
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not train_steps(run_dir) or train_steps(run_dir)[-1] < step:
        states = [job.engine.state(container).status for container in job.ids]
        assert all(state == "running" for state in states), f"a node ended early: {states}"
        assert time.monotonic() < deadline, "the job did not reach its step in time"
        time.sleep(0.5)


def test_a_preempted_two_node_job_resumes_to_the_uninterrupted_adapter(
    tiny_image: BuildRecord, tmp_path: Path, network: str
) -> None:
    spec = copy_tiny_project(tmp_path / "project")
    plan = tiny_plan(spec)
    assert plan.job.deterministic and plan.schedule.save_steps
    inputs = local_inputs(plan, spec.parent, str(spec))
    share = tmp_path / "volume"  # the ReadWriteMany claim both nodes mount
    prepare_stand_in(share)
    engine = DockerEngine()

    def exported() -> tuple[Export, Path, Job]:
        result = export(with_store_inputs(plan), IMAGE, "kubernetes", nodes=NODES, retries=1,
                        volume="qlc-runs")  # fmt: skip
        run_dir = share / result.run_dir.removeprefix(OUTPUT_MOUNT + "/")
        return result, run_dir, Job(engine, node_requests(tiny_image.tag, result, share,
                                                          inputs, network))  # fmt: skip

    first, first_dir, job = exported()
    try:
        job.start()
        assert job.wait() == [0, 0]
    finally:
        job.remove()
    uninterrupted = contract.read_manifest_file(first_dir / contract.MANIFEST_FILE)
    assert uninterrupted["predicate"]["run"]["world_size"] == NODES
    first_bytes = (first_dir / contract.MANIFEST_FILE).read_bytes()

    second, second_dir, job = exported()  # the same spec exported again: a run of its own
    try:
        job.start()
        wait_for_step(job, second_dir, STOP_AT_STEP)
        engine.kill(job.ids[1], "SIGTERM")  # the platform preempts one node
        assert job.wait() == [contract.EXIT_PREEMPTED] * NODES  # both: the set is restarted
        stopped = contract.read_manifest_file(second_dir / contract.MANIFEST_FILE)["predicate"]
        saved = sorted(p.name for p in (second_dir / contract.CHECKPOINTS_DIR).iterdir())
        job.start()  # the JobSet's restart: every node anew, the same job file
        assert job.wait() == [0, 0]
    finally:
        job.remove()

    assert stopped["status"] == "interrupted" and "saved: the run resumes from it" in str(
        stopped["error"]
    )
    checkpoint = str(stopped["error"]).split("; ", 1)[1].split(" saved", 1)[0]
    final = contract.read_manifest_file(second_dir / contract.MANIFEST_FILE)
    assert final["predicate"]["status"] == "succeeded"
    assert final["predicate"]["run"]["resumed_from"] == checkpoint
    assert final["predicate"]["run"]["run_id"] == second.run_id != first.run_id
    steps = train_steps(second_dir)
    assert steps[-1] == uninterrupted["predicate"]["metrics"]["steps"]
    assert adapter(final) == adapter(uninterrupted)  # bit for bit
    # Two run directories under one output setting; the first untouched by the second.
    job_dir = share / "runs" / plan.job.name
    assert sorted(p.name for p in job_dir.iterdir()) == sorted([first.run_id, second.run_id])
    assert (first_dir / contract.MANIFEST_FILE).read_bytes() == first_bytes
    resumes = [json.loads(line) for line in (second_dir / contract.METRICS_FILE).open()
               if '"resume"' in line]  # fmt: skip
    assert [r["checkpoint"] for r in resumes] == [checkpoint] and checkpoint in saved
    assert not (second_dir / contract.PREEMPTED_FLAG).exists()
