"""explain: every effective value of a spec, and whether the spec or a default set it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from qlc.compiler.spec import Spec


@dataclass(frozen=True)
class Setting:
    key: str
    value: Any
    source: str  # "spec" or "default"
    description: str

    @property
    def shown(self) -> str:
        return json.dumps(self.value, ensure_ascii=False)


def explain(spec: Spec) -> list[Setting]:
    """Every leaf setting of the spec in declaration order."""
    return list(_walk(spec, "", True))


def _walk(model: BaseModel, prefix: str, from_spec: bool) -> list[Setting]:
    settings: list[Setting] = []
    for name, field in type(model).model_fields.items():
        value = getattr(model, name)
        key = f"{prefix}{name}"
        explicit = from_spec and name in model.model_fields_set
        if isinstance(value, BaseModel):
            settings.extend(_walk(value, key + ".", explicit))
            continue
        dumped = model.model_dump(mode="json", include={name})[name]
        settings.append(
            Setting(key, dumped, "spec" if explicit else "default", field.description or "")
        )
    return settings


def grad_accum(spec: Spec) -> int:
    """Accumulation steps: explicit, or derived so examples per step stay as the spec says."""
    if spec.train.examples_per_step is None:
        return int(spec.train.grad_accum)
    per_pass = int(spec.train.batch_size) * max(int(spec.runtime.gpus), 1)
    return int(spec.train.examples_per_step) // per_pass


def derived(spec: Spec) -> list[Setting]:
    """Values qlc computes from several settings, shown so nobody has to do the arithmetic."""
    devices = max(spec.runtime.gpus, 1)
    accumulation = grad_accum(spec)
    per_step = spec.train.batch_size * accumulation * devices
    return [
        Setting("derived.devices", devices, "derived", "data-parallel processes (GPUs, or 1 CPU)"),
        Setting(
            "derived.per_device_batch",
            spec.train.batch_size,
            "derived",
            "examples per device per micro-batch",
        ),
        Setting(
            "derived.grad_accum",
            accumulation,
            "derived",
            "micro-batches accumulated per optimizer step (from examples_per_step if set)",
        ),
        Setting(
            "derived.examples_per_optimizer_step",
            per_step,
            "derived",
            "batch_size x grad_accum x devices (data-parallel processes)",
        ),
        Setting("derived.lora_scale", spec.lora.alpha / spec.lora.r, "derived", "alpha / r"),
        Setting(
            "derived.data_file_format",
            spec.data.file_format,
            "derived",
            "from the data file's suffix (null for hub datasets)",
        ),
    ]
