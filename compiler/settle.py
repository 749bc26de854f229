"""settle: the spec's training settings -> the typed sections of the plan, decided once.

Every effective value is decided here: the engine's path, the dtype of each part of the
computation, the optimizer that runs and its state precision, recomputation, examples per step
for the world size, warmup. A combination an engine cannot honour is a SettleError naming the
spec key and the fix; a value that differs from what the spec wrote because another spec value
asked for it (train.memory = "lean") is a Substitution. Nothing here reads the environment.
"""

from __future__ import annotations

from typing import Any

from qlc.compiler.plan import (
    DataPlan,
    Dtype,
    EnginePlan,
    JobPlan,
    LoraPlan,
    MlflowPlan,
    ModelPlan,
    OptimizerPlan,
    Precision,
    QuantizationPlan,
    RuntimePlan,
    Schedule,
    SourcePlan,
    Substitution,
    TrackPlan,
    TrainPlan,
    WandbPlan,
)
from qlc.compiler.spec import URI_SCHEMES, Spec

# train.memory = "lean": the 8-bit states of each 32-bit AdamW (bitsandbytes).
LEAN_OPTIMIZERS = {
    "adamw_torch": "adamw_8bit",
    "adamw_torch_fused": "adamw_8bit",
    "paged_adamw_32bit": "paged_adamw_8bit",
}
OPTIMIZERS: dict[str, tuple[str, int, bool]] = {  # name -> (update rule, state bits, paged)
    "adamw_torch": ("adamw", 32, False),
    "adamw_torch_fused": ("adamw", 32, False),
    "paged_adamw_32bit": ("adamw", 32, True),
    "paged_adamw_8bit": ("adamw", 8, True),
    "adamw_8bit": ("adamw", 8, False),
    "adafactor": ("adafactor", 32, False),
    "sgd": ("sgd", 0, False),
}
MIXED_PRECISION: dict[str, Dtype | None] = {"no": None, "fp16": "float16", "bf16": "bfloat16"}
# model.architecture -> the config.json model_type values it names (the trainer checks the
# model it loads against them).
MODEL_TYPES: dict[str, tuple[str, ...]] = {
    "llama": ("llama",),
    "llama3": ("llama",),
    "mistral": ("mistral",),
    "qwen2": ("qwen2",),
    "qwen3": ("qwen3",),
    "gemma2": ("gemma2",),
    "gemma3": ("gemma3_text", "gemma3"),
    "phi3": ("phi3",),
}
# What the fast engine's padding-free decoder does not model, per architecture: these train
# through the model's own forward on padded batches (same mathematics, slower). The decoder
# models the others (Llama 3's rope scaling through the model's own rotary embedding); what
# only the loaded model shows (tied embeddings, a sliding window shorter than an example) is
# the engine's run-time rule, recorded.
FAST_UNMODELLED: dict[str, str] = {
    "qwen3": "per-head query/key RMSNorm",
    "gemma2": "attention and logit soft-capping, sliding-window layers, GeLU MLP, (1 + w) "
    "RMSNorm around attention and MLP",
    "gemma3": "sliding-window layers with their own RoPE, query/key RMSNorm, GeLU MLP, (1 + w) "
    "RMSNorm around attention and MLP",
    "phi3": "fused qkv_proj and gate_up_proj projections",
}
# Projections some architectures fuse: the fused name -> the separate ones.
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
FUSING_ARCHITECTURES = ("phi3",)
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
MESSAGES_FIELDS = {"chat": "messages", "sharegpt": "conversations"}


class SettleError(ValueError):
    """A spec value no engine setting can honour; `key` names it for the diagnostic."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


def job_plan(spec: Spec) -> JobPlan:
    job = spec.job
    return JobPlan(
        name=job.name, seed=job.seed, deterministic=job.deterministic, output_dir=job.output_dir
    )


def remote(path: str | None) -> tuple[str | None, str | None]:
    """(local path, object-store URI) of a spec's path."""
    if path is not None and path.startswith(URI_SCHEMES):
        return None, path
    return path, None


def model_plan(spec: Spec) -> ModelPlan:
    model = spec.model
    local, uri = remote(model.path)
    return ModelPlan(
        hub_id=model.id,
        revision=model.revision,
        local_path=local,
        tokenizer=model.tokenizer,
        trust_remote_code=model.trust_remote_code,
        architecture=model.architecture,
        uri=uri,
        sha256=dict(sorted(model.sha256.items())) if model.sha256 is not None else None,
        model_types=list(MODEL_TYPES[model.architecture]),
    )


def data_plan(spec: Spec) -> DataPlan:
    data = spec.data
    if data.path is not None and (data.split != "train" or data.eval_split is not None):
        raise SettleError(
            "data.eval_split" if data.eval_split is not None else "data.split",
            "data.split / data.eval_split name hub dataset splits; a local file is one split: "
            "remove them and use data.eval_fraction",
        )
    local, uri = remote(data.path)
    sources = [
        SourcePlan(
            hub_id=source.id,
            revision=source.revision,
            local_path=source.path,
            file_format=source.file_format,
            split=source.split,
            weight=source.weight,
        )
        for source in data.sources
    ]
    return DataPlan(
        hub_id=data.id,
        revision=data.revision,
        local_path=local,
        uri=uri,
        sha256=data.sha256,
        config=data.config,
        data_files=list(data.data_files) if data.data_files is not None else None,
        file_format=data.file_format,
        sources=sources,
        split=data.split,
        eval_split=data.eval_split,
        eval_fraction=data.eval_fraction,
        format=data.format,
        text_field=data.text_field,
        prompt_field=data.prompt_field,
        input_field=data.input_field,
        response_field=data.response_field,
        template=data.template,
        messages_field=data.messages_field or MESSAGES_FIELDS.get(data.format, "messages"),
        roles=dict(sorted({**SHAREGPT_ROLES, **data.roles}.items()))
        if data.format == "sharegpt"
        else {},
        chat_template=data.chat_template,
        chat_template_file=data.chat_template_file,
        loss=data.loss,
        max_length=data.max_length,
        packing=data.packing,
    )


def quantization_plan(spec: Spec) -> QuantizationPlan:
    q = spec.quantization
    return QuantizationPlan(
        load_in_4bit=q.load_in_4bit,
        quant_type=q.quant_type,
        compute_dtype=q.compute_dtype,
        double_quant=q.double_quant,
        storage_dtype=q.storage_dtype,
    )


def lora_plan(spec: Spec) -> LoraPlan:
    lora = spec.lora
    targets = lora.target_modules
    if targets != "all-linear":
        _check_projection_names(spec.model.architecture, list(targets))
    return LoraPlan(
        r=lora.r,
        alpha=lora.alpha,
        scale=lora.alpha / lora.r,
        dropout=lora.dropout,
        bias=lora.bias,
        target_modules=targets if targets == "all-linear" else sorted(targets),
        modules_to_save=list(lora.modules_to_save),
    )


def _check_projection_names(architecture: str, targets: list[str]) -> None:
    """Projection names the architecture does not have: peft would stop at load time."""
    fuses = architecture in FUSING_ARCHITECTURES
    if fuses:
        wrong = [name for parts in FUSED.values() for name in parts if name in targets]
        fix = sorted({fused for fused, parts in FUSED.items() if set(parts) & set(targets)})
        how = f"{architecture} fuses them: use {', '.join(fix)}"
    else:
        wrong = [name for name in FUSED if name in targets]
        fix = [part for name in wrong for part in FUSED[name]]
        how = f"{architecture} keeps them separate: use {', '.join(fix)}"
    if wrong:
        raise SettleError(
            "lora.target_modules",
            f'{architecture} has no module {wrong[0]!r} ({how}, or "all-linear")',
        )


def runtime_plan(spec: Spec) -> RuntimePlan:
    """The run's environment; the trackers' credentials join runtime.secrets (by name)."""
    runtime, model, data = spec.runtime, spec.model, spec.data
    tracker_secrets = {name for _, name in spec.track.secret_names()}
    return RuntimePlan(
        gpus=runtime.gpus,
        distributed=runtime.distributed,
        shm_size=runtime.shm_size,
        env=dict(sorted(runtime.env.items())),
        secrets=sorted(set(runtime.secrets) | tracker_secrets),
        needs_hub=model.id is not None
        or data.id is not None
        or model.tokenizer is not None
        or any(source.id is not None for source in data.sources),
    )


def track_plan(spec: Spec) -> TrackPlan:
    """The trackers the run logs to (their client packages join the stack in resolve)."""
    track = spec.track
    wandb = mlflow = None
    if track.wandb is not None:
        w = track.wandb
        wandb = WandbPlan(mode=w.mode, project=w.project, entity=w.entity, name=w.name,
                          api_key_env=w.api_key if w.mode == "online" else None)  # fmt: skip
    if track.mlflow is not None:
        m = track.mlflow
        mlflow = MlflowPlan(uri=m.uri.rstrip("/"), experiment=m.experiment or spec.job.name,
                            token_env=m.token)  # fmt: skip
    return TrackPlan(tensorboard=track.tensorboard, wandb=wandb, mlflow=mlflow)


def schedule(spec: Spec) -> Schedule:
    train = spec.train
    world = max(spec.runtime.gpus, 1)
    if train.examples_per_step is not None:
        accum = train.examples_per_step // (train.batch_size * world)
    else:
        accum = train.grad_accum
    return Schedule(
        max_steps=train.max_steps,
        epochs=None if train.max_steps is not None else (train.epochs or 1.0),
        batch_size=train.batch_size,
        grad_accum=accum,
        world_size=world,
        examples_per_step=train.batch_size * accum * world,
        keep_examples_per_step=train.examples_per_step is not None,
        lr_scheduler=train.lr_scheduler,
        warmup_steps=train.warmup_steps,
        warmup_ratio=train.warmup_ratio or 0.0,
        group_by_length=train.group_by_length,
        logging_steps=train.logging_steps,
        eval_steps=train.eval_steps if spec.data.has_eval else None,
        save_steps=train.save_steps,
        save_total_limit=train.save_total_limit,
    )


def optimizer_plan(spec: Spec, subs: list[Substitution]) -> OptimizerPlan:
    train = spec.train
    name = train.optimizer
    if train.memory == "lean" and name in LEAN_OPTIMIZERS:
        name = LEAN_OPTIMIZERS[train.optimizer]
        subs.append(
            Substitution(
                key="train.optimizer",
                written=train.optimizer,
                effective=name,
                why='train.memory = "lean" keeps the optimizer states in 8 bits',
            )
        )
    update, bits, paged = OPTIMIZERS[name]
    if spec.runtime.distributed == "fsdp" and (paged or bits == 8):
        _refuse_fsdp_optimizer(spec, name)
    return OptimizerPlan(
        name=name,
        update=update,
        state_bits=bits,
        paged=paged and spec.runtime.gpus > 0,  # bitsandbytes pages only CUDA memory
        learning_rate=train.learning_rate,
        weight_decay=train.weight_decay,
        max_grad_norm=train.max_grad_norm if train.max_grad_norm > 0 else None,
    )


def _refuse_fsdp_optimizer(spec: Spec, name: str) -> None:
    """bitsandbytes' optimizers update plain tensors; FSDP (FSDP2 in transformers 5) hands the
    optimizer sharded DTensors, and the first step fails after the model has loaded."""
    lean = name != spec.train.optimizer
    raise SettleError(
        "train.memory" if lean else "train.optimizer",
        f"{name!r} (bitsandbytes) cannot update FSDP's sharded parameters"
        + (' (memory = "lean" chose it)' if lean else "")
        + ': use train.optimizer = "adamw_torch" (under FSDP its states are sharded too)'
        + (', memory = "standard"' if lean else "")
        + ', or runtime.distributed = "ddp"',
    )


def precision(spec: Spec, engine: str) -> Precision:
    q, train = spec.quantization, spec.train
    autocast = MIXED_PRECISION[train.mixed_precision]
    if autocast == "float16" and spec.runtime.gpus == 0:
        raise SettleError(
            "train.mixed_precision",
            'fp16 autocast (with loss scaling) needs a GPU: on CPU use "bf16" or "no"',
        )
    if engine == "reference":
        # peft's prepare_model_for_kbit_training keeps every weight that is not 4-bit (norms,
        # embeddings, head) in float32, so the residual stream between the matmuls is float32.
        activations: Dtype = "float32" if q.load_in_4bit else q.compute_dtype
    else:
        activations = q.compute_dtype
    return Precision(
        base_matmul=q.compute_dtype,
        adapter_weights="float32",
        adapter_compute=autocast or "float32",
        activations=activations,
        logits="float32",
        loss_scaling=autocast == "float16",
    )


def recompute_for(spec: Spec, engine: str, subs: list[Substitution]) -> str:
    train = spec.train
    if train.memory == "compact" and not train.gradient_checkpointing:
        raise SettleError(
            "train.gradient_checkpointing",
            'train.memory = "compact" recomputes every decoder layer: remove '
            'gradient_checkpointing = false, or use memory = "standard"',
        )
    if train.memory in ("lean", "compact"):
        if not train.gradient_checkpointing:
            subs.append(
                Substitution(
                    key="train.gradient_checkpointing",
                    written=False,
                    effective=True,
                    why='train.memory = "lean" recomputes every decoder layer in the backward pass',
                )
            )
        return "every-layer"
    if engine == "fast" and spec.runtime.gpus > 0:
        # The fast engine keeps activations when they fit the free GPU memory (its whole
        # speed-up over recomputation); gradient_checkpointing = false forbids recomputing.
        return "when-short" if train.gradient_checkpointing else "none"
    return "every-layer" if train.gradient_checkpointing else "none"


def fast_path(spec: Spec) -> tuple[str, str]:
    """(path, batches) of the fast engine for this spec: its own decoder, or the model's
    forward on padded batches for what the decoder does not model."""
    lora = spec.lora
    reasons = []
    architecture = spec.model.architecture
    if architecture in FAST_UNMODELLED:
        reasons.append(f"model.architecture = {architecture!r}: {FAST_UNMODELLED[architecture]}")
    if lora.bias != "none":
        reasons.append(f"lora.bias = {lora.bias!r}")
    if lora.modules_to_save:
        reasons.append("lora.modules_to_save")
    if not spec.quantization.load_in_4bit:
        reasons.append("quantization.load_in_4bit = false")
    if reasons:
        return "generic: the model's forward on padded batches (" + ", ".join(reasons) + ")", (
            "padded"
        )
    return "padding-free decoder (fused q|k|v and gate|up, fused LoRA)", "padding-free"


def engine_plan(spec: Spec, subs: list[Substitution]) -> EnginePlan:
    train, runtime = spec.train, spec.runtime
    engine = train.engine
    if engine == "fast":
        _check_fast(spec)
        path, batches = fast_path(spec)
        lean = train.memory in ("lean", "compact")
        if train.memory == "lean":
            base = "streamed" if runtime.gpus > 0 else "4bit"
        elif train.memory == "compact":
            base = "4bit"  # on the GPU, dequantized per matmul
        else:
            base = "dequantized" if batches == "padding-free" else "4bit"
        attention = (
            "varlen flash attention within each example (SDPA per example where the GPU has "
            "no varlen kernel; recorded)"
            if batches == "padding-free"
            else "the model's SDPA on padded batches"
        )
        loss = "chunked" if lean and batches == "padding-free" else "full"
    else:
        _check_reference(spec)
        path, batches = "trl SFTTrainer (transformers Trainer, peft, bitsandbytes)", "padded"
        base, loss = "4bit", "full"
        attention = "the model's SDPA on padded batches"
    return EnginePlan(
        name=engine,
        memory=train.memory,
        path=path,
        batches=batches,
        base_weights=base,
        recompute=recompute_for(spec, engine, subs),
        attention=attention,
        loss=loss,
        precision=precision(spec, engine),
        optimizer=optimizer_plan(spec, subs),
        distributed=runtime.distributed,
    )


def _check_reference(spec: Spec) -> None:
    if spec.train.memory == "compact":
        raise SettleError(
            "train.memory",
            'memory = "compact" is the fast engine\'s setting (the reference engine already '
            'keeps the base 4-bit): use train.engine = "fast", or memory = "standard" / "lean"',
        )


def _check_fast(spec: Spec) -> None:
    if spec.data.packing:
        raise SettleError(
            "data.packing",
            "the fast engine trains padding-free batches and does not pack examples: set "
            "data.packing = false (nothing is padded, so packing gains nothing), or use "
            'train.engine = "reference"',
        )
    if spec.runtime.distributed == "fsdp":
        raise SettleError(
            "runtime.distributed",
            "the fast engine is data parallel (the whole 4-bit model in every process): use "
            'runtime.distributed = "ddp", or train.engine = "reference" to shard the model',
        )


def settle(spec: Spec) -> dict[str, Any]:
    """The plan's sections decided from the spec: {section: value, "substitutions": [...]}.
    SettleError for a combination no engine honours."""
    subs: list[Substitution] = []
    engine = engine_plan(spec, subs)
    return {
        "job": job_plan(spec),
        "model": model_plan(spec),
        "data": data_plan(spec),
        "quantization": quantization_plan(spec),
        "lora": lora_plan(spec),
        "train": TrainPlan(schedule=schedule(spec), engine=engine),
        "runtime": runtime_plan(spec),
        "track": track_plan(spec),
        "substitutions": subs,
    }
