"""The spec language: what a user writes in a qlc TOML file, as strict pydantic models.

Every model forbids unknown keys, is frozen, and describes each field; the descriptions feed
`qlc schema`, `qlc explain` and the generated spec reference. Rules that involve several
fields live in validators whose messages say how to fix the problem.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from qlc.contract import DATA_FILE_FORMATS, OBJECT_STORE_SCHEMES, data_file_format, reserved_env
from qlc.userio import clip

HUB_ID = r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$"
ENV_NAME = r"^[A-Z_][A-Z0-9_]*$"
JOB_NAME = r"^[a-z0-9][a-z0-9._-]{0,62}$"
REVISION = r"^[A-Za-z0-9._/-]{1,128}$"
URI_SCHEMES = OBJECT_STORE_SCHEMES
SHA256 = r"^[0-9a-f]{64}$"
CONFIG_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"
OBJECT_URI = r"^(s3|gs|az)://[a-z0-9][a-z0-9._-]{1,62}(/[^\x00-\x1f\x7f]*)?$"
Architecture = Literal["llama", "llama3", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3"]
ChatRole = Literal["system", "user", "assistant"]
# data.format -> the data.* keys it reads (the others do not apply to it).
FORMAT_KEYS: dict[str, tuple[str, ...]] = {
    "text": ("text_field",),
    "instruction": ("prompt_field", "input_field", "response_field", "template"),
    "chat": ("messages_field", "chat_template", "chat_template_file"),
    "sharegpt": ("messages_field", "roles", "chat_template", "chat_template_file"),
}


class Section(BaseModel):
    # No NaN or infinity anywhere: no spec float means anything at either.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class RuleError(ValueError):
    """A broken cross-field rule, naming the key (relative to the model) it belongs to."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


def _module_names(value: object) -> object:
    if value == "all-linear":
        return value
    if isinstance(value, str):
        raise RuleError(
            "", f'must be "all-linear" or a list of module names (got {clip(repr(value))})'
        )
    if not isinstance(value, list):
        raise RuleError("", 'must be "all-linear" or a list of module names')
    if not value:
        raise RuleError("", 'list at least one module, or use "all-linear"')
    for item in value:
        if not isinstance(item, str) or not re.fullmatch(r"[A-Za-z0-9_.]{1,128}", item):
            raise RuleError(
                "", f"{clip(repr(item))} is not a module name (letters, digits, '_', '.')"
            )
    if len(set(value)) != len(value):
        raise RuleError("", "lists a module twice")
    return value


def _relative_path(value: str) -> str:
    """A path relative to the spec file that stays inside its project."""
    if "\x00" in value:
        raise ValueError("must not contain a NUL byte")
    if value.startswith("/") or re.match(r"^[A-Za-z]:[\\/]", value):
        raise ValueError(f"must be a relative path inside the project (got absolute {value!r})")
    if ".." in re.split(r"[\\/]", value):
        raise ValueError(f"must stay inside the project: '..' is refused (got {value!r})")
    return value


def _no_nul(value: str) -> str:
    """NUL ends a C string: Arrow column names and process environments cannot hold one."""
    if "\x00" in value:
        raise ValueError("must not contain a NUL byte")
    return value


def _input_path(value: str) -> str:
    if "\x00" in value or not value.strip():
        raise ValueError("must be a non-empty path without NUL bytes")
    if value.startswith(URI_SCHEMES) and not re.fullmatch(OBJECT_URI, value):
        raise ValueError(
            f"{clip(repr(value))} is not an object-store URI: write SCHEME://BUCKET/KEY "
            "(s3://, gs:// or az://, a lowercase bucket or container name, no control characters)"
        )
    return value


def _pinned_files(value: dict[str, str] | None) -> dict[str, str] | None:
    for name, digest in (value or {}).items():
        parts = name.split("/")
        if not name or name.startswith("/") or "" in parts or ".." in parts or "\x00" in name:
            raise RuleError("", f"{clip(repr(name))} is not a file inside the model folder")
        if not re.fullmatch(SHA256, digest):
            raise RuleError("", f"{name}: {clip(repr(digest))} is not a sha256 (64 hex digits)")
    return value


class Job(Section):
    name: Annotated[
        str,
        Field(
            pattern=JOB_NAME,
            description="Job name: lowercase letters, digits, '.', '_' or '-'; names the image.",
        ),
    ]
    seed: Annotated[int, Field(ge=0, lt=2**32, description="Seed for every random generator.")] = 42
    output_dir: Annotated[
        str,
        Field(
            min_length=1,
            max_length=4096,
            description="Where runs are written: a path relative to the spec file's "
            "directory ('..' is refused), or an object-store URI (s3://, gs://, az://) "
            "for batch services. Runs land in <output_dir>/<job.name>/<run id>/.",
        ),
    ] = "runs"
    deterministic: Annotated[
        bool,
        Field(
            description="Deterministic algorithms: two runs on the same hardware give "
            "bit-identical adapters (slower)."
        ),
    ] = False

    @field_validator("output_dir")
    @classmethod
    def _output_dir(cls, value: str) -> str:
        if value.startswith(URI_SCHEMES):
            return value
        return _relative_path(value)


class Model(Section):
    id: Annotated[
        str | None,
        Field(pattern=HUB_ID, description="Hugging Face hub id, e.g. 'org/name'."),
    ] = None
    path: Annotated[
        str | None,
        Field(
            max_length=4096,
            description="Local model directory (relative to the spec file or absolute; "
            "mounted read-only), or an object-store folder (s3://, gs://, az://) downloaded "
            "into the run directory at start with the job's own credentials.",
        ),
    ] = None
    sha256: Annotated[
        dict[str, str] | None,
        Field(
            description="{file: sha256} of every file of the model folder at 'path', checked "
            "before the model loads (recommended for object stores: it pins what trains).",
        ),
    ] = None
    revision: Annotated[
        str | None,
        Field(
            pattern=REVISION,
            description="Hub revision to pin (commit sha, tag or branch); only with 'id'.",
        ),
    ] = None
    tokenizer: Annotated[
        str | None,
        Field(max_length=4096, description="Tokenizer hub id or local path, if not the model's."),
    ] = None
    trust_remote_code: Annotated[
        bool, Field(description="Run Python code shipped with the model (off: never).")
    ] = False
    architecture: Annotated[
        Architecture,
        Field(
            description="Architecture family, as the model's config.json says (model_type): "
            "'llama' (Llama 2), 'llama3' (Llama 3.x, with its rope scaling), 'mistral', "
            "'qwen2' (Qwen 2 / 2.5), 'qwen3', 'gemma2', 'gemma3' (text), 'phi3'. The smoke "
            "mode builds a tiny model of it; the fast engine's path follows from it."
        ),
    ] = "llama"

    @field_validator("path", "tokenizer")
    @classmethod
    def _paths(cls, value: str | None) -> str | None:
        return None if value is None else _input_path(value)

    @field_validator("sha256")
    @classmethod
    def _sha256(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        return _pinned_files(value)

    @model_validator(mode="after")
    def _one_source(self) -> Model:
        if (self.id is None) == (self.path is None):
            raise RuleError("id", "set exactly one of 'id' (hub) or 'path' (local directory)")
        if self.revision is not None and self.id is None:
            raise RuleError("revision", "'revision' pins a hub model: use it with 'id', not 'path'")
        if self.sha256 is not None and self.path is None:
            raise RuleError("sha256", "'sha256' pins the files at 'path': a hub model is pinned "
                            "by 'revision'")  # fmt: skip
        if self.tokenizer is not None and self.tokenizer.startswith(URI_SCHEMES):
            raise RuleError("tokenizer", "a tokenizer is a hub id or a local folder: put the "
                            "tokenizer files in the model folder instead")  # fmt: skip
        return self


def _data_path(value: str | None) -> str | None:
    if value is None:
        return None
    _input_path(value)
    if data_file_format(value) is None:
        raise ValueError(
            f"unsupported data file {value!r}: use one of {', '.join(DATA_FILE_FORMATS)}"
        )
    return value


class Source(Section):
    """One dataset of a mixture (data.sources)."""

    id: Annotated[str | None, Field(pattern=HUB_ID, description="Hub dataset id.")] = None
    path: Annotated[
        str | None,
        Field(
            max_length=4096,
            description="Local data file (.jsonl, .json, .parquet, .csv), relative to the spec "
            "file or absolute; mounted read-only.",
        ),
    ] = None
    revision: Annotated[
        str | None, Field(pattern=REVISION, description="Hub dataset revision to pin.")
    ] = None
    split: Annotated[
        str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$", description="Hub split to read.")
    ] = "train"
    weight: Annotated[
        float,
        Field(
            gt=0,
            le=1000,
            description="How often each of its rows is used per epoch: 1 every row once, 2 "
            "every row twice, 0.5 a seeded half of them.",
        ),
    ] = 1.0

    @field_validator("path")
    @classmethod
    def _path(cls, value: str | None) -> str | None:
        return _data_path(value)

    @model_validator(mode="after")
    def _rules(self) -> Source:
        if (self.id is None) == (self.path is None):
            raise RuleError("id", "set exactly one of 'id' (hub dataset) or 'path' (local file)")
        if self.revision is not None and self.id is None:
            raise RuleError("revision", "'revision' pins a hub dataset: use it with 'id'")
        if self.path is not None and "split" in self.model_fields_set:
            raise RuleError("split", "'split' names a hub dataset split; a local file is one")
        if self.path is not None and self.path.startswith(URI_SCHEMES):
            raise RuleError("path", "a source of data.sources is a local file or a hub dataset; "
                            "an object-store file is read as data.path alone")  # fmt: skip
        return self

    @property
    def file_format(self) -> str | None:
        return None if self.path is None else data_file_format(self.path)


class Data(Section):
    id: Annotated[str | None, Field(pattern=HUB_ID, description="Hub dataset id.")] = None
    path: Annotated[
        str | None,
        Field(
            max_length=4096,
            description="Data file (.jsonl, .json, .parquet, .csv): local, relative to the "
            "spec file or absolute (mounted read-only), or an object-store URI (s3://, gs://, "
            "az://) downloaded into the run directory at start.",
        ),
    ] = None
    sha256: Annotated[
        str | None,
        Field(
            pattern=SHA256,
            description="sha256 of the data file at 'path', checked before training "
            "(recommended for object stores).",
        ),
    ] = None
    sources: Annotated[
        list[Source],
        Field(
            max_length=64,
            description="Several datasets mixed into one (instead of 'id' / 'path'): "
            "[[data.sources]] tables, each with 'path' or 'id' and a 'weight'. Rows are mixed "
            "in an order seeded by job.seed; every source has the same format and fields.",
        ),
    ] = []
    revision: Annotated[
        str | None,
        Field(pattern=REVISION, description="Hub dataset revision to pin."),
    ] = None
    config: Annotated[
        str | None,
        Field(
            pattern=CONFIG_NAME,
            description="Hub dataset configuration (subset) name; only with 'id'.",
        ),
    ] = None
    data_files: Annotated[
        list[Annotated[str, Field(min_length=1, max_length=1024)]] | None,
        Field(
            min_length=1,
            description="Files of the hub dataset to read (paths or glob patterns in its "
            "repository); only with 'id'.",
        ),
    ] = None
    split: Annotated[
        str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$", description="Split to train on.")
    ] = "train"
    eval_split: Annotated[
        str | None,
        Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$", description="Split to evaluate on."),
    ] = None
    eval_fraction: Annotated[
        float,
        Field(
            ge=0.0,
            lt=0.5,
            description="Fraction of the training split held out for "
            "evaluation (seeded) when there is no eval split.",
        ),
    ] = 0.0
    format: Annotated[
        Literal["text", "instruction", "chat", "sharegpt"],
        Field(
            description="'text': a field already rendered; 'instruction': prompt/response "
            "fields through a named template (Alpaca, with or without input); 'chat': a "
            "messages list of {role, content} (OpenAI) through the chat template; 'sharegpt': "
            "a list of {from, value} turns, roles mapped by data.roles, then as 'chat'."
        ),
    ]
    text_field: Annotated[
        str, Field(min_length=1, max_length=128, description="Field holding the text ('text').")
    ] = "text"
    prompt_field: Annotated[
        str, Field(min_length=1, max_length=128, description="Instruction field ('instruction').")
    ] = "instruction"
    input_field: Annotated[
        str | None,
        Field(
            min_length=1,
            max_length=128,
            description="Optional extra input field "
            "('instruction'); empty values are left out of the prompt.",
        ),
    ] = None
    response_field: Annotated[
        str, Field(min_length=1, max_length=128, description="Response field ('instruction').")
    ] = "output"
    template: Annotated[
        Literal["alpaca", "llama2", "chatml"],
        Field(description="Named prompt template for the 'instruction' format."),
    ] = "alpaca"
    messages_field: Annotated[
        str | None,
        Field(
            min_length=1,
            max_length=128,
            description="Field holding the conversation ('chat': default 'messages'; "
            "'sharegpt': default 'conversations').",
        ),
    ] = None
    roles: Annotated[
        dict[Annotated[str, Field(min_length=1, max_length=64)], ChatRole],
        Field(
            description="'sharegpt': a turn's 'from' value -> its chat role, added to the "
            "defaults human -> user, gpt -> assistant, system -> system."
        ),
    ] = {}
    chat_template: Annotated[
        str | None,
        Field(
            min_length=1,
            max_length=65536,
            description="A Jinja chat template used instead of the tokenizer's ('chat', "
            "'sharegpt'): rendered by the tokenizer's sandboxed Jinja and saved with the "
            "adapter's tokenizer. A TOML multi-line literal string keeps it as written.",
        ),
    ] = None
    chat_template_file: Annotated[
        str | None,
        Field(
            max_length=4096,
            description="A file holding that Jinja chat template (relative to the spec file or "
            "absolute), instead of 'chat_template': read at run time like a data file, its hash "
            "recorded in the manifest.",
        ),
    ] = None
    loss: Annotated[
        Literal["all", "completion"],
        Field(
            description="'all': loss on every token; 'completion': prompt tokens masked (chat: "
            "the loss is on every assistant turn)."
        ),
    ] = "all"
    max_length: Annotated[
        int,
        Field(
            gt=0, le=1_048_576, description="Longest example in tokens; longer ones are truncated."
        ),
    ] = 1024
    packing: Annotated[
        bool, Field(description="Pack several examples into one sequence (kept separate).")
    ] = False

    @field_validator("text_field", "prompt_field", "input_field", "response_field",
                     "messages_field", "chat_template")  # fmt: skip
    @classmethod
    def _field_names(cls, value: str | None) -> str | None:
        return None if value is None else _no_nul(value)

    @field_validator("data_files")
    @classmethod
    def _data_files(cls, value: list[str] | None) -> list[str] | None:
        for name in value or []:
            if "\x00" in name or name.startswith("/") or ".." in name.split("/"):
                raise ValueError(f"{clip(repr(name))} is not a path inside the dataset")
        return value

    @field_validator("path")
    @classmethod
    def _path(cls, value: str | None) -> str | None:
        return _data_path(value)

    @field_validator("chat_template_file")
    @classmethod
    def _template_file(cls, value: str | None) -> str | None:
        return None if value is None else _input_path(value)

    @field_validator("roles")
    @classmethod
    def _roles(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:
            _no_nul(name)
        return value

    @model_validator(mode="after")
    def _rules(self) -> Data:
        if self.sources:
            self._mixture_rules()
        elif (self.id is None) == (self.path is None):
            raise RuleError(
                "id",
                "set exactly one of 'id' (hub dataset) or 'path' (local file), or several "
                "[[data.sources]]",
            )
        if self.revision is not None and self.id is None:
            raise RuleError(
                "revision", "'revision' pins a hub dataset: use it with 'id', not 'path'"
            )
        for key in ("config", "data_files"):
            if getattr(self, key) is not None and self.id is None:
                raise RuleError(key, f"'{key}' selects part of a hub dataset: use it with 'id'")
        if self.sha256 is not None and self.path is None:
            raise RuleError("sha256", "'sha256' pins the file at 'path': a hub dataset is "
                            "pinned by 'revision'")  # fmt: skip
        if self.eval_split is not None and self.eval_fraction > 0:
            raise RuleError("eval_fraction", "set 'eval_split' or 'eval_fraction', not both")
        if self.chat_template is not None and self.chat_template_file is not None:
            raise RuleError(
                "chat_template_file", "set 'chat_template' (the text) or 'chat_template_file'"
            )
        if self.chat_template_file is not None and self.chat_template_file.startswith(URI_SCHEMES):
            raise RuleError("chat_template_file", "a chat template file is a local file: put its "
                            "text in data.chat_template instead")  # fmt: skip
        if self.loss == "completion" and self.format == "text":
            raise RuleError(
                "loss",
                'loss = "completion" needs a prompt/response boundary: use format '
                '"instruction", "chat" or "sharegpt", or loss = "all" for format "text"',
            )
        return self

    def _mixture_rules(self) -> None:
        if self.id is not None or self.path is not None:
            key = "id" if self.id is not None else "path"
            raise RuleError(key, f"set 'sources' or '{key}', not both: list it as a source")
        for key in ("split", "eval_split"):
            if key in self.model_fields_set:
                raise RuleError(
                    key,
                    f"'{key}' does not apply to data.sources: set each source's split, and "
                    "hold out evaluation rows with data.eval_fraction",
                )

    def inapplicable_keys(self) -> list[str]:
        """Keys this spec sets that its data.format never reads (each one a warning)."""
        reads = FORMAT_KEYS[self.format]
        known = dict.fromkeys(key for keys in FORMAT_KEYS.values() for key in keys)
        return [key for key in known if key not in reads and key in self.model_fields_set]

    @property
    def file_format(self) -> str | None:
        if self.path is None:
            return None
        return data_file_format(self.path)

    @property
    def has_eval(self) -> bool:
        return self.eval_split is not None or self.eval_fraction > 0


class Quantization(Section):
    load_in_4bit: Annotated[bool, Field(description="Load base weights in 4 bits.")] = True
    quant_type: Annotated[Literal["nf4", "fp4"], Field(description="4-bit data type.")] = "nf4"
    compute_dtype: Annotated[
        Literal["float16", "bfloat16", "float32"],
        Field(description="dtype of the matmuls on dequantized weights."),
    ] = "float16"
    double_quant: Annotated[bool, Field(description="Quantize the quantization constants too.")] = (
        False
    )
    storage_dtype: Annotated[
        Literal["uint8", "float16", "bfloat16", "float32"],
        Field(
            description="dtype that packs the 4-bit weights (set to the compute dtype for FSDP)."
        ),
    ] = "uint8"


class Lora(Section):
    r: Annotated[int, Field(gt=0, le=4096, description="LoRA rank.")] = 64
    alpha: Annotated[float, Field(gt=0, le=65536, description="LoRA alpha (scale = alpha/r).")] = 16
    dropout: Annotated[float, Field(ge=0.0, lt=1.0, description="Dropout on the LoRA input.")] = 0.1
    bias: Annotated[
        Literal["none", "all", "lora_only"], Field(description="Which biases train.")
    ] = "none"
    target_modules: Annotated[
        str | list[str],
        BeforeValidator(_module_names),
        WithJsonSchema(
            {
                "anyOf": [
                    {"const": "all-linear"},
                    {
                        "type": "array",
                        "minItems": 1,
                        "items": {"type": "string", "pattern": "^[A-Za-z0-9_.]{1,128}$"},
                    },
                ]
            }
        ),
        Field(description='Module names to adapt, or "all-linear".'),
    ] = ["q_proj", "v_proj"]
    modules_to_save: Annotated[
        list[Annotated[str, Field(pattern=r"^[A-Za-z0-9_.]{1,128}$")]],
        Field(description="Modules trained in full and saved with the adapter."),
    ] = []


Scheduler = Literal[
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"
]
Optimizer = Literal[
    "adamw_torch",
    "adamw_torch_fused",
    "paged_adamw_32bit",
    "paged_adamw_8bit",
    "adamw_8bit",
    "adafactor",
    "sgd",
]


class Train(Section):
    epochs: Annotated[
        float | None, Field(gt=0, le=10_000, description="Passes over the data (default 1).")
    ] = None
    max_steps: Annotated[
        int | None, Field(gt=0, description="Optimizer steps; replaces 'epochs'.")
    ] = None
    batch_size: Annotated[
        int, Field(gt=0, le=65536, description="Examples per device per step.")
    ] = 4
    grad_accum: Annotated[
        int, Field(gt=0, le=65536, description="Micro-batches accumulated per optimizer step.")
    ] = 1
    examples_per_step: Annotated[
        int | None,
        Field(
            gt=0,
            description="Examples per optimizer step across all GPUs. When set, grad_accum is "
            "derived from it (examples_per_step / (batch_size x GPUs)), so scaling out keeps "
            "the one-GPU recipe's mathematics.",
        ),
    ] = None
    learning_rate: Annotated[float, Field(gt=0, lt=1, description="Peak learning rate.")] = 2e-4
    lr_scheduler: Annotated[Scheduler, Field(description="Learning-rate schedule.")] = "cosine"
    warmup_ratio: Annotated[
        float | None, Field(ge=0, lt=1, description="Warmup as a fraction of all steps.")
    ] = None
    warmup_steps: Annotated[int | None, Field(ge=0, description="Warmup in steps.")] = None
    weight_decay: Annotated[float, Field(ge=0, lt=1, description="AdamW weight decay.")] = 0.0
    optimizer: Annotated[Optimizer, Field(description="Optimizer.")] = "paged_adamw_32bit"
    max_grad_norm: Annotated[float, Field(ge=0, description="Gradient clipping norm (0: off).")] = (
        1.0
    )
    group_by_length: Annotated[
        bool, Field(description="Batch examples of similar length together.")
    ] = False
    gradient_checkpointing: Annotated[
        bool, Field(description="Recompute activations in the backward pass to save memory.")
    ] = True
    mixed_precision: Annotated[
        Literal["no", "fp16", "bf16"],
        Field(description="Autocast of the trainable path ('no': as the seed recipe)."),
    ] = "no"
    engine: Annotated[
        Literal["reference", "fast"],
        Field(
            description="'reference': plain transformers/trl; 'fast': padding-free batches "
            "and fused kernels, same mathematics."
        ),
    ] = "reference"
    memory: Annotated[
        Literal["standard", "compact", "lean"],
        Field(
            description="'standard': the fastest setting (the fast engine keeps a 16-bit copy of "
            "the dequantized base); 'compact' (fast engine): the base stays 4-bit on the GPU, "
            "dequantized per matmul, every layer recomputed, the loss in chunks: QLoRA's memory "
            "at the fast engine's batches; 'lean': trade speed for peak memory (8-bit optimizer "
            "states, checkpointing, chunked loss; the fast engine streams the base from host "
            "memory)."
        ),
    ] = "standard"
    logging_steps: Annotated[int, Field(gt=0, description="Log every N optimizer steps.")] = 25
    eval_steps: Annotated[
        int | None, Field(gt=0, description="Evaluate every N steps (needs eval data).")
    ] = None
    save_steps: Annotated[
        int | None, Field(gt=0, description="Checkpoint every N steps for resume.")
    ] = None
    save_total_limit: Annotated[
        int, Field(gt=0, le=1000, description="Checkpoints kept on disk.")
    ] = 2

    @model_validator(mode="after")
    def _rules(self) -> Train:
        if self.epochs is not None and self.max_steps is not None:
            raise RuleError("max_steps", "set 'epochs' or 'max_steps', not both")
        if self.warmup_ratio is not None and self.warmup_steps is not None:
            raise RuleError("warmup_steps", "set 'warmup_ratio' or 'warmup_steps', not both")
        return self

    @property
    def effective_epochs(self) -> float:
        return self.epochs if self.epochs is not None else 1.0


class Runtime(Section):
    gpus: Annotated[int, Field(ge=0, le=64, description="GPUs per node (0: CPU only).")] = 1
    distributed: Annotated[
        Literal["ddp", "fsdp"],
        Field(
            description="With several GPUs: 'ddp' puts the 4-bit model on every GPU; 'fsdp' "
            "shards it (set quantization.storage_dtype to the compute dtype, and an optimizer "
            "that is not bitsandbytes', such as adamw_torch) for models that do not fit one card."
        ),
    ] = "ddp"
    cuda: Annotated[
        str | None, Field(pattern=r"^\d+\.\d+$", description="CUDA major.minor to target.")
    ] = None
    torch: Annotated[
        str | None, Field(pattern=r"^\d+\.\d+(\.\d+)?$", description="torch version to target.")
    ] = None
    python: Annotated[
        str | None, Field(pattern=r"^3\.\d+$", description="Python major.minor in the image.")
    ] = None
    gpu_archs: Annotated[
        list[Annotated[str, Field(pattern=r"^\d+\.\d+$")]] | None,
        Field(description='Compute capabilities to support, e.g. ["8.0", "9.0"].'),
    ] = None
    shm_size: Annotated[
        str, Field(pattern=r"^\d+[kmgKMG]?$", description="Shared memory for the container.")
    ] = "16g"
    env: Annotated[
        dict[Annotated[str, Field(pattern=ENV_NAME)], Annotated[str, Field(max_length=4096)]],
        Field(description="Plain environment variables (never secrets)."),
    ] = {}
    secrets: Annotated[
        list[Annotated[str, Field(pattern=ENV_NAME)]],
        Field(description="Names of environment variables passed through at run time only."),
    ] = []

    @field_validator("env")
    @classmethod
    def _env_values(cls, value: dict[str, str]) -> dict[str, str]:
        for name, text in value.items():
            reserved = reserved_env(name)
            if reserved is not None:
                raise RuleError(name, f"a spec may not set {name}: {reserved}")
            if "\x00" in text:
                raise RuleError(name, "must not contain a NUL byte")
        return value

    @model_validator(mode="after")
    def _rules(self) -> Runtime:
        clash = sorted(set(self.env) & set(self.secrets))
        if clash:
            raise RuleError(
                "secrets",
                f"{', '.join(clash)} is both in 'env' and 'secrets': keep it in "
                "'secrets' and out of the spec",
            )
        return self


TRACK_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"


class Wandb(Section):
    mode: Annotated[
        Literal["online", "offline"],
        Field(
            description="'online': logs to Weights & Biases as the run goes (the container "
            "gets a network); 'offline': files in the run directory, uploaded later with "
            "`wandb sync`."
        ),
    ]
    project: Annotated[str, Field(pattern=TRACK_NAME, description="W&B project.")]
    entity: Annotated[
        str | None,
        Field(pattern=TRACK_NAME, description="W&B entity (user or team); default: yours."),
    ] = None
    name: Annotated[
        str | None,
        Field(pattern=TRACK_NAME, description="Run name shown in W&B; default: the run id."),
    ] = None
    api_key: Annotated[
        str,
        Field(
            pattern=ENV_NAME,
            description="Name of the environment variable holding the API key (a secret "
            "passed at run time, online only; never the key itself).",
        ),
    ] = "WANDB_API_KEY"


class Mlflow(Section):
    uri: Annotated[
        str,
        Field(
            max_length=2048,
            description="Tracking server URI (http:// or https://, no credentials in it).",
        ),
    ]
    experiment: Annotated[
        str | None,
        Field(min_length=1, max_length=256, description="Experiment name; default: job.name."),
    ] = None
    token: Annotated[
        str | None,
        Field(
            pattern=ENV_NAME,
            description="Name of the environment variable holding a bearer token for the "
            "server (a secret passed at run time; never the token itself).",
        ),
    ] = None

    @field_validator("uri")
    @classmethod
    def _uri(cls, value: str) -> str:
        scheme, sep, rest = value.partition("://")
        host = rest.split("/", 1)[0]
        if not sep or scheme not in ("http", "https") or not host:
            raise ValueError(
                f"must be an http:// or https:// URI of a tracking server (got {clip(repr(value))})"
            )
        if "@" in host:
            raise ValueError(
                "holds credentials: keep them out of the spec; put a token in an environment "
                "variable and name it in track.mlflow.token"
            )
        if any(c.isspace() or c in "?#\x00" for c in value):
            raise ValueError("must be a plain server URI (no spaces, query or fragment)")
        return value

    @field_validator("experiment")
    @classmethod
    def _experiment(cls, value: str | None) -> str | None:
        return None if value is None else _no_nul(value)


class Track(Section):
    tensorboard: Annotated[
        bool,
        Field(description="TensorBoard event files in the run directory (tensorboard/)."),
    ] = True
    wandb: Annotated[Wandb | None, Field(description="Weights & Biases.")] = None
    mlflow: Annotated[Mlflow | None, Field(description="An MLflow tracking server.")] = None

    def secret_names(self) -> list[tuple[str, str]]:
        """(spec key, environment variable) of each credential the trackers read at run time."""
        found = []
        if self.wandb is not None and self.wandb.mode == "online":
            found.append(("track.wandb.api_key", self.wandb.api_key))
        if self.mlflow is not None and self.mlflow.token is not None:
            found.append(("track.mlflow.token", self.mlflow.token))
        return found


class Spec(Section):
    """A qlc job spec."""

    job: Annotated[Job, Field(description="The job's identity and outputs.")]
    model: Annotated[Model, Field(description="The base model.")]
    data: Annotated[Data, Field(description="The training data and how to render it.")]
    quantization: Annotated[Quantization, Field(description="bitsandbytes 4-bit loading.")] = (
        Quantization()
    )
    lora: Annotated[Lora, Field(description="LoRA adapters (peft).")] = Lora()
    train: Annotated[Train, Field(description="The training loop.")] = Train()
    runtime: Annotated[Runtime, Field(description="Where and how it runs.")] = Runtime()
    track: Annotated[
        Track, Field(description="Experiment trackers the run logs its metrics to.")
    ] = Track()

    @model_validator(mode="after")
    def _rules(self) -> Spec:
        if self.train.eval_steps is not None and not self.data.has_eval:
            raise RuleError(
                "train.eval_steps",
                "needs evaluation data: set data.eval_split or "
                "data.eval_fraction, or remove train.eval_steps",
            )
        train, gpus = self.train, max(self.runtime.gpus, 1)
        if train.examples_per_step is not None:
            if "grad_accum" in train.model_fields_set:
                raise RuleError(
                    "train.examples_per_step",
                    "set 'examples_per_step' or 'grad_accum', not both: grad_accum is derived",
                )
            per_pass = train.batch_size * gpus
            nearest = max(1, round(train.examples_per_step / per_pass))
            if train.examples_per_step % per_pass:
                raise RuleError(
                    "train.examples_per_step",
                    f"must be a multiple of batch_size x GPUs = {per_pass} (got "
                    f"{train.examples_per_step}); e.g. {per_pass * nearest}",
                )
        fsdp = self.runtime.distributed == "fsdp"
        if (
            fsdp
            and self.quantization.load_in_4bit
            and (self.quantization.storage_dtype != self.quantization.compute_dtype)
        ):
            raise RuleError(
                "quantization.storage_dtype",
                f"FSDP shards 4-bit weights only when they are stored in the compute dtype: set "
                f'storage_dtype = "{self.quantization.compute_dtype}"',
            )
        for key, name in self.track.secret_names():
            if name in self.runtime.env:
                raise RuleError(
                    key, f"{name} is set in runtime.env: a credential is a secret, passed at "
                    "run time; remove it from runtime.env"
                )  # fmt: skip
        if self.quantization.storage_dtype != "uint8" and not self.quantization.load_in_4bit:
            raise RuleError("quantization.storage_dtype", "only applies with load_in_4bit = true")
        return self
