"""explain: every effective value of a spec, whether the spec or a default set it, and the
preflight memory estimate (compiler/memory.py) shown as lines."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from qlc.compiler.memory import Fit, MemoryEstimate
from qlc.compiler.shapes import GIB
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


def memory_lines(result: MemoryEstimate, fit: Fit | None) -> list[str]:
    """The memory estimate as plain lines: each term, the predicted peak, and the fit."""
    lines = [
        f"memory estimate: {result.setting}; {result.shape.name}, "
        f"{result.tokens:,} tokens in the largest micro-batch (batch_size x data.max_length)"
    ]
    width = max(len(t.key) for t in result.terms)
    for term in result.terms:
        where = "" if term.in_pool else " [outside torch's pool]"
        lines.append(f"  {term.key:<{width}}  {_gib(term.bytes):>10}  {term.detail}{where}")
    lines.append(f"  {'predicted peak reserved':<{width}}  {_gib(result.total_bytes):>10}")
    lines.extend(f"  note: {note}" for note in result.notes)
    if fit is None:
        lines.append("  (name a GPU with --gpu to check the fit)")
        return lines
    verdict = (
        f"fits, {_gib(fit.spare)} to spare"
        if fit.fits
        else f'does NOT fit: {_gib(-fit.spare)} short (try train.memory = "lean", a smaller '
        "train.batch_size with train.grad_accum, or a shorter data.max_length)"
    )
    lines.append(
        f"on {fit.gpu.name} ({_gib(fit.gpu.memory_bytes)}): peak {_gib(fit.peak_reserved)} + CUDA "
        f"context {_gib(fit.context)} + headroom {_gib(fit.headroom)} = {_gib(fit.needed)}: "
        f"{verdict}"
    )
    if fit.outside_pool:
        lines.append(
            f"  plus {_gib(fit.outside_pool)} of paged optimizer states, which move to host "
            "memory when the card is full"
        )
    return lines


def memory_json(result: MemoryEstimate, fit: Fit | None) -> dict[str, Any]:
    shown: dict[str, Any] = result.as_dict()
    if fit is not None:
        shown["gpu"] = {
            "name": fit.gpu.name,
            "memory_bytes": fit.gpu.memory_bytes,
            "cuda_context_bytes": fit.context,
            "headroom_bytes": fit.headroom,
            "needed_bytes": fit.needed,
            "fits": fit.fits,
        }
    return shown


def _gib(size: int) -> str:
    """GiB with two decimals; MiB below 0.1 GiB, so a tiny model's terms do not read 0.00."""
    if abs(size) < GIB // 10:
        return f"{size / 2**20:.1f} MiB"
    return f"{size / GIB:.2f} GiB"
