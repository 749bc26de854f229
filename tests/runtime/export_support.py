"""Shared by the export tests: a spec to export, the cases of the goldens, and the validators
that load a job file into each service's own model (never a string check)."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from qlc.compiler.context import compile_spec
from qlc.compiler.plan import Plan
from qlc.runtime.export import Export, export

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "export"
GUANACO = Path(__file__).resolve().parents[2] / "specs" / "guanaco.toml"
# A clearly fake digest for tests only: sha256 of b"qlc-test-image".
TEST_DIGEST = "sha256:" + hashlib.sha256(b"qlc-test-image").hexdigest()
IMAGE = f"registry.example.com/qlc/export-test@{TEST_DIGEST}"
ROLE = "arn:aws:iam::123456789012:role/qlc-batch-execution"
JOB_ROLE = "arn:aws:iam::123456789012:role/qlc-batch-job"
RUN_ID = "20261127T000000Z-0a1b2c"
EFS = {"volume": "fs-0123456789abcdef0", "efs_access_point": "fsap-0123456789abcdef0",
       "execution_role": ROLE}  # fmt: skip

SPEC = """
[job]
name = "export-test.v1"
output_dir = "{output_dir}"

[model]
id = "NousResearch/Llama-2-7b-chat-hf"

[data]
id = "mlabonne/guanaco-llama2-1k"
format = "text"

[train]
{train}

[runtime]
gpus = {gpus}
shm_size = "8g"
secrets = ["HF_TOKEN", "WANDB_API_KEY"]

[runtime.env]
HF_HUB_ENABLE_HF_TRANSFER = "0"
NOTE = {note}
"""
NOTE = 'it\'s "quoted" & <odd> $HOME $(date) `ls` ünïcode\nsecond line'


def spec_text(output_dir: str, gpus: int = 1, train: str = "save_steps = 50",
              note: str = NOTE, extra: str = "") -> str:  # fmt: skip
    return SPEC.format(output_dir=output_dir, gpus=gpus, train=train,
                       note=json.dumps(note)) + extra  # fmt: skip


def make_plan(output_dir: str, gpus: int = 1, train: str = "save_steps = 50",
              note: str = NOTE) -> Plan:  # fmt: skip
    source = spec_text(output_dir, gpus, train, note).encode()
    return compile_spec(source, "export-test.toml", require_lock=False).plan


# case name -> (output_dir of the spec, export arguments)
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "kubernetes-single": ("s3://qlc-test-bucket/runs", {"target": "kubernetes",
                                                         "volume": "qlc-test-bucket-pvc"}),
    "kubernetes-multi": ("runs", {"target": "kubernetes", "nodes": 2, "gpus_per_node": 4,
                                  "kueue_queue": "team-a", "volume": "qlc-runs"}),
    "aws-batch-single": ("runs", {"target": "aws-batch", "instance_type": "g5.2xlarge",
                                  "job_role": JOB_ROLE, **EFS}),
    "aws-batch-multi": ("runs", {"target": "aws-batch", "nodes": 2, "gpus_per_node": 8,
                                 "instance_type": "p4d.24xlarge", "job_queue": "gpu-queue",
                                 **EFS}),
    "gcp-batch-single": ("gs://qlc-test-bucket/runs", {"target": "gcp-batch", "spot": True,
                                                        "project": "qlc-test-project"}),
    "gcp-batch-multi": ("gs://qlc-test-bucket/runs", {"target": "gcp-batch", "nodes": 3,
                                                       "gpus_per_node": 8, "retries": 0,
                                                       "instance_type": "a3-highgpu-8g",
                                                       "project": "qlc-test-project"}),
    "skypilot-single": ("s3://qlc-test-bucket/runs", {"target": "skypilot", "spot": True}),
    "skypilot-multi": ("gs://qlc-test-bucket/runs", {"target": "skypilot", "nodes": 2,
                                                      "gpus_per_node": 8, "accelerator": "H100"}),
}  # fmt: skip


def export_case(case: str, **changes: Any) -> Export:
    output_dir, arguments = CASES[case]
    arguments = {**arguments, **changes}
    return export(make_plan(output_dir), IMAGE, arguments.pop("target"), run_id=RUN_ID,
                  **arguments)  # fmt: skip


MAIN_FILE = {"kubernetes": "job.yaml", "aws-batch": "job-definition.json",
             "gcp-batch": "job.json", "skypilot": "task.yaml"}  # fmt: skip


def main_file(case: str, **changes: Any) -> str:
    """The job file of a case (AWS Batch: its job definition)."""
    return export_case(case, **changes).files[MAIN_FILE[CASES[case][1]["target"]]]


def with_store_inputs(plan: Plan) -> Plan:
    """The plan with its model and data in an object store: what a job of a local-input spec
    (the tiny one) would read; nothing of the job file depends on the inputs."""
    model = plan.model.model_copy(update={"local_path": None, "uri": "s3://qlc-test/tiny/model"})
    data = plan.data.model_copy(update={"local_path": None, "uri": "s3://qlc-test/data.jsonl"})
    return plan.model_copy(update={"model": model, "data": data})


def guanaco_with_checkpoints(directory: Path, output_dir: str = "runs") -> Path:
    """specs/guanaco.toml (hub model and data) with train.save_steps, beside its lock."""
    spec = directory / "guanaco.toml"
    text = GUANACO.read_text(encoding="utf-8").replace("[train]\n", "[train]\nsave_steps = 25\n")
    text = text.replace('output_dir = "runs"', f"output_dir = {json.dumps(output_dir)}")
    spec.write_text(text, encoding="utf-8")
    shutil.copy(GUANACO.with_suffix(".lock"), directory / "guanaco.lock")
    return spec


# --- each service's own model -----------------------------------------------------------------


def kubernetes_model(document: dict[str, Any], model: str) -> Any:
    """Deserialize into the kubernetes client's model and serialize back: a field the model
    does not know is lost, a wrong type fails."""
    from kubernetes import client

    api = client.ApiClient()

    class Response:
        data = json.dumps(document)

    obj = api.deserialize(Response(), model)
    assert api.sanitize_for_serialization(obj) == document, f"{model} changed the document"
    return obj


def jobset_model(document: dict[str, Any]) -> Any:
    """JobSet v1alpha2 through its models as Kubeflow Trainer's API package publishes them
    (kubeflow-trainer-api: the JobSet API types with the Kubernetes ones they embed), and the
    Job template again through the kubernetes client's V1JobTemplateSpec."""
    from kubeflow_trainer_api.models import JobsetV1alpha2JobSet

    jobset = JobsetV1alpha2JobSet.from_dict(document)
    assert jobset.to_dict() == document, "the JobSet model changed the document"
    for replicated in document["spec"]["replicatedJobs"]:
        kubernetes_model(replicated["template"], "V1JobTemplateSpec")
    return jobset


def validate_kubernetes(text: str) -> Any:
    (document,) = list(yaml.safe_load_all(text))
    if (document["apiVersion"], document["kind"]) == ("batch/v1", "Job"):
        return kubernetes_model(document, "V1Job")
    assert (document["apiVersion"], document["kind"]) == ("jobset.x-k8s.io/v1alpha2", "JobSet")
    return jobset_model(document)


def validate_aws(name: str, text: str) -> dict[str, Any]:
    import botocore.session
    from botocore.validate import ParamValidator

    operation = {"job-definition.json": "RegisterJobDefinition", "submit-job.json": "SubmitJob"}
    model = botocore.session.get_session().get_service_model("batch")
    shape = model.operation_model(operation[name]).input_shape
    document: dict[str, Any] = json.loads(text)
    report = ParamValidator().validate(document, shape)
    assert not report.has_errors(), report.generate_report()
    return document


def validate_gcp(text: str) -> Any:
    from google.cloud import batch_v1

    job = batch_v1.Job.from_json(text, ignore_unknown_fields=False)
    assert json.loads(batch_v1.Job.to_json(job)) is not None
    return job


def validate_skypilot(text: str) -> dict[str, Any]:
    """SkyPilot's own JSON schemas, stored from the package (tests/golden/export/
    regen_skypilot_schema.py, which also loads the goldens with sky.Task.from_yaml)."""
    schemas = json.loads((GOLDEN / "skypilot-schemas.json").read_text(encoding="utf-8"))
    task: dict[str, Any] = yaml.safe_load(text)
    SkyPilotValidator(schemas["task"]).validate(task)
    SkyPilotValidator(schemas["resources"]).validate(task["resources"])
    for mount in task.get("file_mounts", {}).values():
        if isinstance(mount, dict):  # a bucket: SkyPilot's storage schema (source, mode)
            SkyPilotValidator(schemas["storage"]).validate(mount)
    return task


def _case_insensitive_enum(
    validator: Any, choices: list[str], instance: Any, schema: Any
) -> Iterator[Any]:
    """SkyPilot's own schema keyword (sky.utils.schemas): an enum matched case-insensitively."""
    from jsonschema.exceptions import ValidationError

    if isinstance(instance, str) and instance.lower() not in {c.lower() for c in choices}:
        yield ValidationError(f"{instance!r} is not one of {choices}")


def _skypilot_validator() -> Any:
    import jsonschema

    keywords = {"case_insensitive_enum": _case_insensitive_enum}
    return jsonschema.validators.extend(jsonschema.Draft202012Validator, keywords)


SkyPilotValidator = _skypilot_validator()


def validate(target: str, name: str, text: str) -> Any:
    if target == "kubernetes":
        return validate_kubernetes(text)
    if target == "aws-batch":
        return validate_aws(name, text)
    if target == "gcp-batch":
        return validate_gcp(text)
    return validate_skypilot(text)
