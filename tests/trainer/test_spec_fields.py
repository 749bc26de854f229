"""Every spec field reaches the library configuration through the plan (or is consumed before
the trainer runs).

Two specs set every field away from its default (two, because some fields exclude each other:
hub vs local inputs, epochs vs max_steps, warmup ratio vs steps, the fast engine vs packing and
FSDP). Each is resolved to its typed plan, and each field has a check that follows it from the
plan into bitsandbytes, peft, trl/transformers, the data pipeline, the hub calls or the launch.
A field added to the spec language without a check here fails `test_every_field_is_checked`.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from trainer_support import TINY_MODEL, plan_from

from qlc import contract
from qlc.compiler.plan import Plan
from qlc.compiler.spec import Spec
from qlc.trainer import provenance
from qlc.trainer.errors import UserError
from qlc.trainer.examples import prepare
from qlc.trainer.launch import launch_argv, uses_cpu
from qlc.trainer.model import (
    ModelSource,
    bnb_config,
    build_smoke_model,
    load_model,
    load_tokenizer,
    lora_config,
    model_source,
)
from qlc.trainer.observe import Observer
from qlc.trainer.recipe import Data, Run
from qlc.trainer.reference import callbacks, fsdp_args, training_args
from qlc.trainer.render import render_row
from qlc.trainer.rows import data_file, load_rows
from qlc.trainer.runenv import RunEnv
from qlc.trainer.types import MetricsLog, StopFlag

HUB = {
    "job": {"name": "cfg-job", "seed": 1234, "output_dir": "elsewhere", "deterministic": True},
    "model": {
        "id": "org/model",
        "revision": "abc123",
        "tokenizer": "org/tok",
        "trust_remote_code": True,
        "architecture": "mistral",
    },
    "data": {
        "id": "org/data",
        "revision": "r1",
        "split": "training",
        "eval_split": "dev",
        "format": "instruction",
        "text_field": "body",
        "prompt_field": "q",
        "input_field": "ctx",
        "response_field": "a",
        "template": "llama2",
        "messages_field": "conv",
        "loss": "completion",
        "max_length": 333,
        "packing": True,
    },
    "quantization": {
        "quant_type": "fp4",
        "compute_dtype": "bfloat16",
        "double_quant": True,
        "storage_dtype": "bfloat16",
    },
    "lora": {
        "r": 7,
        "alpha": 3.0,
        "dropout": 0.2,
        "bias": "lora_only",
        "target_modules": ["gate_proj"],
        "modules_to_save": ["lm_head"],
    },
    "train": {
        "max_steps": 77,
        "batch_size": 3,
        "examples_per_step": 18,
        "learning_rate": 3e-5,
        "lr_scheduler": "polynomial",
        "warmup_ratio": 0.1,
        "weight_decay": 0.05,
        "optimizer": "adamw_torch",
        "max_grad_norm": 0.7,
        "group_by_length": True,
        "gradient_checkpointing": False,
        "mixed_precision": "bf16",
        "memory": "standard",  # lean's 8-bit states are refused under FSDP (test_settle)
        "logging_steps": 3,
        "eval_steps": 11,
        "save_steps": 13,
        "save_total_limit": 4,
    },
    "runtime": {
        "gpus": 3,
        "distributed": "fsdp",
        "cuda": "13.0",
        "torch": "2.13.0",
        "python": "3.12",
        "gpu_archs": ["9.0"],
        "shm_size": "2g",
        "env": {"A": "b"},
        "secrets": ["TOKEN_X"],
    },
}
LOCAL = {
    "job": {"name": "cfg-local"},
    "model": {"path": "some/dir"},
    "data": {"path": "rows.csv", "eval_fraction": 0.25, "format": "text", "text_field": "body"},
    "quantization": {"load_in_4bit": False},
    "train": {
        "epochs": 3.0,
        "grad_accum": 5,
        "warmup_steps": 9,
        "optimizer": "adafactor",
        "gradient_checkpointing": False,
        "engine": "fast",
        "memory": "lean",  # which turns the recomputation back on (a recorded substitution)
    },
    "runtime": {"gpus": 0},
}

# Fields whose whole trainer path has its own test file (the two specs here are single-source
# text/instruction specs; a mixture or a conversation format is another shape of spec).
TESTED_IN = {
    "data.sources": "tests/trainer/test_mixture.py, tests/runtime/test_mixture_run.py",
    "data.roles": "tests/trainer/test_input_shapes.py (ShareGPT roles)",
    "data.chat_template": "tests/trainer/test_input_shapes.py (template override)",
    "data.chat_template_file": "tests/runtime/test_inputs.py (found, mounted, hashed)",
    "track.tensorboard": "tests/runtime/test_tracking.py (both engines, TensorBoard's reader)",
    "track.wandb": "tests/runtime/test_tracking.py (offline files read back), test_track.py",
    "track.mlflow": "tests/runtime/test_tracking.py (a real mlflow server), test_track.py",
    "data.config": "tests/trainer/test_rows.py (reaches datasets.load_dataset as its name)",
    "data.data_files": "tests/trainer/test_rows.py (reaches datasets.load_dataset)",
    "data.sha256": "tests/trainer/test_fetch.py (an object-store file against its pin)",
    "model.sha256": "tests/trainer/test_fetch.py (an object-store model folder's pins)",
}

# Consumed before or around the trainer: by the compiler (image) or the runtime (container).
OUTSIDE_THE_TRAINER = {
    "job.name": "names the image and the run directory (compiler, runtime)",
    "job.output_dir": "where the runtime puts run directories; the trainer gets QLC_OUTPUT_DIR",
    "runtime.cuda": "selects the torch/CUDA build in the plan (compiler.resolve)",
    "runtime.torch": "selects the torch version in the plan (compiler.resolve)",
    "runtime.python": "selects the image's Python (compiler.resolve)",
    "runtime.gpu_archs": "target compute capabilities in the plan (compiler.resolve)",
    "runtime.shm_size": "docker run --shm-size (runtime.run)",
    "runtime.env": "container environment (runtime.launch)",
    "runtime.secrets": "passed through by name at run time (runtime.launch)",
}


class Stop(Exception):
    """Raised by a recording stand-in once it has seen the call it was placed to see."""


def record(calls: list[tuple[tuple[Any, ...], dict[str, Any]]]) -> Callable[..., Any]:
    def fake(*args: Any, **kwargs: Any) -> Any:
        calls.append((args, kwargs))
        raise Stop

    return fake


@pytest.fixture(scope="module")
def hub() -> Plan:
    return plan_from(HUB, "specs/hub.toml")


@pytest.fixture(scope="module")
def local() -> Plan:
    return plan_from(LOCAL, "specs/local.toml")


@pytest.fixture(scope="module")
def hub_args(hub: Plan) -> Any:
    from trl import SFTConfig  # type: ignore[attr-defined]

    kwargs = training_args(hub, Path("ckpt"), total_steps=77, use_cpu=True, world_size=3)
    return SFTConfig(**kwargs)


def bare_run(plan: Plan, out: Path, **environ: str) -> Run:
    """A Run of `plan` writing into `out`, as Run.start makes it (no launch, no signals)."""
    env = RunEnv.read({contract.ENV_OUTPUT_DIR: str(out), **environ})
    return Run(plan, "0" * 64, env, provenance.new_manifest(plan, "0" * 64, None, env))


def test_every_field_is_checked() -> None:
    fields = {
        f"{section}.{name}"
        for section, info in Spec.model_fields.items()
        for name in info.annotation.model_fields  # type: ignore[union-attr]
    }
    covered = set(CHECKS) | set(OUTSIDE_THE_TRAINER) | set(TESTED_IN)
    assert fields - covered == set(), "spec fields nobody checks"
    assert covered - fields == set(), "checks for fields that no longer exist"


def test_both_specs_set_every_field_away_from_its_default() -> None:
    for section, info in Spec.model_fields.items():
        for name, field in info.annotation.model_fields.items():  # type: ignore[union-attr]
            if field.is_required() or f"{section}.{name}" in TESTED_IN:
                continue
            spec_values = (HUB, LOCAL)
            values = [spec.get(section, {}).get(name, field.default) for spec in spec_values]
            assert any(v != field.default for v in values), f"{section}.{name} left at default"


def check_seed(hub: Plan, local: Plan, hub_args: Any, tmp: Path) -> None:
    assert hub_args.seed == 1234 and hub_args.data_seed == 1234


def check_deterministic(hub: Plan, local: Plan, hub_args: Any, tmp: Path) -> None:
    assert hub_args.full_determinism is True
    args = training_args(local, tmp, total_steps=1, use_cpu=True, world_size=1)
    assert args["full_determinism"] is False


def check_hub_model(
    hub: Plan, local: Plan, hub_args: Any, tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import transformers

    source = model_source(hub.model, None)
    assert source == ModelSource("org/model", "abc123", local=False)
    tokenizer_calls: list[Any] = []
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", record(tokenizer_calls))
    with pytest.raises(Stop):
        load_tokenizer(hub, source)
    ((args, kwargs),) = tokenizer_calls
    assert args == ("org/tok",) and kwargs["revision"] is None and kwargs["trust_remote_code"]
    model_calls: list[Any] = []
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", record(model_calls))
    with pytest.raises(Stop):
        load_model(hub, source, use_cpu=True, local_rank=0, world_size=1)
    ((args, kwargs),) = model_calls
    assert args == ("org/model",) and kwargs["revision"] == "abc123"
    assert kwargs["trust_remote_code"] is True
    assert kwargs["quantization_config"].bnb_4bit_quant_type == "fp4"
    assert str(kwargs["dtype"]) == "torch.bfloat16"


def check_local_model(hub: Plan, local: Plan, hub_args: Any, tmp: Path) -> None:
    with pytest.raises(UserError, match=r"'some/dir' has no config\.json"):
        model_source(local.model, None)
    assert model_source(local.model, str(TINY_MODEL)) == ModelSource(str(TINY_MODEL), None, True)


def check_architecture(hub: Plan, local: Plan, hub_args: Any, tmp: Path) -> None:
    rows = [{"q": "hello", "a": "world"}] * 4
    source = build_smoke_model(hub, rows, tmp / "smoke")
    config = json.loads((Path(source.path_or_id) / "config.json").read_text())
    assert config["model_type"] == "mistral" and source.local


def check_hub_data(
    hub: Plan, local: Plan, hub_args: Any, tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import datasets

    calls: list[Any] = []

    def fake_load(*args: Any, **kwargs: Any) -> Any:
        calls.append((args, kwargs))
        return datasets.Dataset.from_list([{"q": "x", "a": "y"}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    rows = load_rows(hub, None, None)
    assert [(a, k["revision"], k["split"]) for a, k in calls] == [
        (("org/data",), "r1", "training"),
        (("org/data",), "r1", "dev"),
    ]
    assert len(rows.train) == 1 and len(rows.eval) == 1


def check_local_data(hub: Plan, local: Plan, hub_args: Any, tmp: Path) -> None:
    csv = tmp / "rows.csv"
    csv.write_text("body\n" + "".join(f"row {i}\n" for i in range(8)))
    rows = load_rows(local, str(csv), None)
    assert (len(rows.train), len(rows.eval)) == (6, 2)  # eval_fraction 0.25, read as CSV
    assert rows.train[0].keys() == {"body"}
    with pytest.raises(UserError, match=r"'rows\.csv' not found"):
        data_file(local.data, None)


def check_instruction_fields(hub: Plan, local: Plan, hub_args: Any, tmp: Path) -> None:
    row = {"q": "Question", "ctx": "Context", "a": "Answer"}
    rendered = render_row(row, hub.data, 1, None)
    assert rendered.text == "[INST] Question\n\nContext [/INST] Answer"  # template llama2
    assert rendered.trained == [(len("[INST] Question\n\nContext [/INST] "), len(rendered.text))]


def check_text_field(hub: Plan, local: Plan, hub_args: Any, tmp: Path) -> None:
    assert render_row({"body": "some text"}, local.data, 1, None).text == "some text"


def check_messages_field(hub: Plan, local: Plan, hub_args: Any, tmp: Path, tokenizer: Any) -> None:
    data = hub.data.model_copy(update={"format": "chat"})
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    rendered = render_row({"conv": conv}, data, 1, tokenizer)
    assert rendered.text == "<s>[INST] hi [/INST] yo </s>"
    assert rendered.trained == [(len("<s>[INST] hi [/INST]"), len(rendered.text))]


def check_max_length_packing(hub: Plan, local: Plan, hub_args: Any, tmp: Path) -> None:
    assert hub_args.max_length == 333 and hub_args.packing is True


def check_quantization(hub: Plan, local: Plan, hub_args: Any, tmp: Path) -> None:
    config = bnb_config(hub.quantization)
    assert config.load_in_4bit and config.bnb_4bit_quant_type == "fp4"
    assert str(config.bnb_4bit_compute_dtype) == "torch.bfloat16"
    assert config.bnb_4bit_use_double_quant is True
    assert str(config.bnb_4bit_quant_storage) == "torch.bfloat16"
    assert bnb_config(local.quantization) is None


def check_lora(hub: Plan, local: Plan, hub_args: Any, tmp: Path) -> None:
    config = lora_config(hub.lora)
    assert (config.r, config.lora_alpha, config.lora_dropout, config.bias) == (
        7,
        3.0,
        0.2,
        "lora_only",
    )
    assert set(config.target_modules) == {"gate_proj"} and config.modules_to_save == ["lm_head"]
    assert config.task_type == "CAUSAL_LM"


def check_train_hub(hub: Plan, local: Plan, hub_args: Any, tmp: Path) -> None:
    a = hub_args
    assert (a.max_steps, a.per_device_train_batch_size) == (77, 3)
    assert a.per_device_eval_batch_size == 3 and a.learning_rate == 3e-5
    assert str(a.lr_scheduler_type.value) == "polynomial"
    assert a.warmup_steps == 8  # ceil(0.1 x 77): the plan's rule, not the Trainer's
    assert a.weight_decay == 0.05 and a.max_grad_norm == 0.7
    assert a.train_sampling_strategy == "group_by_length"
    assert a.optim.value == "adamw_torch" and a.gradient_checkpointing is False
    assert not hub.substitutions
    assert a.bf16 is True and a.fp16 is False
    assert (a.logging_steps, a.save_steps, a.save_total_limit) == (3, 13, 4)
    assert a.eval_strategy.value == "no" and a.save_strategy.value == "steps"  # qlc evaluates


def check_eval_steps(hub: Plan, local: Plan, hub_args: Any, tmp: Path) -> None:
    """qlc evaluates itself (token-weighted) every eval_steps optimizer steps."""
    from transformers import TrainerControl, TrainerState

    evaluated: list[int] = []

    def evaluate(step: int) -> float:
        evaluated.append(step)
        return 1.5

    log = MetricsLog(tmp / "metrics.jsonl", enabled=True)
    callback = callbacks(hub, "0" * 64, log, StopFlag(), evaluate, Observer(hub.lora.r, 32))
    for step in range(1, 34):
        callback.on_step_end(hub_args, TrainerState(global_step=step), TrainerControl())
    assert evaluated == [11, 22, 33]
    records = [json.loads(line) for line in (tmp / "metrics.jsonl").read_text().splitlines()]
    assert [(r["event"], r["step"], r["eval_loss"]) for r in records] == [
        ("eval", 11, 1.5),
        ("eval", 22, 1.5),
        ("eval", 33, 1.5),
    ]


def check_train_local(hub: Plan, local: Plan, hub_args: Any, tmp: Path) -> None:
    total = local.schedule.total_steps(40)  # 3 epochs of ceil(40 / 4) micro-batches, 5 a step
    assert total == 6
    kwargs = training_args(local, tmp, total_steps=total, use_cpu=True, world_size=1)
    assert kwargs["max_steps"] == 6 and kwargs["gradient_accumulation_steps"] == 5
    assert kwargs["warmup_steps"] == 9 and isinstance(kwargs["warmup_steps"], int)
    assert kwargs["optim"] == "adafactor" and kwargs["activation_checkpointing"] is True
    assert [s.key for s in local.substitutions] == ["train.gradient_checkpointing"]
    assert kwargs["fp16"] is False and kwargs["bf16"] is False
    assert kwargs["save_strategy"] == "no" and kwargs["eval_strategy"] == "no"


def check_engine(
    hub: Plan,
    local: Plan,
    hub_args: Any,
    tmp: Path,
    monkeypatch: pytest.MonkeyPatch,
    tokenizer: Any,
) -> None:
    """Run.train hands the plan to the engine it names (the fast engine's module stands in)."""
    import types

    import qlc.trainer
    from qlc.trainer import reference

    calls: list[Any] = []
    fast = types.ModuleType("qlc.trainer.fast")
    fast.train = record(calls)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "qlc.trainer.fast", fast)
    monkeypatch.setattr(qlc.trainer, "fast", fast, raising=False)
    monkeypatch.setattr(reference, "train", record(calls))
    prepared = prepare([{"body": f"row {i}"} for i in range(4)], local.data, tokenizer, "d", "t")
    data = Data(prepared, None, tokenizer, ModelSource(str(TINY_MODEL), None, True), None)
    for plan in (local, hub.model_copy(update={"data": local.data})):
        with pytest.raises(Stop):
            bare_run(plan, tmp / plan.job.name).train(peft_stand_in(), data)
    (_, fast_kwargs), (_, reference_kwargs) = calls
    assert fast_kwargs["plan"].engine.name == "fast" and fast_kwargs["plan"] == local
    assert reference_kwargs["plan"].engine.name == "reference"
    assert reference_kwargs["resume_from"] is None and reference_kwargs["world_size"] == 1


def peft_stand_in() -> Any:
    """What Run.train reads of the peft model before it hands it to the engine."""
    import types

    config = types.SimpleNamespace(vocab_size=32)
    return types.SimpleNamespace(get_base_model=lambda: types.SimpleNamespace(config=config))


def check_examples_per_step(hub: Plan, local: Plan, hub_args: Any, tmp: Path) -> None:
    assert hub_args.gradient_accumulation_steps == 2  # 18 examples / (3 per GPU x 3 GPUs)
    one = bare_run(hub, tmp / "one", WORLD_SIZE="1")
    one.scale_to_world()
    assert one.plan.schedule.grad_accum == 6 and one.plan.schedule.examples_per_step == 18
    assert one.manifest["predicate"]["run"]["grad_accum"] == 6
    assert one.decisions.entries == [
        {
            "what": "world size",
            "chosen": 1,
            "why": "1 processes: grad_accum 6, 18 examples per step",
        },
    ]
    with pytest.raises(UserError, match=r"examples_per_step = 18 is not a multiple of batch_size"):
        bare_run(hub, tmp / "four", WORLD_SIZE="4").scale_to_world()


def check_distributed(hub: Plan, local: Plan, hub_args: Any, tmp: Path) -> None:
    assert fsdp_args(hub, 3)["fsdp"] is True and hub_args.fsdp is True
    assert hub_args.fsdp_config["auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert fsdp_args(hub, 1) == {}  # one process: nothing to shard
    assert fsdp_args(local, 2) == {}


def check_gpus(hub: Plan, local: Plan, hub_args: Any, tmp: Path) -> None:
    import torch

    if torch.cuda.device_count() < 3:
        with pytest.raises(UserError, match=r"runtime\.gpus = 3 but \d GPU\(s\) are visible"):
            uses_cpu(hub, RunEnv.read({}))
    assert uses_cpu(local, RunEnv.read({})) is True
    argv = launch_argv(hub, {}, 3, "train.py")
    assert argv is not None and "--nproc-per-node=3" in argv


CHECKS: dict[str, Callable[..., None]] = {
    "job.seed": check_seed,
    "job.deterministic": check_deterministic,
    **dict.fromkeys(
        ["model.id", "model.revision", "model.tokenizer", "model.trust_remote_code"],
        check_hub_model,
    ),
    "model.path": check_local_model,
    "model.architecture": check_architecture,
    **dict.fromkeys(["data.id", "data.revision", "data.split", "data.eval_split"], check_hub_data),
    **dict.fromkeys(["data.path", "data.eval_fraction"], check_local_data),
    **dict.fromkeys(
        [
            "data.format",
            "data.prompt_field",
            "data.input_field",
            "data.response_field",
            "data.template",
            "data.loss",
        ],
        check_instruction_fields,
    ),
    "data.text_field": check_text_field,
    "data.messages_field": check_messages_field,
    **dict.fromkeys(["data.max_length", "data.packing"], check_max_length_packing),
    **{
        f"quantization.{k}": check_quantization
        for k in ("load_in_4bit", "quant_type", "compute_dtype", "double_quant", "storage_dtype")
    },
    **{
        f"lora.{k}": check_lora
        for k in ("r", "alpha", "dropout", "bias", "target_modules", "modules_to_save")
    },
    **{
        f"train.{k}": check_train_hub
        for k in (
            "max_steps",
            "batch_size",
            "learning_rate",
            "lr_scheduler",
            "warmup_ratio",
            "weight_decay",
            "max_grad_norm",
            "group_by_length",
            "memory",
            "mixed_precision",
            "logging_steps",
            "save_steps",
            "save_total_limit",
        )
    },
    "train.eval_steps": check_eval_steps,
    **{
        f"train.{k}": check_train_local
        for k in ("epochs", "grad_accum", "warmup_steps", "optimizer", "gradient_checkpointing")
    },
    "train.engine": check_engine,
    "runtime.gpus": check_gpus,
    "runtime.distributed": check_distributed,
    "train.examples_per_step": check_examples_per_step,
}


@pytest.mark.parametrize(
    "check", sorted(set(CHECKS.values()), key=lambda f: f.__name__), ids=lambda f: f.__name__
)
def test_field_reaches_the_library(
    check: Callable[..., None],
    hub: Plan,
    local: Plan,
    hub_args: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    tiny_tokenizer: Any,
) -> None:
    extra: dict[str, Any] = {}
    names = check.__code__.co_varnames[: check.__code__.co_argcount]
    if "monkeypatch" in names:
        extra["monkeypatch"] = monkeypatch
    if "tokenizer" in names:
        extra["tokenizer"] = tiny_tokenizer
    check(hub, local, hub_args, tmp_path, **extra)
