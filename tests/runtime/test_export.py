"""qlc export: golden job files per target, validated by each service's own model, the fixes of
issue 16 asserted in the rendered files, and the refusals. Regenerate the goldens with
QLC_UPDATE_GOLDEN=1 and review the diff (SkyPilot's own loader: regen_skypilot_schema.py)."""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml
from export_support import (
    CASES,
    EFS,
    GOLDEN,
    IMAGE,
    JOB_ROLE,
    NOTE,
    RUN_ID,
    export_case,
    jobset_model,
    main_file,
    make_plan,
    validate,
    validate_aws,
    validate_gcp,
    validate_kubernetes,
    validate_skypilot,
)

from qlc.compiler.context import compile_spec
from qlc.contract import PREEMPTION_GRACE_S, USER_ERROR_FLAG
from qlc.runtime.export import TARGETS, ExportError, export, new_run_id, write_export

UPDATE = os.environ.get("QLC_UPDATE_GOLDEN") == "1"
PYTHON_COMMAND = ["/opt/venv/bin/python", "/qlc/train.py"]


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden(case: str) -> None:
    files = export_case(case).files
    expected_dir = GOLDEN / case
    if UPDATE:
        for stale in expected_dir.glob("*") if expected_dir.is_dir() else []:
            stale.unlink()
        write_export(files, expected_dir)
    expected = {path.name: path.read_text(encoding="utf-8") for path in expected_dir.iterdir()}
    assert sorted(files) == sorted(expected), "files differ: missing or extra"
    for name, content in files.items():
        assert content == expected[name], f"{case}/{name} differs from the golden file"


def test_every_target_has_single_and_multi_goldens() -> None:
    assert {case.rsplit("-", 1)[0] for case in CASES} == set(TARGETS)
    assert {case.rsplit("-", 1)[1] for case in CASES} == {"single", "multi"}


@pytest.mark.parametrize("case", sorted(CASES))
def test_exported_files_validate_against_the_service_model(case: str) -> None:
    target = CASES[case][1]["target"]
    for name, text in export_case(case).files.items():
        validate(target, name, text)


def test_validators_reject_what_the_service_would() -> None:
    """The validators are not string checks: a misspelled or mistyped field fails them."""
    single = main_file("kubernetes-single")
    with pytest.raises(AssertionError):
        validate_kubernetes(single.replace("backoffLimit", "backofLimit"))
    jobset = yaml.safe_load(main_file("kubernetes-multi"))
    jobset["spec"]["failurePolicy"]["maxRestart"] = jobset["spec"]["failurePolicy"].pop(
        "maxRestarts"
    )
    with pytest.raises(AssertionError, match="JobSet model"):
        jobset_model(jobset)
    jobset = yaml.safe_load(main_file("kubernetes-multi"))
    jobset["spec"]["replicatedJobs"][0]["replicas"] = "2"
    with pytest.raises(ValueError, match="replicas"):
        jobset_model(jobset)
    jobset = yaml.safe_load(main_file("kubernetes-multi"))
    pod = jobset["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
    pod["terminationGracePeriod"] = pod.pop("terminationGracePeriodSeconds")
    with pytest.raises(AssertionError):
        jobset_model(jobset)
    aws = json.loads(main_file("aws-batch-single"))
    aws["containerProperties"]["linuxParameters"]["sharedMemorySize"] = "16g"
    with pytest.raises(AssertionError, match="sharedMemorySize"):
        validate_aws("job-definition.json", json.dumps(aws))
    gcp = main_file("gcp-batch-single").replace('"taskCount"', '"taskCounts"')
    with pytest.raises(Exception, match="taskCounts"):
        validate_gcp(gcp)
    sky = main_file("skypilot-single").replace("num_nodes", "nodes")
    with pytest.raises(Exception, match="nodes"):
        validate_skypilot(sky)
    sky = main_file("skypilot-single").replace("MOUNT_CACHED", "MOUNT_CACHE")
    with pytest.raises(Exception, match="MOUNT_CACHE"):
        validate_skypilot(sky)


# --- run-scoped outputs -----------------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_job_writes_under_output_job_run_id(case: str) -> None:
    result = export_case(case)
    job = "export-test.v1"
    assert result.run_id == RUN_ID
    assert result.env["QLC_RUN_ID"] == RUN_ID
    assert result.env["QLC_OUTPUT_DIR"] == result.run_dir
    assert result.run_dir.endswith(f"/{job}/{RUN_ID}")
    below = "runs/" if CASES[case][0] == "runs" else ""
    assert result.run_dir == f"/qlc/output/{below}{job}/{RUN_ID}"
    assert result.run_location.endswith(f"{below}{job}/{RUN_ID}")
    text = main_file(case)
    assert RUN_ID in text and result.run_dir in text


def test_two_exports_of_one_spec_get_different_run_ids_and_directories() -> None:
    plan = make_plan("gs://qlc-test-bucket/runs")
    first = export(plan, IMAGE, "gcp-batch", project="qlc-test-project")
    second = export(plan, IMAGE, "gcp-batch", project="qlc-test-project")
    assert first.run_id != second.run_id
    assert first.run_dir != second.run_dir and first.run_location != second.run_location
    first_env = json.loads(first.files["job.json"])["taskGroups"][0]["taskSpec"]["environment"]
    assert first_env["variables"]["QLC_OUTPUT_DIR"] == first.run_dir
    stamp, token = new_run_id().split("-")
    assert len(stamp) == 16 and stamp.endswith("Z") and len(token) == 6


def test_kubernetes_object_names_carry_the_run_id() -> None:
    job = yaml.safe_load(main_file("kubernetes-single"))
    assert job["metadata"]["name"] == f"export-test-v1-{RUN_ID.lower()}"
    assert job["metadata"]["labels"]["qlc.dev/run-id"] == RUN_ID
    jobset = yaml.safe_load(main_file("kubernetes-multi"))
    first_pod = f"{jobset['metadata']['name']}-node-0-0"
    assert len(first_pod) <= 63  # a pod hostname is a DNS label


# --- Kubernetes -------------------------------------------------------------------------------


def pod_failure_rules() -> list[dict[str, Any]]:
    return [
        {"action": "FailJob",
         "onExitCodes": {"containerName": "train", "operator": "In", "values": [2]}},
        {"action": "Count", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
        {"action": "FailJob",
         "onExitCodes": {"containerName": "train", "operator": "NotIn", "values": [137, 143]}},
    ]  # fmt: skip


def test_kubernetes_single_node_job_retries_preemption_only() -> None:
    job = yaml.safe_load(main_file("kubernetes-single"))
    assert (job["apiVersion"], job["kind"]) == ("batch/v1", "Job")
    assert job["spec"]["backoffLimit"] == 3
    assert job["spec"]["podFailurePolicy"]["rules"] == pod_failure_rules()
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"  # podFailurePolicy needs it
    assert pod["terminationGracePeriodSeconds"] == PREEMPTION_GRACE_S == 120
    assert pod["securityContext"]["runAsUser"] == pod["securityContext"]["fsGroup"] == 10001
    container = pod["containers"][0]
    assert container["command"] == PYTHON_COMMAND
    env = {item["name"]: item for item in container["env"]}
    assert env["NOTE"]["value"] == NOTE.replace("$(", "$$(")  # Kubernetes passes $$( as $(
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "qlc-secrets",
                                                             "key": "HF_TOKEN"}  # fmt: skip
    assert "QLC_USER_ERROR_FILE" not in env  # one node: the image's launcher keeps its own


def test_kubernetes_multi_node_is_a_jobset_with_gang_restart_and_elastic_rendezvous() -> None:
    text = main_file("kubernetes-multi")
    assert "ReadWriteMany" in text.split("---")[0]  # stated in the file's comments
    jobset = yaml.safe_load(text)
    name = jobset["metadata"]["name"]
    assert jobset["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    spec = jobset["spec"]
    assert spec["failurePolicy"] == {"maxRestarts": 3, "rules": [
        {"name": "preempted", "action": "RestartJobSet",
         "onJobFailureReasons": ["BackoffLimitExceeded"]},
        {"name": "failed", "action": "FailJobSet"},
    ]}  # fmt: skip
    assert spec["network"] == {"enableDNSHostnames": True, "publishNotReadyAddresses": True}
    (replicated,) = spec["replicatedJobs"]
    assert replicated["name"] == "node" and replicated["replicas"] == 2
    job = replicated["template"]["spec"]
    assert job["backoffLimit"] == 0  # a counted failure fails the Job: the set restarts
    assert job["podFailurePolicy"]["rules"] == pod_failure_rules()
    pod = job["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == PREEMPTION_GRACE_S
    assert pod["volumes"][1]["persistentVolumeClaim"]["claimName"] == "qlc-runs"
    container = pod["containers"][0]
    assert container["resources"]["limits"] == {"nvidia.com/gpu": "4"}
    env = {item["name"]: item for item in container["env"]}
    index = "metadata.annotations['jobset.sigs.k8s.io/job-index']"
    assert env["JOBSET_JOB_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"] == index
    flag = f"/qlc/output/runs/export-test.v1/{RUN_ID}/{USER_ERROR_FLAG}"
    assert env["QLC_USER_ERROR_FILE"]["value"] == flag  # on the shared volume
    shell, dash_c, script = container["command"]
    assert (shell, dash_c) == ("/bin/sh", "-c")
    torchrun = torchrun_words(script)
    assert torchrun[0] == "/opt/venv/bin/torchrun"
    assert option(torchrun, "--rdzv-backend") == "c10d"
    assert option(torchrun, "--rdzv-endpoint") == f"{name}-node-0-0.{name}:29500"
    assert option(torchrun, "--rdzv-id") == "$QLC_RUN_ID"
    assert option(torchrun, "--rdzv-conf") == "is_host=$host"
    assert option(torchrun, "--nnodes") == "2" and option(torchrun, "--nproc-per-node") == "4"
    assert option(torchrun, "--max-restarts") == "0"
    assert int(option(torchrun, "--shutdown-timeout")) < PREEMPTION_GRACE_S
    assert torchrun[-1] == "/qlc/train.py"
    assert 'if [ "$JOBSET_JOB_INDEX" = 0 ]; then host=1; else host=0; fi' in script


def torchrun_words(script: str) -> list[str]:
    line = next(line for line in script.splitlines() if "torchrun" in line)
    words = shlex.split(line.removesuffix(" &"), posix=True)
    return words


def option(words: list[str], name: str) -> str:
    return words[words.index(name) + 1]


# --- AWS Batch --------------------------------------------------------------------------------


def test_aws_mounts_efs_through_an_access_point_with_transit_encryption_and_iam() -> None:
    definition = json.loads(main_file("aws-batch-single"))
    container = definition["containerProperties"]
    assert container["volumes"] == [{"name": "output", "efsVolumeConfiguration": {
        "fileSystemId": "fs-0123456789abcdef0", "transitEncryption": "ENABLED",
        "authorizationConfig": {"accessPointId": "fsap-0123456789abcdef0", "iam": "ENABLED"},
    }}]  # fmt: skip
    assert container["jobRoleArn"] == JOB_ROLE  # IAM authorization uses the job's role
    assert container["command"] == PYTHON_COMMAND
    without_role = json.loads(main_file("aws-batch-single", job_role=None))
    efs = without_role["containerProperties"]["volumes"][0]["efsVolumeConfiguration"]
    assert efs["authorizationConfig"]["iam"] == "DISABLED"
    assert efs["transitEncryption"] == "ENABLED"  # an access point requires it


def test_aws_retries_only_when_the_instance_went_away() -> None:
    definition = json.loads(main_file("aws-batch-single"))
    assert definition["retryStrategy"] == {"attempts": 4, "evaluateOnExit": [
        {"onExitCode": "2", "action": "EXIT"},
        {"onStatusReason": "Host EC2*", "action": "RETRY"},
        {"onReason": "*", "action": "EXIT"},
    ]}  # fmt: skip


def test_aws_multi_node_parallel_job_says_it_cannot_run_on_spot() -> None:
    result = export_case("aws-batch-multi")
    assert any("cannot run on Spot" in note for note in result.notes)
    assert any("ECS_CONTAINER_STOP_TIMEOUT=120s" in note for note in result.notes)
    definition = json.loads(result.files["job-definition.json"])
    assert definition["type"] == "multinode"
    assert definition["jobDefinitionName"].endswith(RUN_ID)
    container = definition["nodeProperties"]["nodeRangeProperties"][0]["container"]
    torchrun = torchrun_words(container["command"][2])
    endpoint = "${AWS_BATCH_JOB_MAIN_NODE_PRIVATE_IPV4_ADDRESS:-localhost}:29500"
    assert option(torchrun, "--rdzv-endpoint") == endpoint
    assert torchrun[0] == "/opt/venv/bin/torchrun"
    assert json.loads(result.files["submit-job.json"])["jobDefinition"].endswith(RUN_ID)
    with pytest.raises(ExportError, match="multi-node parallel jobs do not run on Spot"):
        export_case("aws-batch-multi", spot=True)
    with pytest.raises(ExportError, match="compute environment is of type SPOT"):
        export_case("aws-batch-single", spot=True)


# --- Google Cloud Batch -----------------------------------------------------------------------


def test_gcp_renames_in_gcsfuse_retries_preemption_only_and_runs_on_spot() -> None:
    job = json.loads(main_file("gcp-batch-single"))
    task = job["taskGroups"][0]["taskSpec"]
    options = task["volumes"][0]["mountOptions"]
    assert "--rename-dir-limit=100000" in options and "--uid=10001" in options
    assert task["maxRetryCount"] == 3
    assert task["lifecyclePolicies"] == [
        {"action": "RETRY_TASK", "actionCondition": {"exitCodes": [50001]}}
    ]  # RETRY_TASK fails every other exit code: 2 included
    assert job["allocationPolicy"]["instances"][0]["policy"]["provisioningModel"] == "SPOT"
    runnable = task["runnables"][0]["container"]
    assert [runnable["entrypoint"], *runnable["commands"]] == PYTHON_COMMAND


def test_gcp_multi_node_takes_rank_zero_and_ranks_from_the_hosts_file() -> None:
    job = json.loads(main_file("gcp-batch-multi"))
    group = job["taskGroups"][0]
    assert group["requireHostsFile"] is True
    script = group["taskSpec"]["runnables"][0]["container"]["commands"][1]
    torchrun = torchrun_words(script)
    assert '--rdzv-endpoint "$(head -n 1 "$BATCH_HOSTS_FILE"):29500"' in script
    assert "--node-rank" not in torchrun and "BATCH_TASK_INDEX" not in script
    assert job["allocationPolicy"]["instances"][0]["policy"]["provisioningModel"] == "STANDARD"
    with pytest.raises(ExportError, match="retries a preempted task alone"):
        export_case("gcp-batch-multi", retries=2)


# --- SkyPilot ---------------------------------------------------------------------------------


def test_skypilot_mounts_cached_uses_spot_and_absolute_paths() -> None:
    text = main_file("skypilot-single")
    task = yaml.safe_load(text)
    assert task["file_mounts"] == {"/qlc/output": {"source": "s3://qlc-test-bucket/runs",
                                                   "mode": "MOUNT_CACHED"}}  # fmt: skip
    assert task["resources"]["use_spot"] is True
    assert task["resources"]["job_recovery"] == {"strategy": "FAILOVER",
                                                 "max_restarts_on_errors": 0}  # fmt: skip
    assert shlex.split(task["run"]) == ["exec", *PYTHON_COMMAND]
    assert "sky jobs launch task.yaml --secret HF_TOKEN --secret WANDB_API_KEY" in text
    multi = yaml.safe_load(main_file("skypilot-multi"))
    assert multi["resources"]["use_spot"] is False
    assert multi["resources"]["accelerators"] == {"H100": 8}
    assert torchrun_words(multi["run"])[0] == "/opt/venv/bin/torchrun"
    assert '--rdzv-endpoint "$(echo "$SKYPILOT_NODE_IPS" | head -n 1):29500"' in multi["run"]


def test_skypilot_without_retries_launches_without_recovery() -> None:
    text = main_file("skypilot-single", retries=0)
    assert "job_recovery" not in yaml.safe_load(text)["resources"]
    assert "sky launch task.yaml" in text and "sky jobs launch" not in text


def test_skypilot_offers_gpus_the_image_architectures_run_on() -> None:
    task = yaml.safe_load(main_file("skypilot-single"))
    offered = set(task["resources"]["accelerators"])
    assert "L4" in offered  # 8.9 runs the image's 8.6 code (same major, later minor)
    assert "V100" not in offered  # 7.0 is older than every architecture of the image


# --- refusals ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("image", "message"),
    [
        ("registry.example.com/qlc/export-test:latest", "has no digest"),
        ("qlc/export-test", "has no digest"),
        (f"{IMAGE.split('@')[0]}:v1@{IMAGE.split('@')[1]}", "both a tag and a digest"),
        ("registry.example.com/qlc/export-test@sha256:1234", "not a digest reference"),
    ],
)
def test_refuses_an_image_without_a_digest(image: str, message: str) -> None:
    plan = make_plan("s3://qlc-test-bucket/runs")
    for target in TARGETS:
        with pytest.raises(ExportError, match=message):
            export(plan, image, target)


def test_retries_need_checkpoints() -> None:
    plan = make_plan("s3://b/runs", train="max_steps = 100")
    assert plan.train.schedule.save_steps is None
    for target in TARGETS:
        with pytest.raises(ExportError, match=r"Set train\.save_steps.*or pass --retries 0"):
            export(plan, IMAGE, target, volume="claim")
    files = export(plan, IMAGE, "skypilot", retries=0).files
    validate_skypilot(files["task.yaml"])


@pytest.mark.parametrize(
    ("edits", "message"),
    [
        ({"model": 'path = "models/llama"'}, r"model\.path = 'models/llama'"),
        ({"data": 'path = "data/train.jsonl"\nformat = "text"'}, r"data\.path = "),
    ],
)
def test_local_inputs_are_refused_with_the_fix(edits: dict[str, str], message: str) -> None:
    source = SPEC_WITH_LOCAL_INPUTS.format(
        model=edits.get("model", 'id = "NousResearch/Llama-2-7b-chat-hf"'),
        data=edits.get("data", 'id = "mlabonne/guanaco-llama2-1k"\nformat = "text"'),
    )
    plan = compile_spec(source.encode(), "local.toml", require_lock=False).plan
    for target in TARGETS:
        with pytest.raises(ExportError, match=message) as refused:
            export(plan, IMAGE, target, volume="claim")
        assert "use a hub source" in str(refused.value).lower()


SPEC_WITH_LOCAL_INPUTS = """
[job]
name = "local"
output_dir = "s3://b/runs"

[model]
{model}

[data]
{data}

[train]
save_steps = 10
"""


@pytest.mark.parametrize(
    ("output_dir", "target", "arguments", "message"),
    [
        ("s3://b/runs", "kubernetes", {"nodes": 0, "volume": "c"}, "--nodes must be at least 1"),
        ("s3://b/runs", "skypilot", {"nodes": -2}, "--nodes must be at least 1"),
        ("s3://b/runs", "skypilot", {"retries": -1}, "--retries must be 0 or more"),
        ("runs", "aws-batch", {"instance_type": "m5.xlarge", **EFS}, "has no GPUs"),
        ("runs", "aws-batch", {"instance_type": "g5.xlarge", "gpus_per_node": 4, **EFS},
         "has 1 GPU"),
        ("runs", "aws-batch", {"retries": 10, **EFS}, "at most 9 retries"),
        ("runs", "aws-batch", {"volume": "fs-0123456789abcdef0", "execution_role": EFS[
            "execution_role"]}, "pass --efs-access-point fsap-.*create-access-point"),
        ("runs", "aws-batch", {**EFS, "efs_access_point": "ap-1"}, "not an EFS access point"),
        ("runs", "aws-batch", {**EFS, "volume": "my-efs"}, "not an EFS file system id"),
        ("runs", "aws-batch", {**EFS, "execution_role": None}, "pass --execution-role"),
        ("runs", "aws-batch", {**EFS, "execution_role": "qlc-role"}, "not an IAM role ARN"),
        ("runs", "aws-batch", {**EFS, "job_role": "role"}, "--job-role 'role' is not an IAM"),
        ("gs://b/runs", "gcp-batch", {"instance_type": "n2-standard-8"}, "has 0 built-in GPU"),
        ("gs://b/runs", "gcp-batch", {"gpus_per_node": 3}, "no default GCP machine type has 3"),
        ("gs://b/runs", "gcp-batch", {}, "pass --project PROJECT_ID"),
        ("gs://b/runs", "gcp-batch", {"project": "Bad_Project"}, "not a GCP project id"),
        ("gs://b/runs", "gcp-batch", {"project": "qlc-test-project", "retries": 11},
         "at most 10 retries"),
        ("s3://b/runs", "kubernetes", {"gpus_per_node": -1, "volume": "c"}, "0 or more"),
        ("s3://b/runs", "skypilot", {"gpus_per_node": 0}, "fewer than the spec's runtime.gpus"),
        ("s3://b/runs", "nomad", {}, "unknown target 'nomad'"),
        ("s3://b/runs", "kubernetes", {"volume": "c", "spot": True}, "node labels and taints"),
        ("s3://b/runs", "kubernetes", {"volume": "Bad Claim"}, "not a PersistentVolumeClaim"),
        ("s3://b/runs", "kubernetes", {"volume": "c", "kueue_queue": "a\nb"}, "not a LocalQueue"),
        # output locations a service cannot mount
        ("runs", "kubernetes", {}, "local path, which a batch job cannot reach"),
        ("s3://b/runs", "kubernetes", {}, "Kubernetes cannot mount s3://b/runs"),
        ("s3://b/runs", "aws-batch", {}, "AWS Batch cannot mount s3://b/runs"),
        ("s3://b/runs", "aws-batch", EFS, "AWS Batch cannot mount s3://b/runs"),
        ("s3://b/runs", "gcp-batch", {}, "mounts Cloud Storage buckets only"),
        ("runs", "gcp-batch", EFS, "--volume is for kubernetes"),
        ("runs", "skypilot", EFS, "--volume is for kubernetes"),
        ("az://container/runs", "skypilot", {}, r"blob\.core\.windows\.net"),
    ],
)  # fmt: skip
def test_refusals(output_dir: str, target: str, arguments: dict[str, Any], message: str) -> None:
    with pytest.raises(ExportError, match=message):
        export(make_plan(output_dir), IMAGE, target, **arguments)


def test_cpu_only_export_is_allowed_on_a_cpu_instance() -> None:
    result = export(make_plan("runs", gpus=0), IMAGE, "aws-batch", instance_type="m5.xlarge",
                    **EFS)  # fmt: skip
    validate_aws("job-definition.json", result.files["job-definition.json"])
    assert '"GPU"' not in result.files["job-definition.json"]


def test_secret_values_never_reach_a_job_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_secret_value_do_not_write")
    for case in CASES:
        for text in export_case(case).files.values():
            assert "hf_secret_value_do_not_write" not in text


def test_write_export_refuses_to_overwrite(tmp_path: Path) -> None:
    files = export_case("kubernetes-single").files
    assert [path.name for path in write_export(files, tmp_path)] == ["job.yaml"]
    with pytest.raises(ExportError, match="already exist"):
        write_export(files, tmp_path)
    write_export(files, tmp_path, overwrite=True)
    assert (tmp_path / "job.yaml").read_text(encoding="utf-8") == files["job.yaml"]
