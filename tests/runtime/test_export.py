"""qlc export: golden job files per target, validated by each engine's own schema or client
model, and the refusals. Regenerate the goldens with QLC_UPDATE_GOLDEN=1 and review the diff."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from qlc.compiler.context import compile_spec
from qlc.compiler.plan import Plan
from qlc.runtime.export import TARGETS, ExportError, export, write_export

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "export"
UPDATE = os.environ.get("QLC_UPDATE_GOLDEN") == "1"
# A clearly fake digest for tests only: sha256 of b"qlc-test-image".
TEST_DIGEST = "sha256:" + hashlib.sha256(b"qlc-test-image").hexdigest()
IMAGE = f"registry.example.com/qlc/export-test@{TEST_DIGEST}"
ROLE = "arn:aws:iam::123456789012:role/qlc-batch-execution"

SPEC = """
[job]
name = "export-test.v1"
output_dir = "{output_dir}"

[model]
id = "NousResearch/Llama-2-7b-chat-hf"

[data]
id = "mlabonne/guanaco-llama2-1k"
format = "text"

[runtime]
gpus = {gpus}
shm_size = "8g"
secrets = ["HF_TOKEN", "WANDB_API_KEY"]

[runtime.env]
HF_HUB_ENABLE_HF_TRANSFER = "0"
QLC_NOTE = "it's \\"quoted\\" & <odd> $HOME $(date) `ls` ünïcode\\nsecond line"
"""


def make_plan(output_dir: str, gpus: int = 1) -> Plan:
    source = SPEC.format(output_dir=output_dir, gpus=gpus).encode()
    return compile_spec(source, "export-test.toml", require_lock=False).plan


# case name -> (output_dir of the spec, export arguments)
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "kubernetes-single": ("s3://qlc-test-bucket/runs", {"target": "kubernetes",
                                                         "volume": "qlc-test-bucket-pvc"}),
    "kubernetes-multi": ("runs", {"target": "kubernetes", "nodes": 2, "gpus_per_node": 4,
                                  "kueue_queue": "team-a", "volume": "qlc-runs"}),
    "aws-batch-single": ("runs", {"target": "aws-batch", "instance_type": "g5.2xlarge",
                                  "volume": "fs-0123456789abcdef0", "execution_role": ROLE}),
    "aws-batch-multi": ("runs", {"target": "aws-batch", "nodes": 2, "gpus_per_node": 8,
                                 "instance_type": "p4d.24xlarge", "job_queue": "gpu-queue",
                                 "volume": "fs-0123456789abcdef0", "execution_role": ROLE}),
    "gcp-batch-single": ("gs://qlc-test-bucket/runs", {"target": "gcp-batch",
                                                        "project": "qlc-test-project"}),
    "gcp-batch-multi": ("gs://qlc-test-bucket/runs", {"target": "gcp-batch", "nodes": 3,
                                                       "gpus_per_node": 8,
                                                       "instance_type": "a3-highgpu-8g",
                                                       "project": "qlc-test-project"}),
    "skypilot-single": ("s3://qlc-test-bucket/runs", {"target": "skypilot"}),
    "skypilot-multi": ("gs://qlc-test-bucket/runs", {"target": "skypilot", "nodes": 2,
                                                      "gpus_per_node": 8, "accelerator": "H100"}),
}  # fmt: skip


def export_case(case: str) -> dict[str, str]:
    output_dir, arguments = CASES[case]
    arguments = dict(arguments)
    return export(make_plan(output_dir), IMAGE, arguments.pop("target"), **arguments)


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden(case: str) -> None:
    files = export_case(case)
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


# --- validation by each engine's own model --------------------------------------------------


def validate_kubernetes(text: str) -> list[Any]:
    """Deserialize each document into the kubernetes client's model (required fields and enums
    checked there) and serialize it back: a field the model does not know would be lost."""
    from kubernetes import client

    api = client.ApiClient()
    objects = []
    for document in yaml.safe_load_all(text):
        model = {("batch/v1", "Job"): "V1Job", ("v1", "Service"): "V1Service"}[
            (document["apiVersion"], document["kind"])
        ]

        class Response:
            data = json.dumps(document)

        obj = api.deserialize(Response(), model)
        assert api.sanitize_for_serialization(obj) == document
        objects.append(obj)
    return objects


def validate_aws(name: str, text: str) -> None:
    import botocore.session
    from botocore.validate import ParamValidator

    operation = {"job-definition.json": "RegisterJobDefinition", "submit-job.json": "SubmitJob"}
    model = botocore.session.get_session().get_service_model("batch")
    shape = model.operation_model(operation[name]).input_shape
    report = ParamValidator().validate(json.loads(text), shape)
    assert not report.has_errors(), report.generate_report()


def validate_gcp(text: str) -> Any:
    from google.cloud import batch_v1

    job = batch_v1.Job.from_json(text, ignore_unknown_fields=False)
    assert json.loads(batch_v1.Job.to_json(job)) is not None
    return job


def validate_skypilot(text: str) -> dict[str, Any]:
    import jsonschema

    schemas = json.loads((GOLDEN / "skypilot-schemas.json").read_text(encoding="utf-8"))
    task = yaml.safe_load(text)
    jsonschema.Draft202012Validator(schemas["task"]).validate(task)
    jsonschema.Draft202012Validator(schemas["resources"]).validate(task["resources"])
    return task


@pytest.mark.parametrize("case", sorted(CASES))
def test_exported_files_validate_against_the_engine_model(case: str) -> None:
    files = export_case(case)
    target = CASES[case][1]["target"]
    for name, text in files.items():
        if target == "kubernetes":
            validate_kubernetes(text)
        elif target == "aws-batch":
            validate_aws(name, text)
        elif target == "gcp-batch":
            validate_gcp(text)
        else:
            validate_skypilot(text)


def test_validators_reject_what_the_engine_would() -> None:
    """The validators are not string checks: a misspelled or mistyped field fails them."""
    k8s = export_case("kubernetes-single")["job.yaml"]
    with pytest.raises(AssertionError):
        validate_kubernetes(k8s.replace("backoffLimit", "backofLimit"))
    aws = json.loads(export_case("aws-batch-single")["job-definition.json"])
    aws["containerProperties"]["linuxParameters"]["sharedMemorySize"] = "16g"
    with pytest.raises(AssertionError, match="sharedMemorySize"):
        validate_aws("job-definition.json", json.dumps(aws))
    gcp = export_case("gcp-batch-single")["job.json"].replace('"taskCount"', '"taskCounts"')
    with pytest.raises(Exception, match="taskCounts"):
        validate_gcp(gcp)
    sky = export_case("skypilot-single")["task.yaml"].replace("num_nodes", "nodes")
    with pytest.raises(Exception, match="nodes"):
        validate_skypilot(sky)


# --- what the files say ---------------------------------------------------------------------


def test_kubernetes_multi_node_is_an_indexed_job_behind_a_headless_service() -> None:
    service, job = validate_kubernetes(export_case("kubernetes-multi")["job.yaml"])
    assert service.spec.cluster_ip == "None"
    assert job.spec.completion_mode == "Indexed" and job.spec.completions == 2
    assert job.spec.template.spec.subdomain == service.metadata.name
    assert job.metadata.labels["kueue.x-k8s.io/queue-name"] == "team-a"
    container = job.spec.template.spec.containers[0]
    assert container.image == IMAGE
    assert container.resources.limits == {"nvidia.com/gpu": "4"}
    env = {item.name: item for item in container.env}
    assert env["QLC_OUTPUT_DIR"].value == "/qlc/output/runs"
    assert env["QLC_IMAGE_DIGEST"].value == IMAGE
    assert env["HF_TOKEN"].value is None
    assert env["HF_TOKEN"].value_from.secret_key_ref.key == "HF_TOKEN"
    note = 'it\'s "quoted" & <odd> $HOME $$(date) `ls` ünïcode\nsecond line'
    assert env["QLC_NOTE"].value == note  # $$( : Kubernetes passes $( literally
    volumes = {volume.name: volume for volume in job.spec.template.spec.volumes}
    assert volumes["output"].persistent_volume_claim.claim_name == "qlc-runs"
    assert volumes["dshm"].empty_dir.size_limit == "8Gi"
    pod = job.spec.template.spec
    assert pod.security_context.run_as_user == pod.security_context.fs_group == 10001
    rule = job.spec.pod_failure_policy.rules[0]
    assert (rule.action, rule.on_pod_conditions[0].type) == ("Ignore", "DisruptionTarget")


def test_aws_multi_node_parallel_with_retries_for_spot() -> None:
    files = export_case("aws-batch-multi")
    definition = json.loads(files["job-definition.json"])
    assert definition["type"] == "multinode"
    assert definition["nodeProperties"]["numNodes"] == 2
    assert definition["retryStrategy"]["attempts"] == 4
    container = definition["nodeProperties"]["nodeRangeProperties"][0]["container"]
    assert {"type": "GPU", "value": "8"} in container["resourceRequirements"]
    assert container["secrets"] == [
        {"name": "HF_TOKEN", "valueFrom": "HF_TOKEN"},
        {"name": "WANDB_API_KEY", "valueFrom": "WANDB_API_KEY"},
    ]
    assert container["linuxParameters"]["sharedMemorySize"] == 8192
    assert json.loads(files["submit-job.json"])["jobQueue"] == "gpu-queue"


def test_gcp_multi_node_task_group_mounts_the_bucket() -> None:
    job = validate_gcp(export_case("gcp-batch-multi")["job.json"])
    group = job.task_groups[0]
    assert group.task_count == 3 and group.require_hosts_file
    assert group.task_spec.volumes[0].gcs.remote_path == "qlc-test-bucket/runs"
    assert group.task_spec.environment.variables["QLC_OUTPUT_DIR"] == "/qlc/output"
    assert dict(group.task_spec.environment.secret_variables) == {
        name: f"projects/qlc-test-project/secrets/{name}/versions/latest"
        for name in ("HF_TOKEN", "WANDB_API_KEY")
    }
    assert group.task_spec.runnables[0].container.image_uri == IMAGE


def test_secret_values_never_reach_a_job_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_secret_value_do_not_write")
    for case in CASES:
        for text in export_case(case).values():
            assert "hf_secret_value_do_not_write" not in text


# --- refusals ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("image", "message"),
    [
        ("registry.example.com/qlc/export-test:latest", "has no digest"),
        ("qlc/export-test", "has no digest"),
        (f"registry.example.com/qlc/export-test:v1@{TEST_DIGEST}", "both a tag and a digest"),
        ("registry.example.com/qlc/export-test@sha256:1234", "not a digest reference"),
    ],
)
def test_refuses_an_image_without_a_digest(image: str, message: str) -> None:
    plan = make_plan("s3://qlc-test-bucket/runs")
    for target in TARGETS:
        with pytest.raises(ExportError, match=message):
            export(plan, image, target)


EFS = {"volume": "fs-0123456789abcdef0", "execution_role": ROLE}


@pytest.mark.parametrize(
    ("output_dir", "target", "arguments", "message"),
    [
        ("s3://b/runs", "kubernetes", {"nodes": 0}, "--nodes must be at least 1"),
        ("s3://b/runs", "skypilot", {"nodes": -2}, "--nodes must be at least 1"),
        ("runs", "aws-batch", {"instance_type": "m5.xlarge", **EFS}, "has no GPUs"),
        ("runs", "aws-batch", {"instance_type": "g5.xlarge", "gpus_per_node": 4, **EFS},
         "has 1 GPU"),
        ("runs", "aws-batch", {"retries": 10, **EFS}, "at most 9 retries"),
        ("runs", "aws-batch", {"volume": "fs-1"}, "pass --execution-role"),
        ("runs", "aws-batch", {**EFS, "execution_role": "qlc-role"}, "not an IAM role ARN"),
        ("gs://b/runs", "gcp-batch", {"instance_type": "n2-standard-8"}, "has 0 built-in GPU"),
        ("gs://b/runs", "gcp-batch", {"gpus_per_node": 3}, "no default GCP machine type has 3"),
        ("gs://b/runs", "gcp-batch", {}, "pass --project PROJECT_ID"),
        ("gs://b/runs", "gcp-batch", {"project": "Bad_Project"}, "not a GCP project id"),
        ("s3://b/runs", "kubernetes", {"gpus_per_node": -1}, "0 or more"),
        ("s3://b/runs", "skypilot", {"gpus_per_node": 0}, "fewer than the spec's runtime.gpus"),
        ("s3://b/runs", "nomad", {}, "unknown target 'nomad'"),
        # output locations an engine cannot mount
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
    files = export(make_plan("runs", gpus=0), IMAGE, "aws-batch", instance_type="m5.xlarge",
                   **EFS)  # fmt: skip
    validate_aws("job-definition.json", files["job-definition.json"])
    assert '"GPU"' not in files["job-definition.json"]


def test_write_export_refuses_to_overwrite(tmp_path: Path) -> None:
    files = export_case("kubernetes-single")
    assert [path.name for path in write_export(files, tmp_path)] == ["job.yaml"]
    with pytest.raises(ExportError, match="already exist"):
        write_export(files, tmp_path)
    write_export(files, tmp_path, overwrite=True)
    assert (tmp_path / "job.yaml").read_text(encoding="utf-8") == files["job.yaml"]


# --- the command line -------------------------------------------------------------------------

REPO_ROOT = Path(__file__).resolve().parents[2]
GUANACO = REPO_ROOT / "specs" / "guanaco.toml"


def test_cli_export_writes_a_valid_job_file(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from qlc.cli import app

    arguments = ["export", str(GUANACO), "--target", "kubernetes", "--image", IMAGE,
                 "--nodes", "2", "--volume", "qlc-runs", "-o", str(tmp_path)]  # fmt: skip
    done = CliRunner().invoke(app, arguments)
    assert done.exit_code == 0, done.output
    _, job = validate_kubernetes((tmp_path / "job.yaml").read_text(encoding="utf-8"))
    assert job.spec.template.spec.containers[0].image == IMAGE


def test_cli_export_uses_the_pushed_digest_of_the_build_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from qlc.cli import UserError, app
    from qlc.runtime import records

    plan = compile_spec(GUANACO.read_bytes(), str(GUANACO), require_lock=False).plan
    record = records.BuildRecord(
        job=plan.spec["job"]["name"], tag="qlc/guanaco:abc", image_id="sha256:" + "1" * 64,
        image_key="k", context_hash="sha256:x", context_dir="/x", spec_path=str(GUANACO),
        spec_sha256=plan.spec_sha256, lock_sha256=None, base_image="b",
        base_image_overridden=False, base_image_id=None, base_image_digests=[],
        qlc_version="0.1.0", built_at="2026-11-26T00:00:00Z", build_seconds=1.0,
        cache_hit=False, log_path=None, registry_digest=IMAGE, pushed_ref="x:abc",
    )  # fmt: skip
    records.save_build(tmp_path, record)
    monkeypatch.chdir(tmp_path)
    done = CliRunner().invoke(app, ["export", str(GUANACO), "--target", "skypilot"])
    assert isinstance(done.exception, UserError)  # a local "runs": skypilot needs a bucket
    assert "local path" in str(done.exception)
    done = CliRunner().invoke(app, ["export", str(GUANACO), "--target", "aws-batch",
                                    "--volume", "fs-0123456789abcdef0",
                                    "--execution-role", ROLE])  # fmt: skip
    assert done.exit_code == 0, done.output
    written = tmp_path / "export" / record.job / "aws-batch" / "job-definition.json"
    assert json.loads(written.read_text(encoding="utf-8"))["containerProperties"]["image"] == IMAGE


def test_cli_export_refuses_a_tag_with_exit_2(tmp_path: Path) -> None:
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "qlc", "export", str(GUANACO), "--target", "gcp-batch",
         "--image", "registry.example.com/qlc/guanaco:latest", "-o", str(tmp_path)],
        capture_output=True, text=True, cwd=tmp_path, check=False,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "has no digest" in done.stderr and "Traceback" not in done.stderr
    assert not list(tmp_path.iterdir())
