"""Helpers of the fast engine's tests: a tiny random Llama loaded 4-bit NF4 by bitsandbytes on
the CPU and wrapped with peft LoRA, typed plans resolved from a spec, and examples. The test
modules import them (`from fast_support import ...`); the 2-process launcher of
test_fast_distributed.py does too, so both processes build the same model and plan."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")

from qlc.compiler.plan import Plan  # noqa: E402
from qlc.compiler.resolve import resolve  # noqa: E402
from qlc.compiler.spec import Spec  # noqa: E402
from qlc.trainer.types import Decisions, Example, MetricsLog, StopFlag  # noqa: E402

SEED = 7
VOCAB = 97
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def save_tiny_llama(path: Path, layers: int = 2, hidden: int = 64, **config: Any) -> Path:
    """A random-weight Llama with grouped-query attention (4 heads, 2 key/value heads)."""
    torch.manual_seed(0)
    settings = {
        "vocab_size": VOCAB,
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 128,
        **config,
    }
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**settings)).save_pretrained(path)
    return path


def spec(
    *,
    memory: str = "standard",
    compute: str = "float32",
    mixed: str = "no",
    gpus: int = 0,
    lora: dict[str, Any] | None = None,
    **train: Any,
) -> dict[str, Any]:
    settings = {"engine": "fast", "memory": memory, "mixed_precision": mixed, "max_steps": 6,
                "batch_size": 3, "grad_accum": 2, "learning_rate": 1e-3,
                "lr_scheduler": "cosine", "warmup_ratio": 0.2, "weight_decay": 0.01,
                "optimizer": "adamw_torch", "max_grad_norm": 0.3, "group_by_length": True,
                "logging_steps": 1, **train}  # fmt: skip
    if "examples_per_step" in train and "grad_accum" not in train:
        del settings["grad_accum"]  # derived from examples_per_step
    if "epochs" in train and "max_steps" not in train:
        del settings["max_steps"]
    return {
        "job": {"name": "t", "seed": SEED},
        "model": {"path": "tiny/model", "architecture": "llama"},
        "data": {"path": "tiny/data.jsonl", "format": "text"},
        "quantization": {"compute_dtype": compute},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0,
                 "target_modules": ["q_proj", "v_proj", "down_proj"], **(lora or {})},
        "train": settings,
        "runtime": {"gpus": gpus},
    }  # fmt: skip


def make_plan(**kwargs: Any) -> Plan:
    """A plan resolved from `spec(**kwargs)`, as the compiler makes it (CPU runtime)."""
    plan = resolve(
        Spec.model_validate(spec(**kwargs)),
        spec_name="t.toml",
        spec_sha256="0" * 64,
        qlc_version="0.0.0",
        lock=None,
    )
    return plan


def with_engine(plan: Plan, precision: dict[str, Any] | None = None, **engine: Any) -> Plan:
    """`plan` with engine settings changed (what the CPU tests reach that a CPU spec does
    not: streamed base weights, float16 adapter compute with loss scaling)."""
    current = plan.train.engine
    if precision:
        engine["precision"] = current.precision.model_copy(update=precision)
    train = plan.train.model_copy(update={"engine": current.model_copy(update=engine)})
    return plan.model_copy(update={"train": train})


def with_schedule(plan: Plan, **schedule: Any) -> Plan:
    train = plan.train.model_copy(
        update={"schedule": plan.train.schedule.model_copy(update=schedule)}
    )
    return plan.model_copy(update={"train": train})


def load_model(path: Path, plan: Plan, dtype: Any = None, b_std: float = 0.02) -> Any:
    """The plan's 4-bit base (quantized from, and its other weights in, `dtype`: float32 by
    default) with a fresh float32 LoRA adapter whose B is non-zero, so every adapter weight
    gets a gradient at once."""
    quant = plan.quantization
    config = transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.quant_type,
        bnb_4bit_compute_dtype=DTYPES[quant.compute_dtype],
    )
    base = transformers.AutoModelForCausalLM.from_pretrained(
        path, quantization_config=config, dtype=dtype or torch.float32, device_map="cpu"
    )
    lora = plan.lora
    targets = lora.target_modules
    torch.manual_seed(1)
    model = peft.get_peft_model(
        base,
        peft.LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=targets, task_type="CAUSAL_LM"),
    )  # fmt: skip
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, b_std)
    model.train()  # bitsandbytes' CPU eval mode repacks the weights for a bf16 kernel
    return model


def make_examples(n: int, seed: int) -> list[Example]:
    """Examples of 4-39 tokens with a masked prompt (a quarter of each)."""
    gen = torch.Generator().manual_seed(seed)
    examples: list[Example] = []
    for _ in range(n):
        length = int(torch.randint(4, 40, (1,), generator=gen))
        ids = [1, *torch.randint(3, VOCAB, (length - 1,), generator=gen).tolist()]
        labels = list(ids)
        labels[: length // 4] = [-100] * (length // 4)
        examples.append({"input_ids": ids, "labels": labels})
    return examples


def adapter(model: Any) -> dict[str, Any]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def run_fast(
    model: Any,
    plan: Plan,
    examples: list[Example],
    out: Path,
    eval_examples: list[Example] | None = None,
    resume_from: Path | None = None,
    stop: StopFlag | None = None,
    sample: Any = None,
    log_hook: Any = None,
    log_enabled: bool = True,
) -> tuple[Any, list[dict[str, Any]], Decisions]:
    """qlc.trainer.fast.train with a metrics log kept in memory: (result, records, decisions)."""
    from qlc.trainer.fast import train

    out.mkdir(parents=True, exist_ok=True)
    log = MetricsLog(out / "metrics.jsonl", enabled=log_enabled)
    records: list[dict[str, Any]] = []
    log.listeners.append(records.append)
    if log_hook is not None:
        log.listeners.append(log_hook)
    decisions = Decisions()
    result = train(
        model=model,
        pad_id=0,
        train_examples=examples,
        eval_examples=eval_examples or [],
        plan=plan,
        plan_sha256="a" * 64,
        out=out,
        log=log,
        decisions=decisions,
        stop=stop or StopFlag(),
        resume_from=resume_from,
        sample=sample,
    )
    return result, records, decisions


def train_losses(records: list[dict[str, Any]]) -> list[float]:
    return [r["loss"] for r in records if r.get("event") == "train"]
