"""explain: what will train (the plan's resolved settings and substitutions), every value of the
spec and whether the spec or a default set it, and the preflight memory estimate
(compiler/memory.py) shown as lines."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from qlc.compiler.memory import Fit, MemoryEstimate
from qlc.compiler.plan import Plan
from qlc.compiler.shapes import GIB, Gpu
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


def settings_lines(plan: Plan) -> list[str]:
    """What will train: every resolved setting with the spec keys it came from, then every
    substitution (a value that differs from what the spec wrote, and why)."""
    rows = plan.settings()
    width = max(len(row.name) for row in rows)
    lines = ["settings (what will train, each from the spec keys named):"]
    lines += [
        f"  {row.name:<{width}}  {json.dumps(row.value, ensure_ascii=False)}  ({row.source})"
        for row in rows
    ]
    if plan.substitutions:
        lines.append("substitutions (the spec asked for them):")
        lines += [
            f"  {s.key}: {json.dumps(s.written)} -> {json.dumps(s.effective)}: {s.why}"
            for s in plan.substitutions
        ]
    else:
        lines.append("substitutions: none (everything trains as the spec wrote it)")
    return lines


def settings_json(plan: Plan) -> dict[str, Any]:
    return {
        "settings": {r.name: {"value": r.value, "source": r.source} for r in plan.settings()},
        "substitutions": [s.model_dump(mode="json") for s in plan.substitutions],
        "input": input_json(plan),
    }


def input_json(plan: Plan) -> dict[str, Any]:
    """What the trainer reads and how it renders rows, as the plan decided it."""
    d, m = plan.data, plan.model
    sources = [{"source": s.name, "weight": s.weight} for s in d.sources]
    return {
        "data": sources or [{"source": d.local_path or d.hub_id, "weight": 1.0}],
        "format": d.format,
        "fields": d.fields_read(),
        "roles": d.roles,
        "chat_template": _template_source(plan),
        "model": m.name,
        "architecture": m.architecture,
        "model_types": m.model_types,
    }


def _template_source(plan: Plan) -> str | None:
    """Which template renders conversations, when the spec replaces the tokenizer's."""
    if plan.data.chat_template_file is not None:
        return f"data.chat_template_file ({plan.data.chat_template_file})"
    return "data.chat_template" if plan.data.chat_template is not None else None


def input_lines(plan: Plan) -> list[str]:
    """The input as lines: each dataset (and weight), the row fields the format reads, the
    ShareGPT roles, whose chat template renders, the architecture the model must be."""
    shown = input_json(plan)
    lines = ["input (what the trainer reads, and how it renders each row):"]
    lines += [f"  data: {d['source']}" + (f" x {d['weight']:g}" if plan.data.sources else "")
              for d in shown["data"]]  # fmt: skip
    lines.append(f"  format: {shown['format']}; fields: {', '.join(shown['fields'])}")
    if shown["roles"]:
        roles = ", ".join(f"{k} -> {v}" for k, v in shown["roles"].items())
        lines.append(f"  roles (ShareGPT 'from' -> chat role): {roles}")
    if plan.data.conversational:
        template = shown["chat_template"] or "the tokenizer's own"
        lines.append(f"  chat template: {template}")
    lines.append(f"  model: {shown['model']}, architecture {shown['architecture']} (config.json "
                 f"model_type {' or '.join(shown['model_types'])})")  # fmt: skip
    return lines


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


def card_warnings(plan: Plan, gpu: Gpu) -> list[str]:
    """What the named card cannot do that the plan asks of it (bfloat16 before Ampere)."""
    p = plan.engine.precision
    parts = {"base_matmul": p.base_matmul, "adapter_compute": p.adapter_compute,
             "activations": p.activations}  # fmt: skip
    in_bf16 = [name for name, dtype in parts.items() if dtype == "bfloat16"]
    if gpu.bf16 is not False or not in_bf16:
        return []
    return [
        f"{gpu.name} has no native bfloat16, and this plan computes {', '.join(in_bf16)} in "
        "bfloat16 (emulated: slow, or refused by kernels): set quantization.compute_dtype = "
        '"float16" and train.mixed_precision = "fp16" or "no"'
    ]


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
