"""The preflight memory estimate: predicted peak GPU memory of one training process.

The estimate is a sum of named terms, in bytes, each derived from the model's shape and the
plan the way the engine that runs it allocates memory: qlc/trainer/reference.py with trl's
SFTTrainer for train.engine = "reference", qlc/trainer/fast for "fast" (its "standard" and
"lean" memory settings). What it predicts is torch's peak *reserved* memory
(`torch.cuda.max_memory_reserved`, what bench/run.py measures). The CUDA context and paged
optimizer states (bitsandbytes' unified memory, evicted to the host under pressure) live outside
that pool: they are shown apart, and `check_fit` adds the context. tests/compiler/test_memory.py
checks the totals against the H100 measurements in bench/results.

Pure: no I/O, environment or clock. The shape comes from compiler/data/shapes.toml, or from a
local model's config.json that the caller read (`qlc.compiler.shapes.shape_from_config`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from qlc.compiler.plan import Plan
from qlc.compiler.settle import FUSING_ARCHITECTURES
from qlc.compiler.shapes import (
    FUSED_PROJECTIONS,
    GIB,
    PROJECTIONS,
    Gpu,
    ModelShape,
    UnknownShape,
    known_shape,
)

# Measured constants (each with where it comes from).
# Reserved over allocated at the peak, from bench/results/2026-11-26-h100-call5.jsonl:
# seed recipe 7136608256 / 6351951360 (the reference engine runs the same trainer path on
# padded batches; its own run records no allocated figure), fast 40022048768 / 38637564928,
# lean (expandable segments) 7289700352 / 6900891136.
ALLOCATOR_OVERHEAD = {"reference": 0.124, "fast": 0.036, "lean": 0.056}
# An allowance, not a measurement here: a CUDA 12/13 context with lazy module loading takes
# about 0.5 GiB on Hopper, plus the kernel images cuBLAS, flash attention and bitsandbytes load.
CUDA_CONTEXT_BYTES = 600 * 2**20
FIT_HEADROOM = 0.05  # of the card: fragmentation spikes, other processes
# Library constants (bitsandbytes 0.50, trl 1.16, fast_engine.py).
QUANT_BLOCK = 64  # 4-bit blocksize: one absmax per 64 weights
NESTED_BLOCK = 256  # double quantization: one float32 absmax per 256 8-bit absmax
OPTIM_BLOCK = 256  # 8-bit optimizers: one float32 absmax per 256 states
PAGED_MIN = 100_000  # bitsandbytes pages a state buffer only from 1e5 elements
EIGHT_BIT_MIN = 4096  # smaller tensors keep 32-bit states
TRL_TOKEN_TILE, TRL_VOCAB_TILE = 4096, 32768  # trl's chunked log-prob head
LEAN_LOSS_CHUNK = 1024  # fast_engine.py: tokens per checkpointed loss chunk
FAST_PLAN_MARGIN = 6 * GIB  # fast_engine.py _memory_plan's margin
DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}


@dataclass(frozen=True)
class Term:
    key: str
    bytes: int
    detail: str
    in_pool: bool = True  # inside torch's caching allocator: part of the predicted peak

    @property
    def gib(self) -> float:
        return float(self.bytes / GIB)


@dataclass(frozen=True)
class MemoryEstimate:
    setting: str
    shape: ModelShape
    tokens: int
    terms: tuple[Term, ...]
    notes: tuple[str, ...] = ()

    @property
    def total_bytes(self) -> int:
        """Predicted peak reserved memory of torch's allocator."""
        return sum(t.bytes for t in self.terms if t.in_pool)

    @property
    def outside_pool_bytes(self) -> int:
        return sum(t.bytes for t in self.terms if not t.in_pool)

    def as_dict(self) -> dict[str, Any]:
        return {
            "setting": self.setting,
            "model": self.shape.name,
            "tokens_per_micro_batch": self.tokens,
            "total_bytes": self.total_bytes,
            "outside_pool_bytes": self.outside_pool_bytes,
            "terms": [
                {"key": t.key, "bytes": t.bytes, "in_pool": t.in_pool, "detail": t.detail}
                for t in self.terms
            ],
            "notes": list(self.notes),
        }


@dataclass(frozen=True)
class Fit:
    gpu: Gpu
    peak_reserved: int
    context: int
    headroom: int
    outside_pool: int

    @property
    def needed(self) -> int:
        return self.peak_reserved + self.context + self.headroom

    @property
    def spare(self) -> int:
        return int(self.gpu.memory_bytes) - self.needed

    @property
    def fits(self) -> bool:
        return self.spare >= 0


@dataclass(frozen=True)
class Workload:
    """The spec values memory depends on, with the engines' own substitutions applied."""

    engine: str
    memory: str
    tokens: int
    lora_r: int
    lora_dropout: float
    targets: tuple[str, ...]
    optimizer: str
    checkpointing: bool
    compute_dtype: str
    load_in_4bit: bool
    double_quant: bool
    devices: int
    distributed: str
    gpus: int
    upcast: bool = True  # peft's prepare_model_for_kbit_training: non-4-bit weights in float32
    lora_bytes: int = 4  # LoRA weights' dtype size (train.py keeps peft's float32)

    @property
    def lean(self) -> bool:
        return self.memory == "lean"


def workload(plan: Plan) -> Workload:
    """What memory depends on, read from the plan's decided settings (never re-derived)."""
    engine, schedule, lora = plan.engine, plan.schedule, plan.lora
    if lora.target_modules != "all-linear":
        targets = tuple(m for m in (*PROJECTIONS, *FUSED_PROJECTIONS) if m in lora.target_modules)
    elif plan.model.architecture in FUSING_ARCHITECTURES:
        targets = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
    else:
        targets = PROJECTIONS
    return Workload(
        engine=engine.name,
        memory=engine.memory,
        tokens=schedule.batch_size * plan.data.max_length,
        lora_r=lora.r,
        lora_dropout=lora.dropout,
        targets=targets,
        optimizer=engine.optimizer.name,
        checkpointing=engine.recompute == "every-layer",
        compute_dtype=plan.quantization.compute_dtype,
        load_in_4bit=plan.quantization.load_in_4bit,
        double_quant=plan.quantization.double_quant,
        devices=schedule.world_size,
        distributed=engine.distributed,
        gpus=plan.runtime.gpus,
    )


def shape_for(plan: Plan) -> ModelShape:
    """The table's shape for the plan's model; UnknownShape says what to do otherwise."""
    model = plan.model
    shape = known_shape(model.hub_id, model.local_path)
    if shape is None:
        what = f"model.id {model.hub_id!r}" if model.hub_id else f"model.path {model.local_path!r}"
        raise UnknownShape(
            f"the shape of {what} is not known here (no hub access). "
            "Use a local model directory with a config.json (model.path), or add the model "
            "to compiler/data/shapes.toml with its source"
        )
    return shape


def estimate(plan: Plan, shape: ModelShape | None = None, gpu: Gpu | None = None) -> MemoryEstimate:
    """Predicted peak reserved memory of one training process for `plan`.

    `shape` defaults to the table's entry for the plan's model (UnknownShape if none). `gpu`
    matters only where the engine picks its path from free memory (the fast engine's
    "standard" setting)."""
    from qlc.compiler import memory_terms as terms

    shape = shape or shape_for(plan)
    work = workload(plan)
    result: MemoryEstimate
    if work.engine == "reference":
        result = terms.reference(work, shape)
    elif work.memory in ("lean", "compact"):
        result = terms.fast_lean(work, shape)
    else:
        result = terms.fast_standard(work, shape, gpu)
    return result


def estimate_seed_recipe(plan: Plan, shape: ModelShape | None = None) -> MemoryEstimate:
    """The seed recipe as written (bench/seed_recipe.py), which no spec setting expresses: the
    reference trainer without prepare_model_for_kbit_training, so the embeddings, lm_head and
    residual stream stay in the load dtype, and with trl's bf16 cast of the LoRA weights."""
    from qlc.compiler import memory_terms as terms

    work = replace(
        workload(plan), engine="reference", memory="standard", upcast=False, lora_bytes=2
    )
    result: MemoryEstimate = terms.reference(work, shape or shape_for(plan))
    return result


def check_fit(result: MemoryEstimate, gpu: Gpu) -> Fit:
    """Whether the predicted peak, the CUDA context and a headroom fit the card."""
    return Fit(
        gpu=gpu,
        peak_reserved=result.total_bytes,
        context=CUDA_CONTEXT_BYTES,
        headroom=math.ceil(gpu.memory_bytes * FIT_HEADROOM),
        outside_pool=result.outside_pool_bytes,
    )
