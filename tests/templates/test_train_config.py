"""Every spec field reaches the library configuration (or is rejected with an error).

Two specs set every field away from its default (two, because some fields exclude each other:
hub vs local inputs, epochs vs max_steps, warmup ratio vs steps). Each field has a check that
follows it into bitsandbytes, peft, trl/transformers, the data pipeline or the hub calls. A field
added to the spec language without a check here fails `test_every_field_is_checked`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from conftest import TINY_MODEL

from qlc.compiler.explain import grad_accum
from qlc.compiler.spec import Spec

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
        "engine": "fast",
        "memory": "lean",
        "logging_steps": 3,
        "eval_steps": 11,
        "save_steps": 13,
        "save_total_limit": 4,
    },
    "runtime": {
        "gpus": 3,
        "distributed": "fsdp",
        "cuda": "12.4",
        "torch": "2.5.0",
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
        "mixed_precision": "fp16",
    },
    "runtime": {"gpus": 0},
}

# Consumed before or around the script: by the compiler (image) or the runtime (container).
OUTSIDE_THE_SCRIPT = {
    "job.name": "names the image and the run directory (compiler, runtime)",
    "job.output_dir": "where the runtime puts run directories; the script gets QLC_OUTPUT_DIR",
    "runtime.cuda": "selects the torch/CUDA build in the plan (compiler.resolve)",
    "runtime.torch": "selects the torch version in the plan (compiler.resolve)",
    "runtime.python": "selects the image's Python (compiler.resolve)",
    "runtime.gpu_archs": "target compute capabilities in the plan (compiler.resolve)",
    "runtime.shm_size": "docker run --shm-size (runtime.run)",
    "runtime.env": "container environment (runtime.run)",
    "runtime.secrets": "passed through by name at run time (runtime.run)",
}


def effective(values: dict[str, Any]) -> dict[str, Any]:
    """The spec as the plan carries it (compiler.resolve derives grad_accum)."""
    spec = Spec.model_validate(values)
    dumped = spec.model_dump(mode="json")
    dumped["train"]["grad_accum"] = grad_accum(spec)
    return dumped


class Stop(Exception):
    """Raised by a recording stand-in once it has seen the call it was placed to see."""


def record(calls: list[tuple[tuple, dict]]) -> Callable[..., Any]:
    def fake(*args: Any, **kwargs: Any) -> Any:
        calls.append((args, kwargs))
        raise Stop

    return fake


@pytest.fixture(scope="module")
def hub() -> dict[str, Any]:
    return effective(HUB)


@pytest.fixture(scope="module")
def local() -> dict[str, Any]:
    return effective(LOCAL)


@pytest.fixture(scope="module")
def hub_args(script: ModuleType, hub: dict[str, Any]) -> Any:
    from trl import SFTConfig

    kwargs = script.training_args(hub, Path("ckpt"), use_cpu=True, has_eval=True)
    return SFTConfig(**kwargs)


def test_every_field_is_checked() -> None:
    fields = {
        f"{section}.{name}"
        for section, info in Spec.model_fields.items()
        for name in info.annotation.model_fields
    }
    covered = set(CHECKS) | set(OUTSIDE_THE_SCRIPT)
    assert fields - covered == set(), "spec fields nobody checks"
    assert covered - fields == set(), "checks for fields that no longer exist"


def test_both_specs_set_every_field_away_from_its_default() -> None:
    for section, info in Spec.model_fields.items():
        for name, field in info.annotation.model_fields.items():
            if field.is_required():
                continue
            values = [spec.get(section, {}).get(name, field.default) for spec in (HUB, LOCAL)]
            assert any(v != field.default for v in values), f"{section}.{name} left at default"


def check_seed(script: ModuleType, hub: dict, local: dict, hub_args: Any, tmp: Path) -> None:
    assert hub_args.seed == 1234 and hub_args.data_seed == 1234


def check_deterministic(
    script: ModuleType, hub: dict, local: dict, hub_args: Any, tmp: Path
) -> None:
    assert hub_args.full_determinism is True
    assert (
        script.training_args(local, tmp, use_cpu=True, has_eval=True)["full_determinism"] is False
    )


def check_hub_model(
    script: ModuleType,
    hub: dict,
    local: dict,
    hub_args: Any,
    tmp: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import transformers

    source, revision = script.model_source(hub, script.Env.read({}))
    assert (source, revision) == ("org/model", "abc123")
    tokenizer_calls: list = []
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", record(tokenizer_calls))
    with pytest.raises(Stop):
        script.load_tokenizer(hub, source, revision)
    ((args, kwargs),) = tokenizer_calls
    assert args == ("org/tok",) and kwargs["revision"] is None and kwargs["trust_remote_code"]
    model_calls: list = []
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", record(model_calls))
    with pytest.raises(Stop):
        script.load_model(hub, source, revision, script.Env.read({}), use_cpu=True)
    ((args, kwargs),) = model_calls
    assert args == ("org/model",) and kwargs["revision"] == "abc123"
    assert kwargs["trust_remote_code"] is True
    assert kwargs["quantization_config"].bnb_4bit_quant_type == "fp4"
    assert str(kwargs["dtype"]) == "torch.bfloat16"


def check_local_model(script: ModuleType, hub: dict, local: dict, hub_args: Any, tmp: Path) -> None:
    with pytest.raises(script.UserError, match=r"'some/dir' has no config\.json"):
        script.model_source(local, script.Env.read({}))
    env = script.Env.read({"QLC_MODEL_PATH": str(TINY_MODEL)})
    assert script.model_source(local, env) == (str(TINY_MODEL), None)


def check_architecture(
    script: ModuleType, hub: dict, local: dict, hub_args: Any, tmp: Path
) -> None:
    rows = [{"q": "hello", "a": "world"}] * 4
    path = script.build_smoke_model(hub, rows, tmp / "smoke")
    assert json.loads((Path(path) / "config.json").read_text())["model_type"] == "mistral"


def check_hub_data(
    script: ModuleType,
    hub: dict,
    local: dict,
    hub_args: Any,
    tmp: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import datasets

    calls: list = []

    def fake_load(*args: Any, **kwargs: Any) -> Any:
        calls.append((args, kwargs))
        return datasets.Dataset.from_list([{"q": "x", "a": "y"}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    rows, eval_rows = script.load_rows(hub, script.Env.read({}))
    assert [(a, k["revision"], k["split"]) for a, k in calls] == [
        (("org/data",), "r1", "training"),
        (("org/data",), "r1", "dev"),
    ]
    assert len(rows) == 1 and len(eval_rows) == 1


def check_local_data(script: ModuleType, hub: dict, local: dict, hub_args: Any, tmp: Path) -> None:
    csv = tmp / "rows.csv"
    csv.write_text("body\n" + "".join(f"row {i}\n" for i in range(8)))
    env = script.Env.read({"QLC_DATA_PATH": str(csv)})
    assert script.data_source(local, env) == (str(csv), "csv")
    rows, eval_rows = script.load_rows(local, env)
    assert (len(rows), len(eval_rows)) == (6, 2)  # eval_fraction 0.25
    with pytest.raises(script.UserError, match=r"'rows\.csv' not found"):
        script.data_source(local, script.Env.read({}))


def check_instruction_fields(
    script: ModuleType, hub: dict, local: dict, hub_args: Any, tmp: Path
) -> None:
    row = {"q": "Question", "ctx": "Context", "a": "Answer"}
    rendered = script.render_row(row, hub["data"], 0, None)
    assert rendered.text == "[INST] Question\n\nContext [/INST] Answer"  # template llama2
    assert rendered.trained == [(len("[INST] Question\n\nContext [/INST] "), len(rendered.text))]


def check_text_field(script: ModuleType, hub: dict, local: dict, hub_args: Any, tmp: Path) -> None:
    assert script.render_row({"body": "some text"}, local["data"], 0, None).text == "some text"


def check_messages_field(
    script: ModuleType, hub: dict, local: dict, hub_args: Any, tmp: Path, tokenizer: Any
) -> None:
    data = {**hub["data"], "format": "chat"}
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    rendered = script.render_row({"conv": conv}, data, 0, tokenizer)
    assert rendered.text == "<s>[INST] hi [/INST] yo </s>"
    assert rendered.trained == [(len("<s>[INST] hi [/INST]"), len(rendered.text))]


def check_max_length_packing(
    script: ModuleType, hub: dict, local: dict, hub_args: Any, tmp: Path
) -> None:
    assert hub_args.max_length == 333 and hub_args.packing is True


def check_quantization(
    script: ModuleType, hub: dict, local: dict, hub_args: Any, tmp: Path
) -> None:
    config = script.bnb_config(hub)
    assert config.load_in_4bit and config.bnb_4bit_quant_type == "fp4"
    assert str(config.bnb_4bit_compute_dtype) == "torch.bfloat16"
    assert config.bnb_4bit_use_double_quant is True
    assert str(config.bnb_4bit_quant_storage) == "torch.bfloat16"
    assert script.bnb_config(local) is None


def check_lora(script: ModuleType, hub: dict, local: dict, hub_args: Any, tmp: Path) -> None:
    config = script.lora_config(hub)
    assert (config.r, config.lora_alpha, config.lora_dropout, config.bias) == (
        7,
        3.0,
        0.2,
        "lora_only",
    )
    assert set(config.target_modules) == {"gate_proj"} and config.modules_to_save == ["lm_head"]


def check_train_hub(script: ModuleType, hub: dict, local: dict, hub_args: Any, tmp: Path) -> None:
    a = hub_args
    assert (a.max_steps, a.per_device_train_batch_size) == (77, 3)
    assert a.per_device_eval_batch_size == 3 and a.learning_rate == 3e-5
    assert str(a.lr_scheduler_type.value) == "polynomial" and a.warmup_steps == 0.1
    assert a.weight_decay == 0.05 and a.max_grad_norm == 0.7
    assert a.train_sampling_strategy == "group_by_length"
    assert a.optim.value == "adamw_8bit"  # memory "lean": 8-bit states for adamw_torch
    assert a.gradient_checkpointing is True  # memory "lean" turns it on
    assert a.bf16 is True and a.fp16 is False
    assert (a.logging_steps, a.eval_steps, a.save_steps, a.save_total_limit) == (3, 11, 13, 4)
    assert a.eval_strategy.value == "steps" and a.save_strategy.value == "steps"


def check_train_local(script: ModuleType, hub: dict, local: dict, hub_args: Any, tmp: Path) -> None:
    kwargs = script.training_args(local, tmp, use_cpu=True, has_eval=False)
    assert kwargs["num_train_epochs"] == 3.0 and kwargs["max_steps"] == -1
    assert kwargs["gradient_accumulation_steps"] == 5
    assert kwargs["warmup_steps"] == 9 and isinstance(kwargs["warmup_steps"], int)
    assert kwargs["optim"] == "adafactor" and kwargs["gradient_checkpointing"] is False
    assert kwargs["fp16"] is True and kwargs["bf16"] is False
    assert kwargs["eval_strategy"] == "no" and kwargs["save_strategy"] == "no"


def check_engine(
    script: ModuleType,
    hub: dict,
    local: dict,
    hub_args: Any,
    tmp: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = tmp / "engine.jsonl"
    data.write_text("".join(json.dumps({"q": f"q{i}", "a": f"a{i}"}) + "\n" for i in range(8)))
    spec = json.loads(json.dumps(hub))
    spec["data"].update(id=None, revision=None, split="train", eval_split=None)
    spec["runtime"]["gpus"] = 0
    calls: list = []
    monkeypatch.setattr(script, "train_fast", record(calls))
    env = script.Env.read(
        {"QLC_OUTPUT_DIR": str(tmp / "engine-out"), "QLC_DATA_PATH": str(data), "QLC_SMOKE": "1"}
    )
    with pytest.raises(Stop):
        script.run(spec, env, {"predicate": {"inputs": {}, "run": {}, "environment": {}}})
    ((args, _kwargs),) = calls
    assert args[4]["train"]["engine"] == "fast"


def check_examples_per_step(
    script: ModuleType, hub: dict, local: dict, hub_args: Any, tmp: Path
) -> None:
    assert hub_args.gradient_accumulation_steps == 2  # 18 examples / (3 per GPU x 3 GPUs)
    assert script.fit_examples_per_step(hub, 3)["train"]["grad_accum"] == 2
    assert script.fit_examples_per_step(hub, 1)["train"]["grad_accum"] == 6  # same 18 a step
    with pytest.raises(script.UserError, match=r"examples_per_step = 18 is not a multiple"):
        script.fit_examples_per_step(hub, 4)


def check_distributed(script: ModuleType, hub: dict, local: dict, hub_args: Any, tmp: Path) -> None:
    assert script.fsdp_args(hub)["fsdp"] is True and hub_args.fsdp is True
    assert hub_args.fsdp_config["auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert script.fsdp_args(local) == {}


def check_gpus(script: ModuleType, hub: dict, local: dict, hub_args: Any, tmp: Path) -> None:
    import torch

    if torch.cuda.device_count() < 3:
        with pytest.raises(script.UserError, match=r"runtime\.gpus = 3"):
            script.check_devices(hub, script.Env.read({}))
    assert script.check_devices(local, script.Env.read({})) is True


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
            "grad_accum",
            "learning_rate",
            "lr_scheduler",
            "warmup_ratio",
            "weight_decay",
            "max_grad_norm",
            "group_by_length",
            "memory",
            "mixed_precision",
            "logging_steps",
            "eval_steps",
            "save_steps",
            "save_total_limit",
        )
    },
    **{
        f"train.{k}": check_train_local
        for k in ("epochs", "warmup_steps", "optimizer", "gradient_checkpointing")
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
    script: ModuleType,
    hub: dict[str, Any],
    local: dict[str, Any],
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
    check(script, hub, local, hub_args, tmp_path, **extra)
