"""qlc init: a first spec, commented, from a data file's first rows and a model.

The data format and its field names are detected from the rows (ShareGPT turns, OpenAI
messages, Alpaca-style instruction fields, plain text); the architecture from a local model's
config.json, or a hub id's name; the runtime from whether this machine has an NVIDIA GPU. Each
key's comment is its description in the spec language (compiler/spec.py). The text is checked
by the compiler before it is written, and an existing file is never replaced.
"""

from __future__ import annotations

import json
import os
import re
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qlc.compiler.context import plan_spec
from qlc.compiler.load import SpecError
from qlc.compiler.spec import (
    HUB_ID,
    Data,
    Job,
    Lora,
    Model,
    Quantization,
    Train,
)
from qlc.contract import DATA_FILE_FORMATS, data_file_format
from qlc.trainer.errors import UserError
from qlc.trainer.rows import Row, head_rows
from qlc.userio import is_dir, output_problem

DETECT_ROWS = 20
DEFAULT_MODEL = "TinyLlama/TinyLlama-1.1B-Chat-v1.0"  # small, a chat template, in shapes.toml
# config.json model_type -> model.architecture (llama: llama3 when its rope scaling says so)
ARCHITECTURE_OF = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3",
                   "gemma2": "gemma2", "gemma3": "gemma3", "gemma3_text": "gemma3",
                   "phi3": "phi3"}  # fmt: skip
# hub id fragments (lowercase, without '-' and '.') -> model.architecture, first match wins
NAME_HINTS = (("llama3", "llama3"), ("qwen3", "qwen3"), ("qwen2", "qwen2"), ("gemma3", "gemma3"),
              ("gemma2", "gemma2"), ("phi3", "phi3"), ("mistral", "mistral"))  # fmt: skip
INSTRUCTION_PAIRS = (("instruction", "output"), ("instruction", "response"),
                     ("prompt", "response"), ("prompt", "completion"), ("question", "answer"),
                     ("query", "response"), ("input", "output"))  # fmt: skip
ROLE_SYNONYMS = {"user": "user", "assistant": "assistant", "bot": "assistant",
                 "model": "assistant", "chatgpt": "assistant"}  # fmt: skip


class InitError(Exception):
    """Something the user must fix for `qlc init` (exit 2)."""


@dataclass(frozen=True)
class Detected:
    """data.* keys found from the rows, and how they were found."""

    format: str
    keys: dict[str, Any]
    how: str
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Written:
    path: Path
    detected: Detected
    commands: list[str]


def init_spec(data: Path | None, model: str | None, output: Path | None) -> Written:
    """Write a spec for `data` and `model` to `output` (default <job name>.toml)."""
    name = job_name(data)
    path = output or Path(f"{name}.toml")
    if os.path.lexists(path):  # False (no exception) for a name the system cannot look up
        raise InitError(f"{path} exists: qlc init never replaces a file; give -o a new name")
    base = path.resolve().parent
    detected = detect(data) if data is not None else no_data()
    text = spec_text(name, data_lines(data, base, detected), model_lines(model, base), gpu())
    try:
        source = text.encode("utf-8")
        plan_spec(source, str(path))
    except UnicodeEncodeError:
        raise InitError("a path given is not UTF-8 text: rename it") from None
    except SpecError as error:  # what the data named (a field name) cannot be a spec value
        raise InitError(f"the detected values do not make a valid spec:\n{error}") from None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "xb") as handle:  # "x": never over an existing file
            handle.write(source)
    except OSError as error:
        raise InitError(output_problem(path, error)) from None
    spec = str(path)
    commands = [f"qlc validate --inputs {spec}", f"qlc data {spec}", f"qlc run {spec} --local"]
    return Written(path, detected, commands)


def job_name(data: Path | None) -> str:
    stem = re.sub(r"[^a-z0-9._-]+", "-", data.stem.lower()).strip("-._") if data else ""
    return (stem or "finetune")[:63]


def detect(data: Path) -> Detected:
    file_format = data_file_format(str(data))
    if file_format is None:
        raise InitError(f"{data}: use a {', '.join(DATA_FILE_FORMATS)} file")
    if not data.is_file():
        raise InitError(f"{data}: no such file")
    try:
        rows = head_rows(str(data), file_format, DETECT_ROWS)
    except UserError as error:
        raise InitError(str(error)) from None
    found = conversation(rows) or instruction(rows) or text(rows)
    if found is None:
        fields = sorted({name for row in rows for name in row})
        raise InitError(
            f"{data}: cannot tell its format from the first rows (fields: "
            f"{', '.join(map(repr, fields))}): qlc reads ShareGPT turns, messages lists, "
            "instruction/output fields or a text field; see docs/spec.md [data]"
        )
    return found


def _lists_of(rows: list[Row], keys: tuple[str, str]) -> str | None:
    """The field whose values are lists of objects with both `keys`, in most rows."""
    for name in dict.fromkeys(n for row in rows for n in row):
        values = [row.get(name) for row in rows]
        good = [v for v in values if isinstance(v, list) and v and
                all(isinstance(t, dict) and set(keys) <= set(t) for t in v)]  # fmt: skip
        if len(good) * 2 > len(rows):
            return name
    return None


def conversation(rows: list[Row]) -> Detected | None:
    name = _lists_of(rows, ("from", "value"))
    if name is not None:
        keys: dict[str, Any] = {} if name == "conversations" else {"messages_field": name}
        speakers = {str(t["from"]) for row in rows for t in row.get(name) or []
                    if isinstance(t, dict)}  # fmt: skip
        roles = {s: ROLE_SYNONYMS[s.lower()] for s in sorted(speakers)
                 if s not in ("human", "gpt", "system") and s.lower() in ROLE_SYNONYMS}  # fmt: skip
        unknown = sorted(speakers - set(roles) - {"human", "gpt", "system"})
        if roles:
            keys["roles"] = roles
        notes = [f"turns from {', '.join(map(repr, unknown))} have no chat role: map them in "
                 "data.roles, or those rows are left out"] if unknown else []  # fmt: skip
        return Detected("sharegpt", {**keys, "loss": "completion"},
                        f"field {name!r} holds ShareGPT {{from, value}} turns", notes)  # fmt: skip
    name = _lists_of(rows, ("role", "content"))
    if name is not None:
        keys = {} if name == "messages" else {"messages_field": name}
        return Detected("chat", {**keys, "loss": "completion"},
                        f"field {name!r} holds {{role, content}} messages")  # fmt: skip
    return None


def _strings(rows: list[Row], name: str) -> bool:
    return sum(isinstance(row.get(name), str) for row in rows) * 2 > len(rows)


def instruction(rows: list[Row]) -> Detected | None:
    for prompt, response in INSTRUCTION_PAIRS:
        if _strings(rows, prompt) and _strings(rows, response):
            keys: dict[str, Any] = {"prompt_field": prompt, "response_field": response}
            extra = "input" if prompt != "input" and any("input" in row for row in rows) else None
            if extra:
                keys["input_field"] = extra
            how = f"fields {prompt!r} and {response!r}" + (" with 'input'" if extra else "")
            return Detected("instruction", {**keys, "loss": "completion"}, how)
    return None


def text(rows: list[Row]) -> Detected | None:
    names = [n for n in dict.fromkeys(n for row in rows for n in row) if _strings(rows, n)]
    if not names:
        return None
    name = "text" if "text" in names else max(names, key=lambda n: _mean_length(rows, n))
    keys: dict[str, Any] = {} if name == "text" else {"text_field": name}
    return Detected("text", keys, f"field {name!r} holds the text")


def _mean_length(rows: list[Row], name: str) -> float:
    return sum(len(str(row.get(name) or "")) for row in rows) / max(len(rows), 1)


def no_data() -> Detected:
    note = "no --data: put one JSON object per line in data.jsonl, each with a 'messages' list"
    return Detected("chat", {"loss": "completion"}, "no data file given", [note])


def data_lines(data: Path | None, base: Path, detected: Detected) -> list[str]:
    where = _relative(data, base) if data is not None else "data.jsonl"
    values: dict[str, Any] = {"path": where, "format": detected.format, **detected.keys}
    values["max_length"] = 1024
    rows = _row_count(data) if data is not None else 0
    if rows >= 50:
        values["eval_fraction"] = 0.1
    return _section("data", Data, values)


def _row_count(data: Path) -> int:
    try:
        from qlc.trainer.rows import read_file

        return len(read_file(str(data), data_file_format(str(data)) or "jsonl"))
    except UserError:
        return 0


def model_lines(model: str | None, base: Path) -> list[str]:
    if model is not None and is_dir(Path(model)):
        config = Path(model) / "config.json"
        return _section("model", Model, {"path": _relative(Path(model), base),
                                         "architecture": local_architecture(config)})  # fmt: skip
    name = model or DEFAULT_MODEL
    if not re.fullmatch(HUB_ID, name):
        raise InitError(f"--model {name}: neither a local model directory nor a hub id (org/name)")
    flat = name.lower().replace("-", "").replace(".", "").replace("_", "")
    architecture = next((arch for hint, arch in NAME_HINTS if hint in flat), "llama")
    lines = ['# pin the model: revision = "<commit sha>" (its hub page lists them)']
    return lines + _section("model", Model, {"id": name, "architecture": architecture})


def local_architecture(config: Path) -> str:
    try:
        document = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise InitError(f"{config}: cannot read the model's config ({error})") from None
    model_type = document.get("model_type") if isinstance(document, dict) else None
    if model_type not in ARCHITECTURE_OF:
        raise InitError(f"{config}: model_type {model_type!r} is not one qlc trains (it knows "
                        f"{', '.join(sorted(ARCHITECTURE_OF))})")  # fmt: skip
    rope = document.get("rope_scaling") or document.get("rope_parameters") or {}
    if model_type == "llama" and isinstance(rope, dict) and rope.get("rope_type") == "llama3":
        return "llama3"
    return ARCHITECTURE_OF[str(model_type)]


def gpu() -> bool:
    """Whether this machine has an NVIDIA GPU the driver shows."""
    gpus = Path("/proc/driver/nvidia/gpus")
    return (gpus.is_dir() and any(gpus.iterdir())) or Path("/dev/nvidia0").exists()


def _relative(path: Path, base: Path) -> str:
    """Relative to the spec's folder when inside it, else absolute."""
    resolved = path.resolve()
    if resolved.is_relative_to(base):
        return resolved.relative_to(base).as_posix()
    return resolved.as_posix()


def _section(name: str, model: Any, values: dict[str, Any]) -> list[str]:
    lines = [f"[{name}]"]
    for key, value in values.items():
        description = model.model_fields[key].description or ""
        lines += textwrap.wrap(description, 98, initial_indent="# ", subsequent_indent="# ")
        lines.append(f"{key} = {_toml(value)}")
    return [*lines, ""]


def _toml(value: Any) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{_toml(k)} = {_toml(v)}" for k, v in value.items()) + " }"
    if isinstance(value, str):  # JSON's escapes are TOML's; TOML also escapes DEL
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    return json.dumps(value)  # numbers and booleans are written alike in TOML


def spec_text(name: str, data: list[str], model: list[str], has_gpu: bool) -> str:
    cpu = not has_gpu
    head = [
        "# A qlc spec written by `qlc init`; docs/spec.md lists every key.",
        *_section("job", Job, {"name": name}),
    ]
    quantization = {"compute_dtype": "float32" if cpu else "bfloat16"}
    lora = {"r": 16, "alpha": 32, "target_modules": "all-linear"}
    train: dict[str, Any] = {"epochs": 1, "batch_size": 4, "learning_rate": 2e-4,
                             "optimizer": "adamw_torch" if cpu else "paged_adamw_32bit",
                             "logging_steps": 10, "save_steps": 100}  # fmt: skip
    if not cpu:
        train["mixed_precision"] = "bf16"
    runtime = [
        "[runtime]",
        "# GPUs per node (0: CPU only); qlc init found " + ("an NVIDIA GPU" if has_gpu else "none"),
        f"gpus = {1 if has_gpu else 0}",
        "",
    ]
    body = [*head, *model, *data, *_section("quantization", Quantization, quantization),
            *_section("lora", Lora, lora), *_section("train", Train, train), *runtime]  # fmt: skip
    return "\n".join(body).rstrip() + "\n"
