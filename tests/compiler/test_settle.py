"""settle: every training setting decided once, in the plan; what no engine honours is refused
with the spec key and the fix; what differs because the spec asked for it is a substitution."""

from __future__ import annotations

import re
from typing import Any

import pytest

from qlc.compiler.plan import Plan
from qlc.compiler.resolve import ResolveError, resolve
from qlc.compiler.spec import Spec

BASE: dict[str, Any] = {
    "job": {"name": "t"},
    "model": {"id": "org/model"},
    "data": {"id": "org/data", "format": "text"},
}


def plan_with(**sections: dict[str, Any]) -> Plan:
    document = {**BASE, **{k: {**BASE.get(k, {}), **v} for k, v in sections.items()}}
    spec = Spec.model_validate(document)
    return resolve(spec, spec_name="x.toml", spec_sha256="0" * 64, qlc_version="0", lock=None)


def refused(key: str, **sections: dict[str, Any]) -> str:
    with pytest.raises(ResolveError) as raised:
        plan_with(**sections)
    assert raised.value.key == key
    return str(raised.value)


@pytest.mark.parametrize("engine", ["reference", "fast"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_the_base_computes_in_the_written_dtype_in_every_engine(engine: str, dtype: str) -> None:
    plan = plan_with(quantization={"compute_dtype": dtype}, train={"engine": engine})
    precision = plan.engine.precision
    assert precision.base_matmul == dtype
    assert precision.adapter_compute == "float32"  # mixed_precision = "no"
    assert precision.activations == ("float32" if engine == "reference" else dtype)
    assert not plan.substitutions


def test_mixed_precision_sets_the_adapter_compute_and_fp16_scales_the_loss() -> None:
    bf16 = plan_with(train={"mixed_precision": "bf16", "engine": "fast"})
    assert bf16.engine.precision.adapter_compute == "bfloat16"
    assert not bf16.engine.precision.loss_scaling
    fp16 = plan_with(train={"mixed_precision": "fp16"})
    assert fp16.engine.precision.adapter_compute == "float16" and fp16.engine.precision.loss_scaling


def test_fp16_autocast_on_cpu_is_refused_with_the_fix() -> None:
    message = refused("train.mixed_precision", train={"mixed_precision": "fp16"},
                      runtime={"gpus": 0})  # fmt: skip
    assert '"bf16" or "no"' in message


def test_fast_engine_refuses_packing_and_fsdp() -> None:
    assert "data.packing = false" in refused(
        "data.packing", data={"packing": True}, train={"engine": "fast"}
    )
    assert 'train.engine = "reference"' in refused(
        "runtime.distributed",
        train={"engine": "fast"},
        runtime={"gpus": 2, "distributed": "fsdp"},
        quantization={"storage_dtype": "float16"},
    )


@pytest.mark.parametrize("optimizer", ["paged_adamw_32bit", "paged_adamw_8bit", "adamw_8bit"])
def test_bitsandbytes_optimizers_under_fsdp_are_refused_with_the_fix(optimizer: str) -> None:
    fsdp = {"gpus": 2, "distributed": "fsdp"}
    stored = {"storage_dtype": "float16"}
    message = refused("train.optimizer", train={"optimizer": optimizer}, runtime=fsdp,
                      quantization=stored)  # fmt: skip
    assert 'train.optimizer = "adamw_torch"' in message and 'distributed = "ddp"' in message
    lean = refused("train.memory", train={"memory": "lean", "optimizer": "adamw_torch"},
                   runtime=fsdp, quantization=stored)  # fmt: skip
    assert 'memory = "standard"' in lean
    plan = plan_with(train={"optimizer": "adamw_torch"}, runtime=fsdp, quantization=stored)
    assert plan.engine.distributed == "fsdp" and plan.engine.optimizer.state_bits == 32


def test_lean_substitutions_are_named_with_their_reason() -> None:
    plan = plan_with(train={"memory": "lean", "gradient_checkpointing": False})
    subs = {s.key: s for s in plan.substitutions}
    assert (subs["train.optimizer"].written, subs["train.optimizer"].effective) == (
        "paged_adamw_32bit",
        "paged_adamw_8bit",
    )
    assert plan.engine.optimizer.state_bits == 8 and plan.engine.optimizer.paged
    assert subs["train.gradient_checkpointing"].effective is True
    assert plan.engine.recompute == "every-layer"
    assert all("lean" in s.why for s in plan.substitutions)


def test_without_substitutions_the_optimizer_is_the_written_one() -> None:
    for name, bits in (("adamw_torch", 32), ("adamw_8bit", 8), ("sgd", 0), ("adafactor", 32)):
        plan = plan_with(train={"optimizer": name})
        assert (plan.engine.optimizer.name, plan.engine.optimizer.state_bits) == (name, bits)
        assert not plan.substitutions


def test_paging_needs_a_gpu() -> None:
    assert plan_with().engine.optimizer.paged
    assert not plan_with(runtime={"gpus": 0}).engine.optimizer.paged


def test_recomputation_per_engine() -> None:
    assert plan_with().engine.recompute == "every-layer"
    assert plan_with(train={"gradient_checkpointing": False}).engine.recompute == "none"
    assert plan_with(train={"engine": "fast"}).engine.recompute == "when-short"
    assert plan_with(train={"engine": "fast"}, runtime={"gpus": 0}).engine.recompute == (
        "every-layer"
    )


def test_the_fast_engine_s_base_weights_follow_memory_and_device() -> None:
    assert plan_with(train={"engine": "fast"}).engine.base_weights == "dequantized"
    lean = {"engine": "fast", "memory": "lean"}
    assert plan_with(train=lean).engine.base_weights == "streamed"
    assert plan_with(train=lean, runtime={"gpus": 0}).engine.base_weights == "4bit"
    generic = plan_with(train={"engine": "fast"}, lora={"bias": "all"})
    assert generic.engine.batches == "padded" and "lora.bias = 'all'" in generic.engine.path


def test_examples_per_step_and_its_world_size_rule() -> None:
    plan = plan_with(train={"batch_size": 4, "examples_per_step": 16}, runtime={"gpus": 2})
    schedule = plan.schedule
    assert (schedule.grad_accum, schedule.world_size, schedule.examples_per_step) == (2, 2, 16)
    four = schedule.for_world(4)
    assert (four.grad_accum, four.examples_per_step) == (1, 16)
    with pytest.raises(ValueError, match="not a multiple"):
        schedule.for_world(3)
    fixed = plan_with(train={"batch_size": 4, "grad_accum": 2}).schedule.for_world(2)
    assert (fixed.grad_accum, fixed.examples_per_step) == (2, 16)


def test_steps_and_warmup_are_the_plan_s_rules() -> None:
    schedule = plan_with(train={"batch_size": 4, "warmup_ratio": 0.03}).schedule
    assert schedule.total_steps(950) == 238  # ceil(950 / 4), one epoch
    assert schedule.warmup_for(238) == 8  # ceil(0.03 x 238)
    steps = plan_with(train={"max_steps": 10, "warmup_steps": 3}).schedule
    assert steps.total_steps(10_000) == 10 and steps.warmup_for(10) == 3


def test_a_local_file_has_no_splits() -> None:
    message = refused(
        "data.eval_split", data={"id": None, "path": "d.jsonl", "eval_split": "validation"}
    )
    assert "data.eval_fraction" in message


def test_smoke_variant_is_cpu_float32_and_a_few_steps() -> None:
    plan = plan_with(train={"engine": "fast", "memory": "lean", "batch_size": 8})
    smoke = plan.for_smoke()
    assert smoke.runtime.gpus == 0 and smoke.quantization.compute_dtype == "float32"
    assert smoke.engine.precision.base_matmul == "float32"
    assert smoke.engine.base_weights == "4bit" and not smoke.engine.optimizer.paged
    assert smoke.schedule.max_steps == 4 and smoke.schedule.batch_size == 4


def test_settings_name_every_value_with_its_spec_key() -> None:
    rows = plan_with().settings()
    assert len({row.name for row in rows}) == len(rows)
    assert all(row.source for row in rows)
    values = {row.name: row.value for row in rows}
    assert values["lora_scale"] == 16 / 64 and values["examples_per_step"] == 4


# --- inputs: object stores and hub dataset parts (issue 16) ----------------------------------

PIN = "ab" * 32


def test_object_store_inputs_are_uris_in_the_plan_and_lock_their_backend_only() -> None:
    plan = plan_with(
        model={"id": None, "path": "s3://bucket/models/m", "sha256": {"config.json": PIN}},
        data={"id": None, "path": "gs://bucket/d/train.jsonl", "sha256": PIN},
    )
    assert (plan.model.uri, plan.model.local_path) == ("s3://bucket/models/m", None)
    assert (plan.data.uri, plan.data.local_path, plan.data.file_format) == (
        "gs://bucket/d/train.jsonl", None, "jsonl")  # fmt: skip
    assert plan.model.sha256 == {"config.json": PIN} and plan.data.sha256 == PIN
    assert plan.object_stores == ["gs://", "s3://"] and plan.needs_network
    assert plan.stack.object_stores == ["gcsfs==2026.8.2", "s3fs==2026.9.0"]
    assert "s3fs==2026.9.0" in plan.stack.requirements()
    local = plan_with()
    assert local.stack.object_stores == [] and not any(
        "fs==" in pin for pin in local.stack.requirements()
    )
    dumped = local.model_dump(mode="json")  # plans without them keep their bytes and hashes
    assert "object_stores" not in dumped["stack"] and "uri" not in dumped["data"]


def test_a_hub_dataset_config_and_files_reach_the_plan() -> None:
    plan = plan_with(data={"config": "en", "data_files": ["train/*.parquet"]})
    assert plan.data.config == "en" and plan.data.data_files == ["train/*.parquet"]


@pytest.mark.parametrize(
    ("section", "values", "message"),
    [
        ("data", {"sha256": PIN}, "'sha256' pins the file at 'path'"),
        ("data", {"id": None, "path": "d.jsonl", "config": "en"}, "'config' selects part"),
        ("data", {"id": None, "path": "s3://Bad_Bucket/d.jsonl"}, "not an object-store URI"),
        ("data", {"id": None, "path": "s3://bucket/d.jsonl", "sha256": "beef"}, "should match"),
        ("model", {"sha256": {"config.json": PIN}}, "a hub model is pinned by 'revision'"),
        ("model", {"id": None, "path": "m", "sha256": {"../x": PIN}}, "not a file inside"),
        ("model", {"tokenizer": "s3://bucket/tok"}, "a tokenizer is a hub id or a local"),
        (
            "data",
            {"id": None, "sources": [{"path": "s3://bucket/d.jsonl"}]},
            "an object-store file is read as data.path alone",
        ),
        (
            "data",
            {"format": "chat", "chat_template_file": "s3://bucket/t.jinja"},
            "a chat template file is a local file",
        ),
    ],
)
def test_input_pins_and_parts_are_refused_where_they_mean_nothing(
    section: str, values: dict[str, Any], message: str
) -> None:
    document = {**BASE, section: {**BASE[section], **values}}
    with pytest.raises(ValueError, match=re.escape(message)):
        Spec.model_validate(document)


# -- track: where the metrics go, what the image needs for it, which secrets and network
WANDB = {"mode": "online", "project": "p", "entity": "team"}
MLFLOW = {"uri": "https://mlflow.example.org/", "token": "MLFLOW_TOKEN"}


def test_tensorboard_alone_by_default_needs_no_package_secret_or_network() -> None:
    plan = plan_with()
    assert plan.track.tensorboard and plan.track.wandb is None and plan.track.mlflow is None
    assert plan.stack.trackers == [] and "trackers" not in plan.stack.model_dump()
    assert not plan.track.needs_network and plan.runtime.secrets == []
    rows = {row.name: row for row in plan.settings()}
    assert rows["trackers"].value == ["tensorboard: <run dir>/tensorboard"]


def test_trackers_pin_their_packages_name_their_secrets_and_need_a_network() -> None:
    plan = plan_with(track={"wandb": WANDB, "mlflow": MLFLOW},
                     runtime={"secrets": ["HF_TOKEN"]})  # fmt: skip
    track = plan.track
    assert plan.stack.trackers == ["mlflow-skinny==3.17.2", "wandb==0.31.0"]
    assert set(plan.stack.trackers) < set(plan.stack.requirements())  # the lock resolves them
    assert plan.runtime.secrets == ["HF_TOKEN", "MLFLOW_TOKEN", "WANDB_API_KEY"]
    assert track.needs_network
    assert track.mlflow is not None and track.mlflow.uri == "https://mlflow.example.org"
    assert track.mlflow.experiment == "t"  # job.name when the spec names none
    assert {row.name: row.value for row in plan.settings()}["trackers"] == [
        "tensorboard: <run dir>/tensorboard",
        "wandb online: team/p",
        "mlflow: https://mlflow.example.org experiment t",
    ]


def test_wandb_offline_needs_no_key_and_no_network() -> None:
    plan = plan_with(track={"tensorboard": False, "wandb": {"mode": "offline", "project": "p"}})
    assert plan.track.wandb is not None and plan.track.wandb.api_key_env is None
    assert plan.runtime.secrets == [] and not plan.track.needs_network
    assert plan.track.summary() == ["wandb offline: p"]
    assert plan.stack.trackers == ["wandb==0.31.0"]  # the client writes the offline files


def test_a_smoke_run_logs_to_no_account_or_server() -> None:
    smoke = plan_with(track={"wandb": WANDB, "mlflow": MLFLOW}).for_smoke()
    assert smoke.track.tensorboard and smoke.track.wandb is None and smoke.track.mlflow is None


@pytest.mark.parametrize(
    ("track", "runtime", "message"),
    [
        ({"mlflow": {"uri": "https://user:pw@mlflow.example.org"}}, {}, "holds credentials"),
        ({"mlflow": {"uri": "file:///tmp/mlruns"}}, {}, "http:// or https://"),
        ({"mlflow": {"uri": "http://h/?token=x"}}, {}, "no spaces, query or fragment"),
        ({"wandb": {"mode": "online", "project": "p", "api_key": "0123abcd"}}, {}, "pattern"),
        ({"wandb": WANDB}, {"env": {"WANDB_API_KEY": "k"}}, "a credential is a secret"),
    ],
)
def test_credentials_never_go_into_a_spec(
    track: dict[str, Any], runtime: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        plan_with(track=track, runtime=runtime)
