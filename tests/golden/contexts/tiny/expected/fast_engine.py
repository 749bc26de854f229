"""qlc's fast training engine: the recipe's QLoRA mathematics, without the library overheads.

Imported by the generated train.py when `spec.train.engine == "fast"`; a plain module with no
qlc import, copied beside train.py in every build context. Entry point: `train(...)`.

What is the same as the reference engine (transformers Trainer + peft + bitsandbytes):
- the examples of each optimizer step (batch_size x grad_accum, the same length-grouped or random
  order, seeded), the number of steps, the learning-rate schedule and warmup (transformers'
  `get_scheduler`), the optimizer's update rule, weight decay, gradient clipping;
- the loss: token-level cross-entropy summed over the step's label tokens, divided by their count;
- the LoRA mathematics: y = x W^T + dropout(x) A^T B^T * (alpha / r) on the same projections,
  with the adapter weights trained in float32.

What it does differently, and why it is the same function:
- padding-free batches: the step's examples are concatenated into one row; positions restart at
  every example and attention is causal within each example only (varlen flash attention, or
  one SDPA call per example), so no example sees another and no padding is computed;
- "standard" memory: the frozen 4-bit base weights are dequantized ONCE with bitsandbytes'
  own `dequantize_4bit` into a bf16 copy kept on the GPU. bitsandbytes computes every forward and
  backward matmul from exactly these dequantized values (dequantize, cast to the compute dtype,
  matmul), so the QLoRA mathematics is unchanged; only the per-step dequantization is gone. The
  4-bit weights stay in the model, which is handed back unchanged;
- bf16 compute on GPUs that have it (the compute dtype bitsandbytes would cast to), with the
  adapter's float32 weights used through bf16 copies refreshed after every optimizer step;
- no activation recomputation when the activations fit, torch's fused RMSNorm, one fused matmul
  for q|k|v and for gate|up, no host syncs in the loop (losses and norms are read back one
  logging step late, once the GPU has finished them);
- "lean" memory: the 4-bit weights stay packed (dequantized per matmul as bitsandbytes does), every
  decoder layer is recomputed in the backward pass, the loss is computed in chunks so the logits
  never exist in full, and the optimizer keeps 8-bit paged states (bitsandbytes) on CUDA. On a
  GPU the base never sits there whole: train.py loads the quantized model into host memory, the
  packed weights are pinned and streamed to the GPU one decoder layer at a time (the next
  layer's copy overlapping this one's compute, `WeightStream`), the embeddings are looked up in
  host memory and only the adapters, norms and a compute-dtype copy of the head stay on the GPU.
  Every matmul sees the same dequantized values as the standard setting's copy.

Knobs (environment, for measurements; the defaults are the measured best on an H100):
QLC_FAST_KERNELS=liger uses Liger Kernel's Triton RMSNorm/SwiGLU/RoPE/fused linear cross-entropy
(each checked against torch at start; slower here: ~0.1-0.3 ms of Python per call);
QLC_FAST_FUSE=0 keeps q, k, v (gate, up) as separate matmuls; QLC_FAST_BUCKET=N rounds each packed
row up to N tokens with a filler segment; QLC_FAST_PROFILE_STEPS=N prints a torch.profiler table
of N steps after 10.

Anything this engine does not model (other architectures, DoRA, trained biases, modules_to_save,
sliding windows shorter than an example) is trained through the model's own forward, with
padded batches: slower, never wrong.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE = -100
TRAINABLE_FILE = "trainable.pt"
STATE_FILE = "trainer_state.json"


# ----------------------------------------------------------------------------- steps and batches
def steps_per_epoch(n_examples: int, batch_size: int, grad_accum: int) -> int:
    """Optimizer steps in one epoch, exactly as transformers' Trainer counts them."""
    batches = math.ceil(n_examples / batch_size)
    return max(batches // grad_accum + int(batches % grad_accum > 0), 1)


def total_steps(n_examples: int, train: dict[str, Any]) -> int:
    if train.get("max_steps"):
        return int(train["max_steps"])
    per_epoch = steps_per_epoch(n_examples, train["batch_size"], train["grad_accum"])
    epochs = train.get("epochs") or 1.0
    return math.ceil(epochs * per_epoch)


def warmup_steps(steps: int, train: dict[str, Any]) -> int:
    if train.get("warmup_steps") is not None:
        return int(train["warmup_steps"])
    return math.ceil(steps * (train.get("warmup_ratio") or 0.0))


def length_grouped_order(lengths: list[int], group: int, generator: torch.Generator) -> list[int]:
    """transformers' get_length_grouped_indices: shuffled mega-batches sorted by length."""
    mult = min(len(lengths) // (group * 4), 50) or 1
    indices = torch.randperm(len(lengths), generator=generator)
    size = mult * group
    megas = [indices[i : i + size].tolist() for i in range(0, len(lengths), size)]
    megas = [sorted(m, key=lambda i: lengths[i], reverse=True) for m in megas]
    longest = max(range(len(megas)), key=lambda k: lengths[megas[k][0]])
    megas[0][0], megas[longest][0] = megas[longest][0], megas[0][0]
    return [i for m in megas for i in m]


def step_schedule(lengths: list[int], train: dict[str, Any], seed: int) -> list[list[list[int]]]:
    """For every optimizer step, its micro-batches of example indices (seeded, resumable)."""
    steps = total_steps(len(lengths), train)
    bs, accum = train["batch_size"], train["grad_accum"]
    schedule: list[list[list[int]]] = []
    epoch = 0
    while len(schedule) < steps:
        generator = torch.Generator().manual_seed(seed + epoch)
        if train.get("group_by_length"):
            order = length_grouped_order(lengths, bs * accum, generator)
        else:
            order = torch.randperm(len(lengths), generator=generator).tolist()
        micro = [order[i : i + bs] for i in range(0, len(order), bs)]
        for start in range(0, len(micro), accum):
            schedule.append(micro[start : start + accum])
        epoch += 1
    return schedule[:steps]


@dataclass
class Packed:
    """One padding-free micro-batch: every example's tokens in one row."""

    input_ids: torch.Tensor  # (T,)
    targets: torch.Tensor  # (T,) next-token labels, IGNORE at each example's last position
    position_ids: torch.Tensor  # (T,) restarting at 0 for every example
    cu_seqlens: torch.Tensor  # (N+1,) int32
    lengths: list[int]
    max_len: int
    n_targets: int


def pack(examples: list[dict[str, list[int]]], device: torch.device, bucket: int = 0) -> Packed:
    """bucket > 0 rounds the row up to a multiple of `bucket` tokens with one filler segment
    (its own attention segment, no targets): it changes no result, only how often the matmul
    shapes repeat."""
    ids: list[int] = []
    targets: list[int] = []
    positions: list[int] = []
    lengths: list[int] = []
    for ex in examples:
        n = len(ex["input_ids"])
        ids += ex["input_ids"]
        targets += [*ex["labels"][1:], IGNORE]
        positions += range(n)
        lengths.append(n)
    filler = -len(ids) % bucket if bucket else 0
    if filler:
        ids += [0] * filler
        targets += [IGNORE] * filler
        positions += range(filler)
        lengths.append(filler)
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    host = torch.tensor([ids, targets, positions], dtype=torch.long)
    if device.type == "cuda":
        host = host.pin_memory()
    dev = host.to(device, non_blocking=True)
    cu_t = torch.tensor(cu, dtype=torch.int32)
    cu_t = cu_t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else cu_t
    n_targets = sum(t != IGNORE for t in targets)
    return Packed(dev[0], dev[1], dev[2], cu_t, lengths, max(lengths), n_targets)


def pad(examples: list[dict[str, list[int]]], pad_id: int, device: torch.device) -> dict:
    """A right-padded batch for the model's own forward (the generic path)."""
    width = max(len(ex["input_ids"]) for ex in examples)
    ids = [ex["input_ids"] + [pad_id] * (width - len(ex["input_ids"])) for ex in examples]
    labels = [ex["labels"] + [IGNORE] * (width - len(ex["labels"])) for ex in examples]
    mask = [[1] * len(ex["input_ids"]) + [0] * (width - len(ex["input_ids"])) for ex in examples]
    as_t = lambda rows: torch.tensor(rows, dtype=torch.long, device=device)  # noqa: E731
    return {"input_ids": as_t(ids), "labels": as_t(labels), "attention_mask": as_t(mask)}


# ----------------------------------------------------------------------------- processes
@dataclass(frozen=True)
class Ranks:
    """The data-parallel processes of a torchrun launch (one GPU each, or gloo on CPU). Every
    process builds the same schedule with the step's micro-batches of all processes, trains
    micro-batches rank, rank + world, ... of each step, and the gradients are summed over the
    processes before the update: a step is the one-process step, split."""

    rank: int = 0
    world: int = 1

    @classmethod
    def current(cls) -> Ranks:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    def mine(self, micro: list[Any]) -> list[Any]:
        return micro[self.rank :: self.world]

    def sum_grads(self, params: list[torch.nn.Parameter]) -> None:
        """One all-reduce of every adapter gradient (a process without a micro-batch in the
        step adds zeros)."""
        if self.world < 2:
            return
        import torch.distributed as dist

        grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        offset = 0
        for param, grad in zip(params, grads, strict=True):
            param.grad = flat[offset : offset + grad.numel()].view_as(param)
            offset += grad.numel()

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(value)
        return value

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()


# ----------------------------------------------------------------------------- settings
@dataclass
class Settings:
    device: torch.device
    dtype: torch.dtype
    lean: bool
    stream: bool = False  # lean on a GPU: the 4-bit base streamed from host memory per layer

    @classmethod
    def choose(cls, model: torch.nn.Module, spec: dict[str, Any]) -> Settings:
        device = next(p.device for p in model.parameters())
        lean = spec["train"]["memory"] == "lean"
        # lean on a GPU trains from a model train.py loaded into host memory (so the GPU never
        # holds the whole base); QLC_FAST_STREAM=1 runs the same streaming on CPU, for tests.
        gpu = spec.get("runtime", {}).get("gpus", 1) > 0 and torch.cuda.is_available()
        stream = lean and (gpu or os.environ.get("QLC_FAST_STREAM") == "1")
        if stream and gpu:
            device = torch.device("cuda", torch.cuda.current_device())
        wanted = spec["quantization"]["compute_dtype"]
        if device.type != "cuda" or wanted == "float32":
            dtype = torch.float32
        elif torch.cuda.is_bf16_supported():
            dtype = torch.bfloat16
        else:
            dtype = torch.float16
        return cls(device=device, dtype=dtype, lean=lean, stream=stream)


# ----------------------------------------------------------------------------- fused kernels
class Kernels:
    """Liger's Triton kernels where they are installed and agree with plain torch; else torch."""

    def __init__(self, device: torch.device, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
        """shape: (hidden, intermediate, heads, head_dim): the checks compile the kernels that
        training then reuses."""
        self.liger = False
        self.fused_norm = device.type == "cuda"  # torch's fused RMSNorm kernel (F.rms_norm)
        self.varlen: Callable | None = None
        if device.type == "cuda":
            self.varlen = _try(lambda: _check_varlen(device, dtype)) or None
            if os.environ.get("QLC_FAST_KERNELS", "torch") == "liger":
                self.liger = _try(lambda: _check_liger(device, dtype, shape))

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        if self.liger:
            from liger_kernel.ops.rms_norm import LigerRMSNormFunction

            return LigerRMSNormFunction.apply(x, weight, eps, 0.0, "llama", False)
        if self.fused_norm:
            return F.rms_norm(x, (x.shape[-1],), weight, eps)
        return _rms_norm_torch(x, weight, eps)

    def silu_mul(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        if self.liger:
            from liger_kernel.ops.swiglu import LigerSiLUMulFunction

            return LigerSiLUMulFunction.apply(gate, up)
        return F.silu(gate) * up

    def rope(self, q, k, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotary embedding of q (T, H, D) and k (T, Hkv, D); cos and sin are (1, T, D)."""
        if self.liger:
            from liger_kernel.ops.rope import LigerRopeFunction

            q4, k4 = (t.unsqueeze(0).transpose(1, 2) for t in (q, k))
            q4, k4 = LigerRopeFunction.apply(q4, k4, cos, sin)
            return q4.transpose(1, 2)[0], k4.transpose(1, 2)[0]
        cos, sin = cos[0].unsqueeze(1), sin[0].unsqueeze(1)
        return _rope(q, cos, sin), _rope(k, cos, sin)

    def attention(self, q, k, v, batch: Packed) -> torch.Tensor:
        """Causal attention within each example; q (T, H, D), k and v (T, Hkv, D)."""
        if self.varlen is not None and q.is_cuda:
            if k.shape[1] != q.shape[1]:
                k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
            return self.varlen(q, k, v, batch.cu_seqlens, batch.max_len)
        return _attention_per_example(q, k, v, batch.lengths)


def _try(check: Callable[[], Any]) -> Any:
    try:
        return check()
    except Exception as error:  # a kernel that fails its check is simply not used
        print(f"qlc fast engine: not using a fused kernel ({type(error).__name__}: {error})")
        return False


def _rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm: normalize in float32, scale in the input dtype."""
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def _attention_per_example(q, k, v, lengths: list[int]) -> torch.Tensor:
    gqa = k.shape[1] != q.shape[1]
    outs, start = [], 0
    for n in lengths:
        sl = slice(start, start + n)
        qi, ki, vi = (t[sl].transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        if gqa:
            ki, vi = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (ki, vi))
        outs.append(F.scaled_dot_product_attention(qi, ki, vi, is_causal=True)[0].transpose(0, 1))
        start += n
    return torch.cat(outs) if len(outs) > 1 else outs[0]


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def _check_liger(device: torch.device, dtype: torch.dtype, shape: tuple[int, ...]) -> bool:
    from liger_kernel.ops.rms_norm import LigerRMSNormFunction
    from liger_kernel.ops.swiglu import LigerSiLUMulFunction

    hidden, intermediate, heads, head_dim = shape
    x = torch.randn(300, hidden, device=device, dtype=dtype, requires_grad=True)
    w = torch.rand(hidden, device=device, dtype=dtype) + 0.5
    a = LigerRMSNormFunction.apply(x, w, 1e-5, 0.0, "llama", False)
    (ga,) = torch.autograd.grad(a.float().square().sum(), x)
    b = _rms_norm_torch(x, w, 1e-5)
    (gb,) = torch.autograd.grad(b.float().square().sum(), x)
    g, u = (torch.randn(300, intermediate, device=device, dtype=dtype) for _ in range(2))
    errors = [
        _rel_err(a, b),
        _rel_err(ga, gb),
        _rel_err(LigerSiLUMulFunction.apply(g, u), F.silu(g) * u),
        *_rope_errors(device, dtype, heads, head_dim),
    ]
    if max(errors) > 2e-2:
        raise ValueError(f"Liger disagrees with torch (relative errors {errors})")
    return True


def _rope_errors(device: torch.device, dtype: torch.dtype, heads: int, dim: int) -> list[float]:
    from liger_kernel.ops.rope import LigerRopeFunction

    n = 70
    fused = torch.randn(n, 3 * heads * dim, device=device, dtype=dtype, requires_grad=True)
    angles = torch.rand(1, n, dim // 2, device=device) * 6
    cos, sin = (f(torch.cat((angles, angles), -1)).to(dtype) for f in (torch.cos, torch.sin))
    q, k, _ = fused.split(heads * dim, -1)
    q, k = q.reshape(n, heads, dim), k.reshape(n, heads, dim)
    q4, k4 = (t.unsqueeze(0).transpose(1, 2) for t in (q, k))
    lq, lk = (t.transpose(1, 2)[0] for t in LigerRopeFunction.apply(q4, k4, cos, sin))
    (g1,) = torch.autograd.grad((lq.float() * 1.5 + lk.float()).square().sum(), fused)
    c, s_ = cos[0].unsqueeze(1), sin[0].unsqueeze(1)
    eq, ek = _rope(q, c, s_), _rope(k, c, s_)
    (g2,) = torch.autograd.grad((eq.float() * 1.5 + ek.float()).square().sum(), fused)
    return [_rel_err(lq, eq), _rel_err(lk, ek), _rel_err(g1, g2)]


def _check_varlen(device: torch.device, dtype: torch.dtype) -> Callable:
    import inspect

    from torch.nn.attention.varlen import varlen_attn

    params = inspect.signature(varlen_attn).parameters
    causal = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}

    def run(q, k, v, cu, max_len):
        return varlen_attn(q, k, v, cu, cu, max_len, max_len, **causal)

    lengths = [37, 200, 5, 130]
    q, k, v = (
        torch.randn(sum(lengths), 4, 64, device=device, dtype=dtype, requires_grad=True)
        for _ in range(3)
    )
    cu = torch.tensor([0, 37, 237, 242, 372], device=device, dtype=torch.int32)
    a = run(q, k, v, cu, 200)
    ga = torch.autograd.grad(a.float().square().sum(), (q, k, v))
    b = _attention_per_example(q, k, v, lengths)
    gb = torch.autograd.grad(b.float().square().sum(), (q, k, v))
    errors = [_rel_err(a, b)] + [_rel_err(x, y) for x, y in zip(ga, gb, strict=True)]
    if max(errors) > 2e-2:
        raise ValueError(f"varlen attention disagrees with SDPA (relative errors {errors})")
    return run


# ----------------------------------------------------------------------------- the decoder
@dataclass
class Lora:
    """A LoRA pair. The float32 parameters stay the optimizer's; the forward uses compute-dtype
    copies made once per optimizer step (not one cast per use), whose gradients are handed back
    to the float32 parameters after each backward: the values are those of casting per use."""

    A: torch.nn.Parameter
    B: torch.nn.Parameter
    scaling: float
    dropout: float
    A_c: torch.Tensor | None = None
    B_c: torch.Tensor | None = None

    def add_to(self, base: torch.Tensor, x: torch.Tensor, training: bool) -> torch.Tensor:
        """base + dropout(x) A^T B^T * scaling, the product, scale and sum in one addmm."""
        a, b = (self.A, self.B) if self.A_c is None else (self.A_c, self.B_c)
        h = F.dropout(x, self.dropout, training) if self.dropout > 0 else x
        return torch.addmm(base, F.linear(h, a), b.t(), alpha=self.scaling)

    def refresh(self, dtype: torch.dtype) -> None:
        if self.A.dtype == dtype:
            return
        with torch.no_grad():
            if self.A_c is None:
                self.A_c = self.A.detach().to(dtype).requires_grad_()
                self.B_c = self.B.detach().to(dtype).requires_grad_()
            else:
                self.A_c.copy_(self.A)
                self.B_c.copy_(self.B)

    def hand_back_grads(self) -> None:
        for master, low in ((self.A, self.A_c), (self.B, self.B_c)):
            if low is None or low.grad is None:
                continue
            grad = low.grad.float()
            master.grad = grad if master.grad is None else master.grad.add_(grad)
            low.grad = None


@dataclass
class Part:
    """One projection of the checkpoint (e.g. q_proj): its frozen base and optional LoRA."""

    base: torch.nn.Module
    out_features: int
    lora: Lora | None
    streamed: tuple[torch.Tensor, Any] | None = None  # this layer's fetched 4-bit weight + state


class Proj:
    """Several projections of one input (q|k|v, gate|up) as ONE matmul on the dequantized copy."""

    def __init__(self, parts: list[Part], settings: Settings, dequantize: bool) -> None:
        self.parts, self.dtype = parts, settings.dtype
        self.weight: torch.Tensor | None = None
        self.bias: torch.Tensor | None = None
        if dequantize or not all(_is_4bit(p.base) for p in parts):
            self.weight = torch.cat([_dense_weight(p.base, self.dtype) for p in parts])
            biases = [p.base.bias for p in parts]
            if any(b is not None for b in biases):
                self.bias = torch.cat(
                    [
                        (
                            b.detach()
                            if b is not None
                            else torch.zeros(p.out_features, device=self.weight.device)
                        ).to(self.dtype)
                        for b, p in zip(biases, parts, strict=True)
                    ]
                )

    def __call__(self, x: torch.Tensor, training: bool) -> list[torch.Tensor]:
        if self.weight is not None:
            fused = F.linear(x, self.weight, self.bias)
            outs = list(fused.split([p.out_features for p in self.parts], dim=-1))
        else:
            outs = [_linear_4bit(x, p, self.dtype) for p in self.parts]
        for i, part in enumerate(self.parts):
            if part.lora is not None:
                outs[i] = part.lora.add_to(outs[i], x, training)
        return outs

    def nbytes(self) -> int:
        return 0 if self.weight is None else self.weight.numel() * self.weight.element_size()


class Separate:
    """The same projections as separate matmuls: contiguous outputs, no split/concat."""

    def __init__(self, projs: list[Proj]) -> None:
        self.projs = projs
        self.parts = [part for proj in projs for part in proj.parts]
        self.weight = projs[0].weight

    def __call__(self, x: torch.Tensor, training: bool) -> list[torch.Tensor]:
        return [out for proj in self.projs for out in proj(x, training)]

    def nbytes(self) -> int:
        return sum(proj.nbytes() for proj in self.projs)


def _is_4bit(module: torch.nn.Module) -> bool:
    return hasattr(module.weight, "quant_state") and module.weight.quant_state is not None


def _dense_weight(module: torch.nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """bitsandbytes' own dequantization, cast to the compute dtype exactly as its matmul does."""
    if _is_4bit(module):
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(module.weight.data, module.weight.quant_state).to(dtype)
    return module.weight.detach().to(dtype)


def _matmul_4bit(x: torch.Tensor, module: torch.nn.Module) -> torch.Tensor:
    import bitsandbytes as bnb

    bias = None if module.bias is None else module.bias.to(x.dtype)
    return bnb.matmul_4bit(x, module.weight.t(), bias=bias, quant_state=module.weight.quant_state)


def _linear_4bit(x: torch.Tensor, part: Part, dtype: torch.dtype) -> torch.Tensor:
    """x W^T from the 4-bit weight: streamed (lean on a GPU) it is dequantized with
    bitsandbytes' own kernel and used like the standard setting's dense copy, and autograd keeps
    only that transient copy (dropped by the layer's recomputation), never the packed buffer."""
    if part.streamed is None:
        return _matmul_4bit(x, part.base)
    import bitsandbytes.functional as bnbf

    packed, state = part.streamed
    weight = bnbf.dequantize_4bit(packed, state).to(dtype)
    bias = part.base.bias
    return F.linear(x, weight, None if bias is None else bias.to(x.device, x.dtype))


class WeightStream:
    """lean on a GPU: the frozen 4-bit weights of the decoder layers live in pinned host memory.
    A layer's packed weights and scales are copied to the GPU just before it runs, the next
    layer's copy (in the direction of the pass: up in the forward, down in the backward's
    recomputation) on a copy stream while this one computes, and dropped after: the GPU holds
    three layers of the base (previous, current, next) instead of all of it. `restore()` puts
    every weight back.

    The host may queue a layer's kernels only while the GPU is at most two layers behind: a
    layer's buffers are freed once the GPU has finished the work queued with them (waited for
    on the host), so the copy stream reuses them at once. Freed while the GPU was still behind,
    as record_stream would, every layer the host ran ahead would hold new buffers (measured:
    5.1 GiB reserved for 2.8 GiB allocated)."""

    def __init__(self, layers: list[list[torch.nn.Module]], device: torch.device) -> None:
        self.device, self.cuda = device, device.type == "cuda"
        self.modules = layers
        self.homes = [[m.weight.data.device for m in mods] for mods in layers]
        self.host = [[self._to_host(m) for m in mods] for mods in layers]
        self.copy_stream = torch.cuda.Stream(device) if self.cuda else None
        self.resident: dict[int, tuple[Any, list[tuple[torch.Tensor, torch.Tensor]]]] = {}
        self.done: dict[int, Any] = {}  # layer -> event after the work queued with its weights
        self.last, self.direction, self.fetches = -1, 1, 0

    def _to_host(self, module: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor, Any]:
        weight, state = module.weight, module.weight.quant_state
        packed, absmax = weight.data.to("cpu"), state.absmax.to("cpu")
        if self.cuda:
            packed, absmax = packed.pin_memory(), absmax.pin_memory()
        small = copy.copy(state)  # the NF4 code and nested scales: a few KiB, kept on the GPU
        small.code = state.code.to(self.device)
        if state.nested:
            small.offset = state.offset.to(self.device)
            small.state2 = copy.copy(state.state2)
            small.state2.absmax = state.state2.absmax.to(self.device)
            small.state2.code = state.state2.code.to(self.device)
        weight.data, state.absmax = packed, absmax  # a GPU-loaded base leaves the GPU
        return packed, absmax, small

    def restore(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
        self.resident.clear()
        self.done.clear()
        for mods, homes in zip(self.modules, self.homes, strict=True):
            for module, home in zip(mods, homes, strict=True):
                state = module.weight.quant_state
                module.weight.data = module.weight.data.to(home)
                state.absmax = state.absmax.to(home)

    def _free(self, i: int) -> None:
        copied, _ = self.resident.pop(i)
        used = self.done.pop(i, None)
        for pending in (copied, used):  # the GPU is done with the buffers before they go
            if pending is not None:
                pending.synchronize()

    def _fetch(self, i: int) -> None:
        if i in self.resident or not 0 <= i < len(self.host):
            return
        event = None
        if self.cuda:
            with torch.cuda.stream(self.copy_stream):
                tensors = [
                    (p.to(self.device, non_blocking=True), a.to(self.device, non_blocking=True))
                    for p, a, _ in self.host[i]
                ]
                event = torch.cuda.Event()
                event.record(self.copy_stream)
        else:
            tensors = [(p.to(self.device), a.to(self.device)) for p, a, _ in self.host[i]]
        self.resident[i] = (event, tensors)
        self.fetches += 1

    def get(self, i: int) -> list[tuple[torch.Tensor, Any]]:
        """Layer i's weights on the device (waited for), and the next layer's copy started."""
        if self.cuda and self.last in self.resident and i != self.last:
            self.done[self.last] = torch.cuda.Event()  # after everything queued with it
            self.done[self.last].record(torch.cuda.current_stream(self.device))
        if i != self.last:
            self.direction = 1 if i > self.last else -1
        self._fetch(i)
        event, tensors = self.resident[i]
        if event is not None:  # first use: the compute stream waits for the copy
            torch.cuda.current_stream(self.device).wait_event(event)
            self.resident[i] = (None, tensors)
        following = i + self.direction
        if not 0 <= following < len(self.host):  # the pass turns (forward -> recomputation)
            following = i - self.direction
        # the previous layer stays until the next get: its kernels may still be running
        for old in [k for k in self.resident if k not in (self.last, i, following)]:
            self._free(old)
        self._fetch(following)
        self.last = i
        weights = []
        for (packed, absmax), (_, _, small) in zip(tensors, self.host[i], strict=True):
            state = copy.copy(small)
            state.absmax = absmax
            weights.append((packed, state))
        return weights


class Parked:
    """Parameters moved for the run (lean: embeddings to host memory, adapters to the GPU),
    put back where they were by `restore()`."""

    def __init__(self) -> None:
        self.moved: list[tuple[torch.nn.Parameter, torch.device]] = []

    def move(self, param: torch.nn.Parameter, device: torch.device | str) -> torch.Tensor:
        home = param.data.device
        if home != torch.device(device):
            self.moved.append((param, home))
            param.data = param.data.to(device)
        return param.data

    def restore(self) -> None:
        for param, home in reversed(self.moved):
            param.data = param.data.to(home)
        self.moved.clear()


@dataclass
class Layer:
    in_norm: torch.Tensor
    post_norm: torch.Tensor
    qkv: Proj | Separate
    o: Proj | Separate
    gate_up: Proj | Separate
    down: Proj | Separate
    index: int = 0

    @property
    def parts(self) -> list[Part]:
        return [p for proj in (self.qkv, self.o, self.gate_up, self.down) for p in proj.parts]


class FastDecoder:
    """A Llama-family decoder (llama, mistral, qwen2) over padding-free batches."""

    def __init__(self, model, settings: Settings, dequantize: bool, recompute: bool) -> None:
        base = model.get_base_model()
        config = base.config
        self.settings, self.recompute, self.dequantize = settings, recompute, dequantize
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        shape = (config.hidden_size, config.intermediate_size, self.heads, self.head_dim)
        self.kernels = Kernels(settings.device, settings.dtype, shape)
        self.eps = config.rms_norm_eps
        self.rotary = base.model.rotary_emb
        self.parked = Parked()
        self.stream: WeightStream | None = None
        device, dt = settings.device, settings.dtype
        if settings.stream:  # embeddings looked up in host memory, the head as a compute copy
            self.embed = self.parked.move(base.model.embed_tokens.weight, "cpu").detach()
            self.lm_head = base.lm_head.weight.detach().to(device, dt)
            self.parked.move(base.lm_head.weight, "cpu")
            for param in model.parameters():
                if param.requires_grad:  # the adapters train on the GPU
                    self.parked.move(param, device)
        else:
            embed = base.model.embed_tokens.weight.detach()  # lean: no copy, cast per lookup
            self.embed = embed if settings.lean else embed.to(dt)
            head = base.lm_head.weight.detach()  # lean: logits from the stored head, no copy
            self.lm_head = head if settings.lean else head.to(dt)
        self.norm = base.model.norm.weight.detach().to(device, dt)
        self.layers = [self._layer(layer) for layer in base.model.layers]
        for index, layer in enumerate(self.layers):
            layer.index = index
        if settings.stream:
            bases = [[part.base for part in layer.parts] for layer in self.layers]
            self.stream = WeightStream(bases, device)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        self.training = True
        self.bucket = int(os.environ.get("QLC_FAST_BUCKET") or 0)

    def _layer(self, layer) -> Layer:
        attn, mlp, dt = layer.self_attn, layer.mlp, self.settings.dtype
        device = self.settings.device
        fuse = os.environ.get("QLC_FAST_FUSE", "1") != "0"

        def proj(*mods: torch.nn.Module) -> Proj | Separate:
            if fuse:
                return Proj([_part(m) for m in mods], self.settings, self.dequantize)
            return Separate([Proj([_part(m)], self.settings, self.dequantize) for m in mods])

        return Layer(
            layer.input_layernorm.weight.detach().to(device, dt),
            layer.post_attention_layernorm.weight.detach().to(device, dt),
            proj(attn.q_proj, attn.k_proj, attn.v_proj),
            proj(attn.o_proj),
            proj(mlp.gate_proj, mlp.up_proj),
            proj(mlp.down_proj),
        )

    def describe(self) -> str:
        kernels = "liger" if self.kernels.liger else "torch"
        padded = f", rows rounded up to {self.bucket} tokens" if self.bucket else ""
        attention = "varlen flash" if self.kernels.varlen else "SDPA per example"
        weights = "bf16 copy of the dequantized base" if self.dequantize else "4-bit base"
        if self.stream is not None:
            weights = "4-bit base streamed per layer from pinned host memory"
        if self.settings.dtype != torch.bfloat16:
            weights = weights.replace("bf16", str(self.settings.dtype).replace("torch.", ""))
        return (
            f"padding-free decoder, {weights}, {attention} attention, {kernels} norms/SwiGLU/"
            f"loss, {'recompute per layer' if self.recompute else 'no recomputation'}{padded}"
        )

    def weight_bytes(self) -> int:
        return sum(
            p.nbytes()
            for layer in self.layers
            for p in (layer.qkv, layer.o, layer.gate_up, layer.down)
        )

    def release(self) -> None:
        if self.stream is not None:
            self.stream.restore()
        self.parked.restore()
        self.layers, self.embed, self.lm_head, self.stream = [], None, None, None
        if self.settings.device.type == "cuda":
            torch.cuda.empty_cache()

    # -- forward
    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        if self.embed.device == ids.device:
            return F.embedding(ids, self.embed).to(self.settings.dtype)
        rows = F.embedding(ids.cpu(), self.embed).to(self.settings.dtype)
        return rows.pin_memory().to(ids.device, non_blocking=True) if ids.is_cuda else rows

    def loss_sum(self, batch: Packed) -> torch.Tensor:
        return self._loss(self.hidden(batch), batch.targets)

    def hidden(self, batch: Packed) -> torch.Tensor:
        """The final normalized hidden states of a packed batch."""
        x = self._embed(batch.input_ids)
        cos, sin = self.rotary(x[None], batch.position_ids[None])  # (1, T, D)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        for layer in self.layers:
            if self.recompute and self.training:
                x = checkpoint(self._block, layer, x, batch, cos, sin, use_reentrant=False)
            else:
                x = self._block(layer, x, batch, cos, sin)
        return self.kernels.rms_norm(x, self.norm, self.eps)

    @torch.no_grad()
    def greedy(self, prompt: list[int], new_tokens: int, stop: int | None) -> list[int]:
        """Greedy continuation (no cache: every token reruns the sequence, streamed weights
        included); for the lean setting's sample, where the model never sits on the GPU."""
        ids = list(prompt)
        for _ in range(new_tokens):
            example = {"input_ids": ids, "labels": ids}
            h = self.hidden(pack([example], self.settings.device))
            token = int(F.linear(h[-1:].to(self.lm_head.dtype), self.lm_head).argmax())
            ids.append(token)
            if token == stop:
                break
        return ids[len(prompt) :]

    def _block(self, layer: Layer, x, batch: Packed, cos, sin) -> torch.Tensor:
        if self.stream is None:
            return self._compute_block(layer, x, batch, cos, sin)
        parts = layer.parts
        for part, fetched in zip(parts, self.stream.get(layer.index), strict=True):
            part.streamed = fetched
        try:
            return self._compute_block(layer, x, batch, cos, sin)
        finally:
            for part in parts:
                part.streamed = None

    def _compute_block(self, layer: Layer, x, batch: Packed, cos, sin) -> torch.Tensor:
        k = self.kernels
        x = x + self._attention(layer, k.rms_norm(x, layer.in_norm, self.eps), batch, cos, sin)
        gate, up = layer.gate_up(k.rms_norm(x, layer.post_norm, self.eps), self.training)
        (down,) = layer.down(k.silu_mul(gate, up), self.training)
        return x + down

    def _attention(self, layer: Layer, h, batch: Packed, cos, sin) -> torch.Tensor:
        n = h.shape[0]
        q, k, v = layer.qkv(h, self.training)
        q, k = self.kernels.rope(
            q.view(n, self.heads, self.head_dim), k.view(n, self.kv_heads, self.head_dim), cos, sin
        )
        out = self.kernels.attention(q, k, v.view(n, self.kv_heads, self.head_dim), batch)
        (o,) = layer.o(out.reshape(n, self.heads * self.head_dim), self.training)
        return o

    def _loss(self, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.kernels.liger and not self.settings.lean:
            from liger_kernel.ops.fused_linear_cross_entropy import (
                LigerFusedLinearCrossEntropyFunction,
            )

            out = LigerFusedLinearCrossEntropyFunction.apply(
                h, self.lm_head, targets, None, None, IGNORE, 0.0, 0.0, "sum"
            )
            return out[0] if isinstance(out, tuple) else out
        if not self.settings.lean:
            return _chunk_loss(h, self.lm_head, targets)
        chunk, total = 1024, None
        for start in range(0, h.shape[0], chunk):
            sl = slice(start, start + chunk)
            part = checkpoint(_chunk_loss, h[sl], self.lm_head, targets[sl], use_reentrant=False)
            total = part if total is None else total + part
        return total


def _chunk_loss(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = F.linear(h.to(weight.dtype), weight).float()
    return F.cross_entropy(logits, targets, ignore_index=IGNORE, reduction="sum")


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def _part(module: torch.nn.Module) -> Part:
    base = getattr(module, "base_layer", module)
    lora = None
    if hasattr(module, "lora_A") and module.active_adapters:
        name = module.active_adapters[0]
        if name in module.lora_A:
            drop = module.lora_dropout[name]
            lora = Lora(
                module.lora_A[name].weight,
                module.lora_B[name].weight,
                float(module.scaling[name]),
                float(getattr(drop, "p", 0.0)),
            )
    return Part(base, base.out_features, lora)


# ----------------------------------------------------------------------------- choosing the path
def unsupported_reason(model: torch.nn.Module, spec: dict[str, Any], max_len: int) -> str | None:
    """Why FastDecoder cannot train this model exactly (None: it can)."""
    try:
        base = model.get_base_model()
        config = base.config
        layers = base.model.layers
    except AttributeError:
        return "not a peft-wrapped Llama-family causal LM"
    if config.model_type not in ("llama", "mistral", "qwen2"):
        return f"architecture {config.model_type!r}"
    if getattr(config, "hidden_act", "silu") != "silu" or getattr(
        config, "tie_word_embeddings", False
    ):
        return "activation or tied embeddings"
    window = getattr(config, "sliding_window", None)
    if window is not None and getattr(config, "use_sliding_window", True) and window < max_len:
        return f"sliding window {window} shorter than an example"
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    if spec["lora"].get("modules_to_save") or spec["lora"].get("bias", "none") != "none":
        return "modules_to_save or trained biases"
    for name, param in model.named_parameters():
        if param.requires_grad and "lora_A" not in name and "lora_B" not in name:
            return f"trainable parameter {name} outside LoRA"
        if "lora_magnitude" in name or "lora_embedding" in name:
            return "DoRA or embedding LoRA"
    adapted = {_adapted_module(n) for n, p in model.named_parameters() if p.requires_grad}
    allowed = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    if not adapted <= allowed or not names or not len(layers):
        return f"LoRA on {sorted(adapted - allowed)}"
    return None


def _adapted_module(name: str) -> str:
    parts = name.split(".")
    index = next(i for i, part in enumerate(parts) if part in ("lora_A", "lora_B"))
    return parts[index - 1]


def build_decoder(
    model, spec: dict[str, Any], settings: Settings, examples: list[dict[str, list[int]]]
) -> tuple[FastDecoder | None, str]:
    longest = max((len(ex["input_ids"]) for ex in examples), default=1)
    reason = unsupported_reason(model, spec, longest)
    if reason is not None:
        return None, f"generic path (model forward, padded batches): {reason}"
    dequantize, recompute = _memory_plan(model, spec, settings, examples)
    decoder = FastDecoder(model, settings, dequantize, recompute)
    return decoder, decoder.describe()


def _memory_plan(model, spec, settings: Settings, examples) -> tuple[bool, bool]:
    """Dequantize and skip recomputation when both fit in free GPU memory (with a margin)."""
    if settings.lean:
        return False, True
    if settings.device.type != "cuda":
        return True, False
    config = model.get_base_model().config
    train = spec["train"]
    tokens = sorted((len(ex["input_ids"]) for ex in examples), reverse=True)
    worst = sum(tokens[: train["batch_size"]])
    per_token = (14 * config.hidden_size + 5 * config.intermediate_size) * 2
    activations = per_token * config.num_hidden_layers * worst
    linear_params = sum(
        p.numel() * 2
        for n, p in model.get_base_model().named_parameters()
        if "layers." in n and "lora_" not in n and p.dim() == 2
    )
    dense = linear_params * torch.tensor([], dtype=settings.dtype).element_size()
    free, _ = torch.cuda.mem_get_info(settings.device)
    margin = 6 * 2**30
    if dense + activations + margin <= free:
        return True, False
    if dense + activations // config.num_hidden_layers * 2 + margin <= free:
        return True, True
    return False, activations + margin > free


# ----------------------------------------------------------------------------- the loss
class GenericLoss:
    """The model's own forward on padded batches: for what FastDecoder does not model."""

    def __init__(self, model: torch.nn.Module, pad_id: int, dtype: torch.dtype) -> None:
        self.model, self.pad_id, self.dtype = model, pad_id, dtype

    def train(self, flag: bool) -> None:
        self.model.train(flag)

    def after_backward(self) -> None:
        pass

    def after_step(self) -> None:
        pass

    def loss_sum(self, examples: list[dict[str, list[int]]], device: torch.device) -> torch.Tensor:
        batch = pad(examples, self.pad_id, device)
        autocast = torch.autocast(
            device.type, dtype=self.dtype, enabled=self.dtype != torch.float32
        )
        with autocast:
            logits = self.model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).logits
        shifted = F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE)
        return F.cross_entropy(
            logits.float().flatten(0, 1), shifted.flatten(), ignore_index=IGNORE, reduction="sum"
        )


class FastLoss:
    def __init__(self, model: torch.nn.Module, decoder: FastDecoder) -> None:
        self.model, self.decoder = model, decoder
        self.loras = [p.lora for layer in decoder.layers for p in layer.parts if p.lora is not None]
        self.after_step()

    def after_backward(self) -> None:
        for lora in self.loras:
            lora.hand_back_grads()

    def after_step(self) -> None:
        for lora in self.loras:
            lora.refresh(self.decoder.settings.dtype)

    def train(self, flag: bool) -> None:
        self.model.train(flag)
        self.decoder.training = flag

    def loss_sum(self, examples: list[dict[str, list[int]]], device: torch.device) -> torch.Tensor:
        return self.decoder.loss_sum(pack(examples, device, self.decoder.bucket))


# ----------------------------------------------------------------------------- optimizer
def make_optimizer(model: torch.nn.Module, train: dict[str, Any], settings: Settings):
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if "bias" in name or "norm" in name else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": train["weight_decay"]},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    name, lr, cuda = train["optimizer"], train["learning_rate"], settings.device.type == "cuda"
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(groups, lr=lr, scale_parameter=False, relative_step=False)
    eight_bit = name in ("adamw_8bit", "paged_adamw_8bit") or settings.lean
    if eight_bit and cuda:
        import bitsandbytes as bnb

        cls = (
            bnb.optim.PagedAdamW8bit
            if (settings.lean or name.startswith("paged"))
            else bnb.optim.AdamW8bit
        )
        return cls(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8)
    # 32-bit AdamW: the update rule of paged_adamw_32bit / adamw_torch, in one fused kernel on GPU.
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8, fused=cuda)


# ----------------------------------------------------------------------------- checkpoints
def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(model, optimizer, scheduler, step: int, output_dir: Path, keep: int) -> None:
    root = Path(output_dir) / "checkpoints"
    final = root / f"checkpoint-{step}"
    tmp = root / f".tmp-checkpoint-{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(str(tmp))  # a usable adapter, like the reference engine's checkpoints
    torch.save(
        {
            "trainable": trainable_state(model),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": _rng_state(),
        },
        tmp / TRAINABLE_FILE,
    )
    (tmp / STATE_FILE).write_text(json.dumps({"global_step": step, "engine": "fast"}))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    done = sorted(
        (p for p in root.glob("checkpoint-*") if p.is_dir()),
        key=lambda p: int(p.name.split("-")[-1]),
    )
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(model, optimizer, scheduler, path: Path) -> int:
    """Restore adapter, optimizer, schedule and RNG; returns the step to continue from."""
    blob_path = Path(path) / TRAINABLE_FILE
    if not blob_path.exists():
        raise FileNotFoundError(
            f"{path} is not a fast-engine checkpoint (no {TRAINABLE_FILE}); "
            "resume it with the engine that wrote it, or start a new run"
        )
    blob = torch.load(blob_path, map_location="cpu", weights_only=False)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in blob["trainable"].items():
            params[name].copy_(value)
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    _set_rng_state(blob["rng"])
    return int(json.loads((Path(path) / STATE_FILE).read_text())["global_step"])


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(
    loss_fn, examples: list[dict[str, list[int]]], batch_size: int, device
) -> float | None:
    """Token-weighted mean cross-entropy over the held-out examples (dropout off)."""
    if not examples:
        return None
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    total = torch.zeros((), device=device, dtype=torch.float64)
    count = 0
    for start in range(0, len(order), batch_size):
        chunk = [examples[i] for i in order[start : start + batch_size]]
        total += loss_fn.loss_sum(chunk, device).double()
        count += sum(sum(t != IGNORE for t in ex["labels"][1:]) for ex in chunk)
    return float(total.item() / max(count, 1))


# ----------------------------------------------------------------------------- the loop
@dataclass
class RunState:
    step: int
    tokens: int
    start: float
    first_step_s: float | None = None
    last_loss: float | None = None


def train(
    *,
    model,
    tokenizer,
    train_examples,
    eval_examples,
    spec,
    output_dir,
    log,
    resume_from,
    sample: tuple[list[int], int, int | None] | None = None,
) -> dict[str, Any]:
    """Train the peft model in place; returns the run summary (see module docstring).
    `sample` (prompt ids, new tokens, stop id): with the streamed lean setting the summary's
    "sample_ids" is the greedy continuation, computed before the model goes back to the host."""
    start = time.perf_counter()
    ranks = Ranks.current()
    # One schedule for all processes: each step holds every process's micro-batches, as the
    # one-process run accumulates them (grad_accum is per process, fitted by train.py).
    spec = {
        **spec,
        "train": {**spec["train"], "grad_accum": spec["train"]["grad_accum"] * ranks.world},
    }
    train_cfg, seed = spec["train"], spec["job"]["seed"]
    settings = Settings.choose(model, spec)
    if settings.lean and settings.device.type == "cuda":  # fewer, growable segments: less waste
        torch.cuda.memory._set_allocator_settings("expandable_segments:True")
    decoder, path = build_decoder(model, spec, settings, train_examples)
    if decoder is None and settings.stream:  # the generic path trains the model where it is
        model.to(settings.device)
    print(f"qlc fast engine: {path}", flush=True)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    loss_fn = (
        FastLoss(model, decoder)
        if decoder is not None
        else GenericLoss(model, pad_id, settings.dtype)
    )
    optimizer = make_optimizer(model, train_cfg, settings)
    lengths = [len(ex["input_ids"]) for ex in train_examples]
    schedule = step_schedule(lengths, train_cfg, seed)
    from transformers import get_scheduler

    scheduler = get_scheduler(
        train_cfg["lr_scheduler"],
        optimizer,
        num_warmup_steps=warmup_steps(len(schedule), train_cfg),
        num_training_steps=len(schedule),
    )
    first = load_checkpoint(model, optimizer, scheduler, resume_from) if resume_from else 0
    loss_fn.after_step()  # compute-dtype copies of the (restored) adapter
    state = RunState(step=first, tokens=0, start=start)
    try:
        _loop(
            model,
            loss_fn,
            optimizer,
            scheduler,
            schedule,
            train_examples,
            eval_examples,
            spec,
            settings,
            state,
            output_dir,
            log,
            ranks,
        )
        train_seconds = time.perf_counter() - start
        loss_fn.train(False)
        eval_loss = evaluate(loss_fn, eval_examples, train_cfg["batch_size"], settings.device)
        summary = _summary(state, train_seconds, eval_loss, settings, path)
        if sample is not None and decoder is not None and decoder.stream is not None:
            summary["sample_ids"] = decoder.greedy(*sample)
    finally:
        loss_fn.train(True)
        if decoder is not None:
            decoder.release()
    return summary


class StepProfiler:
    """QLC_FAST_PROFILE_STEPS=N: torch.profiler over N steps after 10 warm ones, printed as a
    table of where the time goes (off by default; it syncs and slows those steps)."""

    def __init__(self, steps: int, device: torch.device) -> None:
        self.steps, self.device, self.active = steps, device, None
        self.first = 10

    def after_step(self, step: int) -> None:
        if not self.steps:
            return
        if step == self.first:
            from torch.profiler import ProfilerActivity, profile

            activities = [ProfilerActivity.CPU]
            if self.device.type == "cuda":
                activities.append(ProfilerActivity.CUDA)
            self.active = profile(activities=activities)
            self.active.__enter__()
            self.began = time.perf_counter()
        elif step == self.first + self.steps and self.active is not None:
            _sync(self.device)
            seconds = time.perf_counter() - self.began
            self.active.__exit__(None, None, None)
            events = self.active.key_averages()
            gpu_us = sum(e.self_device_time_total for e in events if e.device_type.name == "CUDA")
            print(
                f"qlc fast engine profile: GPU kernels busy {gpu_us / 1e6:.3f} s of "
                f"{seconds:.3f} s wall over {self.steps} steps",
                flush=True,
            )
            cpu = events.table(
                sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60
            )
            print(f"qlc fast engine profile, by host time:\n{cpu}", flush=True)
            key = "self_cuda_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
            table = events.table(sort_by=key, row_limit=30, max_name_column_width=60)
            print(
                f"qlc fast engine profile: {self.steps} steps in {seconds:.3f} s\n{table}",
                flush=True,
            )
            self.active = None


class Reporter:
    """Logging without stalls: a logging step's numbers are read back one logging step later,
    once the GPU has finished them, so the host never waits for work it just queued."""

    def __init__(self, device: torch.device, log, n_steps: int, per_epoch: int, start: float):
        self.device, self.log, self.n_steps, self.per_epoch = device, log, n_steps, per_epoch
        self.start, self.window_start = start, time.perf_counter()
        self.window_loss = torch.zeros((), device=device)
        self.window_steps = self.window_tokens = 0
        self.pending: tuple[dict, torch.Tensor, torch.Tensor, Any] | None = None
        self.last_loss: float | None = None

    def add(self, step_loss: torch.Tensor, tokens: int) -> None:
        self.window_loss += step_loss
        self.window_steps += 1
        self.window_tokens += tokens

    def close_window(self, record: dict, grad_norm: torch.Tensor) -> None:
        record["tokens_in_window"] = self.window_tokens
        loss = self.window_loss / self.window_steps
        event = torch.cuda.Event() if self.device.type == "cuda" else None
        if event is not None:
            event.record()
        self.flush()
        self.pending = (record, loss, grad_norm.detach().clone(), event)
        self.window_loss = torch.zeros((), device=self.device)
        self.window_steps = self.window_tokens = 0

    def flush(self) -> None:
        if self.pending is None:
            return
        record, loss, grad_norm, event = self.pending
        self.pending = None
        if event is not None:
            event.synchronize()  # the logged step only; later steps keep running
        now = time.perf_counter()
        self.last_loss = float(loss.item())
        tokens = record.pop("tokens_in_window")
        record.update(
            loss=self.last_loss,
            grad_norm=float(grad_norm.item()),
            tokens_per_s=tokens / max(now - self.window_start, 1e-9),
            elapsed_s=now - self.start,
            **_memory(self.device),
        )
        self.window_start = now
        self.log(record)


def _loop(
    model,
    loss_fn,
    optimizer,
    scheduler,
    schedule,
    examples,
    eval_examples,
    spec,
    settings,
    state: RunState,
    output_dir,
    log,
    ranks: Ranks,
) -> None:
    train_cfg = spec["train"]
    params = [p for p in model.parameters() if p.requires_grad]
    device, max_norm = settings.device, train_cfg["max_grad_norm"]
    per_epoch = steps_per_epoch(len(examples), train_cfg["batch_size"], train_cfg["grad_accum"])
    reporter = Reporter(device, log, len(schedule), per_epoch, state.start)
    profiler = StepProfiler(int(os.environ.get("QLC_FAST_PROFILE_STEPS") or 0), device)
    grad_norm = torch.zeros((), device=device)
    loss_fn.train(True)
    for step in range(state.step, len(schedule)):
        micro = [[examples[i] for i in mb] for mb in schedule[step]]
        n_targets = sum(sum(t != IGNORE for t in ex["labels"][1:]) for mb in micro for ex in mb)
        step_loss = torch.zeros((), device=device)
        for batch in ranks.mine(micro):
            loss = loss_fn.loss_sum(batch, device) / max(n_targets, 1)
            loss.backward()
            loss_fn.after_backward()
            step_loss += loss.detach()
        ranks.sum_grads(params)
        ranks.sum(step_loss)
        if max_norm > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
        optimizer.step()
        loss_fn.after_step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        tokens = sum(len(ex["input_ids"]) for mb in micro for ex in mb)
        state.tokens += tokens
        reporter.add(step_loss, tokens)
        state.step = step + 1
        if state.first_step_s is None:
            _sync(device)
            state.first_step_s = time.perf_counter() - state.start
        profiler.after_step(state.step)
        if state.step % train_cfg["logging_steps"] == 0 or state.step == len(schedule):
            record = {
                "step": state.step,
                "max_steps": len(schedule),
                "epoch": state.step / per_epoch,
                "lr": scheduler.get_last_lr()[0],
                "tokens": state.tokens,
            }
            reporter.close_window(record, grad_norm)
        if _eval_or_save_due(train_cfg, state.step, len(schedule)):
            reporter.flush()
            _maybe_eval_and_save(
                model,
                loss_fn,
                optimizer,
                scheduler,
                eval_examples,
                spec,
                settings,
                state,
                output_dir,
                log,
                len(schedule),
                ranks,
            )
    reporter.flush()
    state.last_loss = reporter.last_loss


def _eval_or_save_due(train_cfg: dict[str, Any], step: int, n_steps: int) -> bool:
    evals = train_cfg.get("eval_steps") and step % train_cfg["eval_steps"] == 0
    saves = train_cfg.get("save_steps") and step % train_cfg["save_steps"] == 0 and step < n_steps
    return bool(evals or saves)


def _maybe_eval_and_save(
    model,
    loss_fn,
    optimizer,
    scheduler,
    eval_examples,
    spec,
    settings,
    state,
    output_dir,
    log,
    n_steps,
    ranks: Ranks,
) -> None:
    train_cfg = spec["train"]
    if train_cfg.get("eval_steps") and state.step % train_cfg["eval_steps"] == 0:
        loss_fn.train(False)
        value = evaluate(loss_fn, eval_examples, train_cfg["batch_size"], settings.device)
        loss_fn.train(True)
        log({"event": "eval", "step": state.step, "eval_loss": value})
    save = train_cfg.get("save_steps")
    if save and state.step % save == 0 and state.step < n_steps:
        if ranks.rank == 0:  # every process holds the same adapter and optimizer state
            save_checkpoint(
                model,
                optimizer,
                scheduler,
                state.step,
                output_dir,
                train_cfg.get("save_total_limit") or 2,
            )
        ranks.barrier()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _memory(device: torch.device) -> dict[str, int]:
    if device.type != "cuda":
        return {}
    return {
        "memory_allocated": torch.cuda.max_memory_allocated(device),
        "memory_reserved": torch.cuda.max_memory_reserved(device),
    }


def _summary(state: RunState, seconds: float, eval_loss, settings: Settings, path: str) -> dict:
    memory = _memory(settings.device)
    return {
        "weights_streamed": settings.stream,
        "engine": "fast",
        "path": path,
        "memory_setting": "lean" if settings.lean else "standard",
        "train_seconds": seconds,
        "tokens_trained": state.tokens,
        "tokens_per_s": state.tokens / max(seconds, 1e-9),
        "final_loss": state.last_loss,
        "eval_loss": eval_loss,
        "peak_memory_allocated": memory.get("memory_allocated"),
        "peak_memory_reserved": memory.get("memory_reserved"),
        "peak_memory_bytes": memory.get("memory_reserved"),
        "time_to_first_step_s": state.first_step_s,
        "steps": state.step,
    }
