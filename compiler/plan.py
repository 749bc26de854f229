"""The plan: a spec fully resolved and pinned, as typed, frozen values.

`resolve` (compiler/resolve.py) makes it once; everything downstream reads it and re-derives
nothing: the templates render it, the image carries it as plan.json, the trainer package
(qlc/trainer) executes it, the runtime launches it, `qlc explain` prints it, the manifest and the
model card record it. Every value the trainer uses is here: the pins of the image, the effective
settings of every part (dtypes of each computation, the optimizer that runs and its state
precision, recomputation, examples per step for the world size, warmup, the evaluation metric),
and the substitutions: where what trains differs from what the spec wrote, because the user
asked for it, each named with its reason.

What only the run can know (the GPU present, the dataset's size, the world size of a batch
job) is a rule here, a method of the plan: the trainer applies it and records the decision.

This module imports pydantic and the contract only: the image carries it beside the trainer.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, JsonValue

from qlc.contract import EVAL_LOSS_DEFINITION, OBJECT_STORE_SCHEMES, sha256_bytes

Dtype = Literal["float16", "bfloat16", "float32"]
DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}
SMOKE_ROWS = 64
SMOKE_MAX_STEPS = 4
SMOKE_MAX_LENGTH = 256


class Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _unset(value: Any) -> bool:
    """Left out of plan.json when unused: plans that do not use a newer field keep their
    bytes (and hashes, and their images' build cache)."""
    return value is None or value == []


# ---------------------------------------------------------------------------------------------
# The image's pins.
class BaseImage(Frozen):
    repository: Annotated[str, Field(description="Image repository, e.g. 'nvidia/cuda'.")]
    tag: Annotated[str, Field(description="The tag the digest was recorded for.")]
    digest: Annotated[str, Field(pattern=r"^sha256:[0-9a-f]{64}$", description="Pinned digest.")]
    verified: Annotated[
        bool, Field(description="Whether qlc resolved this digest from a registry itself.")
    ]
    source: Annotated[str, Field(description="Where the digest was found.")]
    python: Annotated[str, Field(description="Python major.minor the image provides.")]

    @property
    def reference(self) -> str:
        return f"{self.repository}@{self.digest}"


class Stack(Frozen):
    """Versions of the Python training stack, pinned exactly."""

    python: str
    torch: str
    cuda: Annotated[str, Field(description="CUDA major.minor the torch wheel was built for.")]
    transformers: str
    peft: str
    trl: str
    bitsandbytes: str
    accelerate: str
    datasets: str
    object_stores: Annotated[
        list[str],
        Field(
            exclude_if=_unset,
            description="fsspec backends of the object stores the plan reads (pins).",
        ),
    ] = []
    trackers: Annotated[
        list[str],
        Field(
            exclude_if=_unset,
            description="Client packages of the trackers the plan logs to (track.wandb, "
            "track.mlflow; pins).",
        ),
    ] = []

    def requirements(self) -> list[str]:
        """Top-level requirements the lock is resolved from, sorted: the stack, and the
        object-store backends and trackers' clients only for a plan that uses them."""
        names = ("accelerate", "bitsandbytes", "datasets", "peft", "torch", "transformers", "trl")
        pins = [f"{name}=={getattr(self, name)}" for name in names]
        return sorted([*pins, *self.object_stores, *self.trackers])


class LockRef(Frozen):
    path: Annotated[str, Field(description="Lock file, relative to the spec file.")]
    sha256: Annotated[str, Field(description="sha256 of the lock file's bytes.")]
    input_hash: Annotated[str, Field(description="Hash of what the lock was resolved from.")]


# ---------------------------------------------------------------------------------------------
# What the run reads.
class JobPlan(Frozen):
    name: str
    seed: int
    deterministic: bool
    output_dir: Annotated[
        str, Field(description="As written: relative to the spec file, or an object-store URI.")
    ]


class ModelPlan(Frozen):
    hub_id: str | None
    revision: str | None
    local_path: Annotated[
        str | None, Field(description="As written in the spec (relative to the spec file).")
    ]
    tokenizer: str | None
    trust_remote_code: bool
    architecture: str
    uri: Annotated[
        str | None,
        Field(exclude_if=_unset, description="An object-store folder, downloaded at start."),
    ] = None
    sha256: Annotated[
        dict[str, str] | None,
        Field(exclude_if=_unset, description="{file: sha256} the model folder must hold."),
    ] = None
    model_types: Annotated[
        list[str],
        Field(description="config.json model_type values of model.architecture (checked)."),
    ]

    @property
    def name(self) -> str:
        """How people name the base model: the hub id, else the folder's name."""
        if self.hub_id is not None:
            return self.hub_id
        return (self.local_path or self.uri or "").rstrip("/").rsplit("/", 1)[-1]


FileFormat = Literal["jsonl", "json", "parquet", "csv"]


class SourcePlan(Frozen):
    """One dataset of a mixture."""

    hub_id: str | None
    revision: str | None
    local_path: Annotated[
        str | None, Field(description="As written in the spec (relative to the spec file).")
    ]
    file_format: FileFormat | None
    split: str
    weight: Annotated[float, Field(description="Uses of each row per epoch (seeded fraction).")]

    @property
    def name(self) -> str:
        return self.local_path or f"{self.hub_id} ({self.split})"


class DataPlan(Frozen):
    hub_id: str | None
    revision: str | None
    local_path: str | None
    file_format: FileFormat | None
    sources: Annotated[
        list[SourcePlan],
        Field(description="A mixture of datasets (data.sources); empty: the one dataset above."),
    ]
    split: str
    eval_split: str | None
    eval_fraction: float
    format: Literal["text", "instruction", "chat", "sharegpt"]
    text_field: str
    prompt_field: str
    input_field: str | None
    response_field: str
    template: Literal["alpaca", "llama2", "chatml"]
    messages_field: Annotated[str, Field(description="The conversation's field (chat formats).")]
    roles: Annotated[
        dict[str, str],
        Field(description="'sharegpt': a turn's 'from' value -> chat role; {} otherwise."),
    ]
    chat_template: Annotated[
        str | None,
        Field(description="data.chat_template: used instead of the tokenizer's template."),
    ]
    chat_template_file: Annotated[
        str | None,
        Field(description="data.chat_template_file (as written): read by the run, hashed."),
    ]
    loss: Literal["all", "completion"]
    max_length: int
    packing: bool
    uri: Annotated[
        str | None,
        Field(exclude_if=_unset, description="An object-store file, downloaded at start."),
    ] = None
    sha256: Annotated[
        str | None, Field(exclude_if=_unset, description="The sha256 the data file must have.")
    ] = None
    config: Annotated[
        str | None, Field(exclude_if=_unset, description="The hub dataset's configuration.")
    ] = None
    data_files: Annotated[
        list[str] | None,
        Field(exclude_if=_unset, description="The hub dataset's files to read."),
    ] = None

    @property
    def has_eval(self) -> bool:
        return self.eval_split is not None or self.eval_fraction > 0

    def fields_read(self) -> list[str]:
        """`key = field` of each row field data.format reads (what `qlc explain` shows)."""
        keys: list[tuple[str, str | None]] = [("messages_field", self.messages_field)]
        if self.format == "text":
            keys = [("text_field", self.text_field)]
        elif self.format == "instruction":
            keys = [("prompt_field", self.prompt_field), ("input_field", self.input_field),
                    ("response_field", self.response_field)]  # fmt: skip
        return [f"{key} = {name}" for key, name in keys if name is not None]

    @property
    def conversational(self) -> bool:
        """Rows are conversations rendered by a chat template."""
        return self.format in ("chat", "sharegpt")

    def local_files(self) -> list[LocalFile]:
        """Every local data file: what the launch path finds, mounts and hands the trainer,
        what `qlc validate --inputs` reads, and what an exported job cannot read."""
        if self.local_path is not None:
            return [LocalFile("data.path", self.local_path, self.file_format or "jsonl")]
        return [LocalFile(source_key(i), s.local_path, s.file_format or "jsonl")
                for i, s in enumerate(self.sources) if s.local_path is not None]  # fmt: skip

    def local_inputs(self) -> list[LocalFile]:
        """Every local file the run reads: the data files and a chat template file."""
        template = self.chat_template_file
        extra = [] if template is None else [LocalFile(TEMPLATE_KEY, template, "jinja")]
        return [*self.local_files(), *extra]


class LocalFile(NamedTuple):
    key: str  # the spec key that names it
    path: str  # as written (relative to the spec file)
    file_format: str


TEMPLATE_KEY = "data.chat_template_file"


def source_key(index: int) -> str:
    """The spec key of a mixture's local file (messages, the launch path's QLC_INPUT_PATHS)."""
    return f"data.sources[{index}].path"


class QuantizationPlan(Frozen):
    load_in_4bit: bool
    quant_type: Literal["nf4", "fp4"]
    compute_dtype: Dtype
    double_quant: bool
    storage_dtype: Literal["uint8", "float16", "bfloat16", "float32"]


class LoraPlan(Frozen):
    r: int
    alpha: float
    scale: Annotated[float, Field(description="alpha / r: what the adapter's output is scaled by.")]
    dropout: float
    bias: Literal["none", "all", "lora_only"]
    target_modules: list[str] | Literal["all-linear"]
    modules_to_save: list[str]


# ---------------------------------------------------------------------------------------------
# How it trains.
class OptimizerPlan(Frozen):
    name: Annotated[str, Field(description="The optimizer that runs (transformers' optim name).")]
    update: Literal["adamw", "sgd", "adafactor"]
    state_bits: Annotated[
        Literal[0, 8, 32], Field(description="Precision of the optimizer states (0: none).")
    ]
    paged: Annotated[bool, Field(description="States in paged (host-evictable) memory.")]
    learning_rate: float
    weight_decay: float
    max_grad_norm: Annotated[float | None, Field(description="Clipping norm; null: no clipping.")]


class Schedule(Frozen):
    """The optimizer steps: how many, of how many examples, at which learning rate."""

    max_steps: int | None
    epochs: float | None
    batch_size: Annotated[int, Field(description="Examples per process per micro-batch.")]
    grad_accum: Annotated[int, Field(description="Micro-batches per process per step.")]
    world_size: Annotated[int, Field(description="Training processes the plan was sized for.")]
    examples_per_step: Annotated[int, Field(description="batch_size x grad_accum x world_size.")]
    keep_examples_per_step: Annotated[
        bool,
        Field(
            description="train.examples_per_step was set: another world size derives grad_accum "
            "from it; otherwise grad_accum stays and examples per step scale with the world."
        ),
    ]
    lr_scheduler: str
    warmup_steps: int | None
    warmup_ratio: float
    group_by_length: bool
    logging_steps: int
    eval_steps: int | None
    save_steps: int | None
    save_total_limit: int

    def for_world(self, world_size: int) -> Schedule:
        """This schedule for `world_size` processes (the one rule for every launch).
        ValueError names the fix when the spec's examples_per_step cannot be kept."""
        world = max(world_size, 1)
        if world == self.world_size:
            return self
        if not self.keep_examples_per_step:
            per_step = self.batch_size * self.grad_accum * world
            return self.model_copy(update={"world_size": world, "examples_per_step": per_step})
        per_pass = self.batch_size * world
        if self.examples_per_step % per_pass:
            raise ValueError(
                f"train.examples_per_step = {self.examples_per_step} is not a multiple of "
                f"batch_size x processes = {self.batch_size} x {world}: change "
                "train.batch_size or the number of processes"
            )
        accum = self.examples_per_step // per_pass
        return self.model_copy(update={"world_size": world, "grad_accum": accum})

    def steps_per_epoch(self, examples: int) -> int:
        """Optimizer steps in one epoch over `examples`, counted as transformers' Trainer does
        (micro-batches of the whole world; a last partial step counts)."""
        per_pass = self.batch_size * self.world_size
        batches = math.ceil(examples / per_pass)
        return max(math.ceil(batches / self.grad_accum), 1)

    def total_steps(self, examples: int) -> int:
        if self.max_steps is not None:
            return self.max_steps
        return math.ceil((self.epochs or 1.0) * self.steps_per_epoch(examples))

    def warmup_for(self, total_steps: int) -> int:
        """Warmup in steps: as written, or ceil(warmup_ratio x total steps)."""
        if self.warmup_steps is not None:
            return self.warmup_steps
        return math.ceil(total_steps * self.warmup_ratio)


class Precision(Frozen):
    """The dtype of each part of the computation."""

    base_matmul: Annotated[
        Dtype,
        Field(description="Frozen base matmuls: dequantized weights and their inputs."),
    ]
    adapter_weights: Annotated[
        Literal["float32"], Field(description="LoRA weights as the optimizer keeps them.")
    ]
    adapter_compute: Annotated[
        Dtype, Field(description="LoRA matmuls (train.mixed_precision; 'no': float32).")
    ]
    activations: Annotated[
        Dtype, Field(description="Residual stream and norms between the matmuls.")
    ]
    logits: Annotated[Literal["float32"], Field(description="Logits and the cross-entropy.")]
    loss_scaling: Annotated[
        bool, Field(description="Dynamic loss scaling (float16 adapter compute, as fp16 AMP).")
    ]


EngineName = Literal["reference", "fast"]
BaseWeights = Literal["4bit", "dequantized", "streamed"]
Recompute = Literal["none", "every-layer", "when-short"]


class EnginePlan(Frozen):
    """One complete way to train the plan: what runs and at which precision."""

    name: EngineName
    memory: Literal["standard", "compact", "lean"]
    path: Annotated[str, Field(description="What executes the steps.")]
    batches: Literal["padded", "padding-free"]
    base_weights: Annotated[
        BaseWeights,
        Field(
            description="'4bit': packed, dequantized per matmul; 'dequantized': one copy in "
            "the base matmul dtype; 'streamed': packed in host memory, one layer on the GPU."
        ),
    ]
    recompute: Annotated[
        Recompute,
        Field(
            description="Activation recomputation: 'when-short' decides at start from the free "
            "GPU memory (recorded)."
        ),
    ]
    attention: Annotated[str, Field(description="Attention implementation.")]
    loss: Literal["full", "chunked"]
    precision: Precision
    optimizer: OptimizerPlan
    distributed: Annotated[
        Literal["ddp", "fsdp"],
        Field(description="How several processes share the work (one process: neither)."),
    ]

    def sharded(self, world_size: int) -> bool:
        """FSDP shards the model when more than one process trains (any number of nodes)."""
        return self.distributed == "fsdp" and world_size > 1


class TrainPlan(Frozen):
    schedule: Schedule
    engine: EnginePlan
    eval_metric: str = EVAL_LOSS_DEFINITION


class RuntimePlan(Frozen):
    gpus: int
    distributed: Literal["ddp", "fsdp"]
    shm_size: str
    env: dict[str, str]
    secrets: list[str]
    needs_hub: Annotated[bool, Field(description="A model, tokenizer or dataset from the hub.")]


class WandbPlan(Frozen):
    mode: Literal["online", "offline"]
    project: str
    entity: str | None
    name: Annotated[str | None, Field(description="Run name; null: the run id.")]
    api_key_env: Annotated[
        str | None, Field(description="Secret holding the API key (online runs only).")
    ]


class MlflowPlan(Frozen):
    uri: str
    experiment: Annotated[str, Field(description="track.mlflow.experiment, else job.name.")]
    token_env: Annotated[str | None, Field(description="Secret holding a bearer token.")]


class TrackPlan(Frozen):
    """Where the run's metrics go besides metrics.jsonl (rank 0 logs them)."""

    tensorboard: Annotated[bool, Field(description="Event files in <run dir>/tensorboard/.")]
    wandb: WandbPlan | None
    mlflow: MlflowPlan | None

    def clients(self) -> list[str]:
        """The trackers with a client package ("wandb", "mlflow"), in the stack's lock."""
        return [name for name in ("wandb", "mlflow") if getattr(self, name) is not None]

    @property
    def needs_network(self) -> bool:
        """A tracker that talks to a server while the run goes."""
        online = self.wandb is not None and self.wandb.mode == "online"
        return online or self.mlflow is not None

    def summary(self) -> list[str]:
        """One line per tracker, as `qlc explain` shows them."""
        lines = ["tensorboard: <run dir>/tensorboard"] if self.tensorboard else []
        if self.wandb is not None:
            where = "/".join(filter(None, [self.wandb.entity, self.wandb.project]))
            lines.append(f"wandb {self.wandb.mode}: {where}")
        if self.mlflow is not None:
            lines.append(f"mlflow: {self.mlflow.uri} experiment {self.mlflow.experiment}")
        return lines


class Substitution(Frozen):
    """A value that trains other than the spec wrote it, because the spec asked for that."""

    key: Annotated[str, Field(description="The spec key.")]
    written: JsonValue
    effective: JsonValue
    why: str


class SettingRow(Frozen):
    """One line of the settings table: train.py's literals, explain, settings.txt."""

    name: str
    value: JsonValue
    source: Annotated[str, Field(description="The spec key(s) it came from, or how it is derived.")]


class Plan(Frozen):
    version: Literal[2] = 2
    qlc_version: str
    spec_name: Annotated[str, Field(description="Spec file name as given to the compiler.")]
    spec_sha256: Annotated[str, Field(description="sha256 of the spec file's bytes.")]
    job: JobPlan
    model: ModelPlan
    data: DataPlan
    quantization: QuantizationPlan
    lora: LoraPlan
    train: TrainPlan
    runtime: RuntimePlan
    track: TrackPlan
    substitutions: list[Substitution]
    base_image: BaseImage
    stack: Stack
    gpu_archs: Annotated[list[str], Field(description="Compute capabilities targeted.")]
    min_driver: Annotated[str, Field(description="Lowest NVIDIA driver for the CUDA target.")]
    lock: LockRef | None

    @property
    def engine(self) -> EnginePlan:
        return self.train.engine

    @property
    def object_stores(self) -> list[str]:
        """The object-store schemes the plan's inputs are read from ("s3://", ...)."""
        return read_schemes(self.model, self.data)

    @property
    def needs_network(self) -> bool:
        """A run reaches the hub, an object store or a tracker's server."""
        return self.runtime.needs_hub or bool(self.object_stores) or self.track.needs_network

    @property
    def schedule(self) -> Schedule:
        return self.train.schedule

    def settings(self) -> list[SettingRow]:
        """The resolved settings, one row each with the spec key it came from: what the
        generated train.py opens with, what `qlc explain` prints first and what a run writes
        into settings.txt."""
        e, s, q, lo, d = self.engine, self.schedule, self.quantization, self.lora, self.data
        p, o = e.precision, e.optimizer
        rows: list[tuple[str, Any, str]] = [
            ("engine", e.name, "train.engine"),
            ("memory", e.memory, "train.memory"),
            ("path", e.path, "train.engine, train.memory"),
            ("batches", e.batches, "train.engine"),
            ("base_weights", e.base_weights, "train.engine, train.memory, runtime.gpus"),
            ("recompute", e.recompute, "train.gradient_checkpointing, train.memory"),
            ("attention", e.attention, "train.engine"),
            ("loss", e.loss, "train.memory"),
            ("distributed", e.distributed, "runtime.distributed (with several processes)"),
            ("base_matmul_dtype", p.base_matmul, "quantization.compute_dtype"),
            ("adapter_weights_dtype", p.adapter_weights, "peft (LoRA weights in float32)"),
            ("adapter_compute_dtype", p.adapter_compute, "train.mixed_precision"),
            ("activations_dtype", p.activations, "train.engine, quantization.compute_dtype"),
            ("logits_dtype", p.logits, "the loss in float32"),
            ("load_in_4bit", q.load_in_4bit, "quantization.load_in_4bit"),
            ("quant_type", q.quant_type, "quantization.quant_type"),
            ("double_quant", q.double_quant, "quantization.double_quant"),
            ("storage_dtype", q.storage_dtype, "quantization.storage_dtype"),
            ("lora_r", lo.r, "lora.r"),
            ("lora_alpha", lo.alpha, "lora.alpha"),
            ("lora_scale", lo.scale, "lora.alpha / lora.r"),
            ("lora_dropout", lo.dropout, "lora.dropout"),
            ("lora_bias", lo.bias, "lora.bias"),
            ("lora_targets", lo.target_modules, "lora.target_modules"),
            ("optimizer", o.name, "train.optimizer, train.memory"),
            ("optimizer_state_bits", o.state_bits, "train.optimizer, train.memory"),
            ("optimizer_paged", o.paged, "train.optimizer"),
            ("learning_rate", o.learning_rate, "train.learning_rate"),
            ("weight_decay", o.weight_decay, "train.weight_decay"),
            ("max_grad_norm", o.max_grad_norm, "train.max_grad_norm (0: none)"),
            ("lr_scheduler", s.lr_scheduler, "train.lr_scheduler"),
            ("warmup", _warmup_text(s), "train.warmup_steps / train.warmup_ratio"),
            ("steps", _steps_text(s), "train.max_steps / train.epochs"),
            ("batch_size", s.batch_size, "train.batch_size"),
            ("grad_accum", s.grad_accum, "train.grad_accum / train.examples_per_step"),
            ("world_size", s.world_size, "runtime.gpus (1 process on CPU)"),
            ("examples_per_step", s.examples_per_step, "batch_size x grad_accum x world_size"),
            ("group_by_length", s.group_by_length, "train.group_by_length"),
            ("data_format", d.format, "data.format"),
            ("data_source_weights", _weights(d), "data.sources[*].weight"),
            ("chat_template", _template_text(d), "data.chat_template(_file), else the tokenizer's"),
            ("loss_on", d.loss, "data.loss"),
            ("max_length", d.max_length, "data.max_length"),
            ("packing", d.packing, "data.packing"),
            ("eval_metric", _eval_text(d), "data.eval_split / data.eval_fraction"),
            ("seed", self.job.seed, "job.seed"),
            ("deterministic", self.job.deterministic, "job.deterministic"),
            ("trackers", self.track.summary(), "track.tensorboard, track.wandb, track.mlflow"),
        ]
        return [SettingRow(name=n, value=v, source=src) for n, v, src in rows]

    def for_smoke(self) -> Plan:
        """The smoke variant (`qlc run --smoke`, QLC_SMOKE=1): a tiny random-weight model of
        the same architecture, trained on CPU for a few single micro-batch steps of the same
        data, in float32. A pure function of the plan, so a smoke run's record says exactly
        what it trained."""
        schedule = self.schedule.model_copy(
            update={
                "max_steps": min(self.schedule.max_steps or SMOKE_MAX_STEPS, SMOKE_MAX_STEPS),
                "epochs": None,
                "logging_steps": 1,
                "batch_size": min(self.schedule.batch_size, 4),
                "grad_accum": 1,
                "world_size": 1,
                "examples_per_step": min(self.schedule.batch_size, 4),
                "keep_examples_per_step": False,
                "save_steps": _at_most(self.schedule.save_steps, SMOKE_MAX_STEPS),
                "eval_steps": _at_most(self.schedule.eval_steps, SMOKE_MAX_STEPS),
            }
        )
        fp32 = Precision(
            base_matmul="float32",
            adapter_weights="float32",
            adapter_compute="float32",
            activations="float32",
            logits="float32",
            loss_scaling=False,
        )
        engine = self.engine.model_copy(
            update={
                "precision": fp32,
                "base_weights": "4bit" if self.engine.base_weights == "streamed" else
                self.engine.base_weights,
                "recompute": "none" if self.engine.recompute == "when-short" else
                self.engine.recompute,
            }
        )  # fmt: skip
        if engine.optimizer.paged:  # bitsandbytes pages CUDA memory only
            engine = engine.model_copy(
                update={"optimizer": engine.optimizer.model_copy(update={"paged": False})}
            )
        return self.model_copy(
            update={
                "train": self.train.model_copy(update={"schedule": schedule, "engine": engine}),
                "quantization": self.quantization.model_copy(
                    update={"compute_dtype": "float32", "storage_dtype": "uint8"}
                ),
                "model": self.model.model_copy(update={"tokenizer": None}),
                "data": self.data.model_copy(
                    update={"max_length": min(self.data.max_length, SMOKE_MAX_LENGTH)}
                ),
                "runtime": self.runtime.model_copy(update={"gpus": 0, "distributed": "ddp"}),
                # a smoke check logs to no account or server (its event files stay local)
                "track": self.track.model_copy(update={"wandb": None, "mlflow": None}),
            }
        )


def read_schemes(model: ModelPlan, data: DataPlan) -> list[str]:
    """The object-store schemes ("s3://", ...) a plan's model and data are read from."""
    uris = [uri for uri in (model.uri, data.uri) if uri is not None]
    return sorted({s for s in OBJECT_STORE_SCHEMES for uri in uris if uri.startswith(s)})


def _weights(data: DataPlan) -> list[float] | None:
    return [source.weight for source in data.sources] or None


def _template_text(data: DataPlan) -> str | None:
    if not data.conversational:
        return None
    if data.chat_template_file is not None:
        return "data.chat_template_file (its sha256 in the manifest's inputs)"
    if data.chat_template is None:
        return "the tokenizer's"
    digest = sha256_bytes(data.chat_template.encode())
    return f"data.chat_template (sha256 {digest[:12]})"


def _eval_text(data: DataPlan) -> str | None:
    return "token-weighted cross-entropy" if data.has_eval else None


def _at_most(value: int | None, limit: int) -> int | None:
    return None if value is None else min(value, limit)


def _warmup_text(schedule: Schedule) -> str:
    if schedule.warmup_steps is not None:
        return f"{schedule.warmup_steps} steps"
    return f"ceil({schedule.warmup_ratio:g} x steps)"


def _steps_text(schedule: Schedule) -> str:
    if schedule.max_steps is not None:
        return f"{schedule.max_steps} steps"
    return f"{schedule.epochs:g} epoch(s)"
