"""The terms of the memory estimate, one builder per engine and memory setting.

Each builder lists what its engine keeps on the GPU at the peak of a training step. The peak
is: what persists (weights, copies, adapter, gradients, optimizer states) + the activations
saved across layers (every layer's, or only layer boundaries when layers are recomputed) +
the larger of the loss phase and one layer's backward (its recomputed activations and the
gradients in flight). Sizes are per token of the worst micro-batch: batch_size x
data.max_length tokens (padded batches reach it; padding-free ones at most reach it).

Sources: templates/train.py.j2 (reference: transformers + peft + trl SFTTrainer, with peft's
prepare_model_for_kbit_training upcasting every non-4-bit weight to float32, so the residual
stream is float32 too) and templates/fast_engine.py (FastDecoder; "lean" is `fast_lean`).
"""

from __future__ import annotations

import math

from qlc.compiler.memory import (
    ALLOCATOR_OVERHEAD,
    CUDA_CONTEXT_BYTES,
    DTYPE_BYTES,
    EIGHT_BIT_MIN,
    FAST_PLAN_MARGIN,
    LEAN_LOSS_CHUNK,
    NESTED_BLOCK,
    OPTIM_BLOCK,
    PAGED_MIN,
    QUANT_BLOCK,
    TRL_TOKEN_TILE,
    TRL_VOCAB_TILE,
    MemoryEstimate,
    Term,
    Workload,
)
from qlc.compiler.shapes import PROJECTIONS, Gpu, ModelShape

FP32 = 4
ROOMY_NOTE = "path assumes a card with room for it; name --gpu to see the engine's choice"


# ----------------------------------------------------------------------------- the settings
def reference(w: Workload, s: ModelShape) -> MemoryEstimate:
    """train.engine = "reference": trl SFTTrainer on padded batches, float32 residual stream
    (4-bit loading), layers recomputed when checkpointing, trl's tiled log-prob head."""
    act = _residual_bytes(w)
    persistent = [
        *_base_weights(w, s),
        _stored_embeddings(w, s),
        *_lora_terms(w, s, copy_bytes=None),
        *_optimizer_terms(w.optimizer, _lora_tensors(w, s)),
    ]
    if w.devices > 1 and w.distributed == "ddp":
        persistent.append(Term("ddp.buckets", _lora_numel(w, s) * FP32, "DDP gradient buckets"))
    layer = _reference_layer_bytes(w, s, act)
    loss = Term(
        "loss.trl_tiles",
        min(w.tokens, TRL_TOKEN_TILE) * min(s.vocab, TRL_VOCAB_TILE) * act
        + 2 * w.tokens * s.hidden * FP32,
        "trl's chunked log-prob head: one logits tile (<= 4096 tokens x <= 32768 vocab) "
        "plus the hidden states it keeps and their float32 gradient",
    )
    working = _working_set(w, s, act, dequant_bytes=0)
    stream = "float32" if act == FP32 else "load-dtype"
    notes = [f"trl SFTTrainer, padded batches, {stream} residual stream"]
    if w.devices > 1 and w.distributed == "fsdp":
        notes.append("FSDP sharding is not modelled: this is one unsharded replica")
    return _assemble(
        _reference_name(w),
        w,
        s,
        persistent,
        _saved_activations(w, s, layer, act, w.checkpointing),
        loss,
        working,
        "reference",
        tuple(notes),
    )


def _reference_name(w: Workload) -> str:
    if not w.upcast:
        return "seed recipe as written (no prepare_model_for_kbit_training)"
    return "reference engine" + (", lean (8-bit optimizer states)" if w.lean else "")


def fast_standard(w: Workload, s: ModelShape, gpu: Gpu | None) -> MemoryEstimate:
    """train.engine = "fast", memory = "standard": a compute-dtype copy of the dequantized base
    and no recomputation when the card has room for both (fast_engine._memory_plan)."""
    c = _compute_bytes(w)
    dequantize, recompute = fast_standard_path(w, s, gpu)
    persistent = _fast_standard_persistent(w, s, c, dequantize)
    layer = _fast_layer_bytes(w, s, c)
    loss = Term(
        "loss.full_logits",
        3 * w.tokens * s.vocab * FP32,
        "full float32 logits, their log-softmax and its gradient (3 x tokens x vocab x 4)",
    )
    largest = 0 if dequantize else max(a * b for a, b in map(s.projection, PROJECTIONS)) * c
    working = _working_set(w, s, c, dequant_bytes=largest)
    path = ("dequantized base" if dequantize else "4-bit base") + (
        ", recompute per layer" if recompute else ", no recomputation"
    )
    notes: tuple[str, ...] = () if gpu else (ROOMY_NOTE,)
    if w.devices > 1:
        notes += ("data parallel: every GPU holds this (a whole model per process)",)
    return _assemble(
        f"fast engine, standard memory ({path})",
        w,
        s,
        persistent,
        _saved_activations(w, s, layer, c, recompute),
        loss,
        working,
        "fast",
        notes,
    )


def _fast_standard_persistent(w: Workload, s: ModelShape, c: int, dequantize: bool) -> list[Term]:
    persistent = [
        *_base_weights(w, s),
        _stored_embeddings(w, s),
        Term(
            "fast.embeddings_head_copies",
            (s.embedding_params + s.norm_params) * c,
            "compute-dtype copies of the embeddings, lm_head and norms",
        ),
        *_lora_terms(w, s, copy_bytes=c),
        *_optimizer_terms(w.optimizer, _lora_tensors(w, s)),
    ]
    if dequantize:
        persistent.append(
            Term("fast.dequantized_base", s.linear_params * c, "the dequantized base weights, kept")
        )
    return persistent


def fast_standard_path(w: Workload, s: ModelShape, gpu: Gpu | None) -> tuple[bool, bool]:
    """(dequantize, recompute) as fast_engine._memory_plan picks them from free memory after
    loading. Without a GPU named: the roomy path (dequantize, no recomputation)."""
    if gpu is None:
        return True, False
    loaded = sum(t.bytes for t in (*_base_weights(w, s), _stored_embeddings(w, s)))
    free = gpu.memory_bytes - CUDA_CONTEXT_BYTES - loaded - _lora_numel(w, s) * FP32
    activations = (14 * s.hidden + 5 * s.intermediate) * 2 * s.layers * w.tokens
    dense = s.linear_params * _compute_bytes(w)
    if dense + activations + FAST_PLAN_MARGIN <= free:
        return True, False
    if dense + activations // s.layers * 2 + FAST_PLAN_MARGIN <= free:
        return True, True
    return False, activations + FAST_PLAN_MARGIN > free


# LEAN SETTING: its terms live here and nowhere else.
STREAM_WINDOW = 3  # layers of packed weights on the GPU: in use, prefetched, freed-but-pending


def fast_lean(w: Workload, s: ModelShape) -> MemoryEstimate:
    """train.engine = "fast", memory = "lean": every layer recomputed, loss in checkpointed
    chunks, paged 8-bit optimizer states. On a GPU the 4-bit base is streamed from pinned host
    memory one layer at a time (fast_engine.WeightStream) and the embeddings stay in host
    memory; on CPU the base is dequantized per matmul where it is."""
    c = _compute_bytes(w)
    streamed = w.lean and w.gpus > 0  # compact keeps the 4-bit base on the GPU
    if streamed:
        base = [
            Term(
                "lean.streamed_base_window",
                sum(t.bytes for t in _base_weights(w, s)) * STREAM_WINDOW // s.layers,
                f"{STREAM_WINDOW} decoder layers of packed weights and scales on the GPU "
                "(the rest in pinned host memory)",
            ),
            Term(
                "lean.head_norms_copy",
                (s.vocab * s.hidden + s.norm_params) * c,
                "compute-dtype copy of lm_head and the norms (embeddings looked up on the host)",
            ),
        ]
    else:
        base = [*_base_weights(w, s), _stored_embeddings(w, s)]
    persistent = [
        *base,
        *_lora_terms(w, s, copy_bytes=c),
        *_optimizer_terms(w.optimizer, _lora_tensors(w, s)),
    ]
    chunk = min(w.tokens, LEAN_LOSS_CHUNK)
    head = _stored_dtype_bytes(w)
    loss = Term(
        "loss.chunked",
        3 * chunk * s.vocab * max(head, FP32) + w.tokens * s.hidden * FP32,
        f"one recomputed loss chunk ({chunk} tokens): logits, log-softmax, gradient; "
        "plus the hidden states' gradient",
    )
    if streamed:  # a recomputed layer keeps every dequantized weight for its backward
        dequant = sum(a * b for a, b in map(s.projection, PROJECTIONS)) * c
    else:
        dequant = max(a * b for a, b in map(s.projection, PROJECTIONS)) * c
    working = _working_set(w, s, c, dequant_bytes=dequant)
    layer = _fast_layer_bytes(w, s, c)
    where = "4-bit base streamed from host memory" if streamed else "4-bit base"
    return _assemble(
        f"fast engine, {w.memory} memory ({where}, recompute per layer, chunked loss)",
        w,
        s,
        persistent,
        _saved_activations(w, s, layer, c, True),
        loss,
        working,
        "lean",
        (),
    )


# ----------------------------------------------------------------------------- assembling
def _assemble(
    setting: str,
    w: Workload,
    s: ModelShape,
    persistent: list[Term],
    saved: tuple[list[Term], list[Term]],
    loss: Term,
    working: list[Term],
    overhead_key: str,
    notes: tuple[str, ...],
) -> MemoryEstimate:
    """Persistent + activations kept across layers + the larger of the loss phase and one
    layer's backward (its recomputed tensors and the gradients in flight), plus the
    allocator's reserve over what it hands out."""
    kept, layer_phase = saved
    layer_phase = [*layer_phase, *working]
    phase = layer_phase if sum(t.bytes for t in layer_phase) >= loss.bytes else [loss]
    terms = [*persistent, *kept, *phase]
    pooled = sum(t.bytes for t in terms if t.in_pool)
    fraction = ALLOCATOR_OVERHEAD[overhead_key]
    terms.append(
        Term(
            "allocator.overhead",
            round(pooled * fraction),
            f"reserved over allocated at the peak ({fraction:.1%}, measured for this engine)",
        )
    )
    extra = ("CPU run (runtime.gpus = 0): the figures are for one GPU",) if w.gpus == 0 else ()
    return MemoryEstimate(setting, s, w.tokens, tuple(terms), notes + extra)


def _saved_activations(
    w: Workload, s: ModelShape, per_token_layer: int, act: int, recompute: bool
) -> tuple[list[Term], list[Term]]:
    """(kept through the step, alive only while one layer's backward runs)."""
    if recompute:
        boundaries = Term(
            "activations.layer_boundaries",
            (s.layers + 1) * w.tokens * s.hidden * act,
            f"each layer's input kept for recomputation ({s.layers + 1} x tokens x hidden)",
        )
        layer = Term(
            "activations.recomputed_layer",
            per_token_layer * w.tokens,
            f"one layer's saved tensors while its backward runs ({per_token_layer} bytes/token)",
        )
        return [boundaries], [layer]
    every = Term(
        "activations.all_layers",
        per_token_layer * w.tokens * s.layers + w.tokens * s.hidden * act,
        f"every layer's saved tensors ({per_token_layer} bytes per token per layer)",
    )
    return [every], []


def _working_set(w: Workload, s: ModelShape, act: int, dequant_bytes: int) -> list[Term]:
    terms = [
        Term(
            "backward.gradients_in_flight",
            (3 * s.intermediate + 2 * s.hidden) * act * w.tokens,
            "gradients of one layer's MLP and residual stream during its backward",
        )
    ]
    if dequant_bytes:
        terms.append(
            Term(
                "backward.dequantized_weight",
                dequant_bytes,
                "largest projection dequantized for a matmul",
            )
        )
    return terms


# ----------------------------------------------------------------------------- weights
def _compute_bytes(w: Workload) -> int:
    """Fast engine: float32 when asked, else bf16 (or float16 on cards without bf16)."""
    return FP32 if w.compute_dtype == "float32" else 2


def _stored_dtype_bytes(w: Workload) -> int:
    """Non-4-bit weights: float32 after prepare_model_for_kbit_training, else the load dtype."""
    return FP32 if w.load_in_4bit and w.upcast else DTYPE_BYTES[w.compute_dtype]


def _residual_bytes(w: Workload) -> int:
    return _stored_dtype_bytes(w)


def _base_weights(w: Workload, s: ModelShape) -> list[Term]:
    n = s.linear_params
    if not w.load_in_4bit:
        size = DTYPE_BYTES[w.compute_dtype]
        return [Term("base.weights", n * size, f"decoder projections in {w.compute_dtype}")]
    blocks = math.ceil(n / QUANT_BLOCK)
    if w.double_quant:
        state = blocks + math.ceil(blocks / NESTED_BLOCK) * FP32
        how = "8-bit absmax per 64 weights + float32 per 256 of those (double quantization)"
    else:
        state, how = blocks * FP32, "float32 absmax per 64 weights"
    return [
        Term("base.weights_4bit", n // 2, f"{n:,} decoder projection weights packed 2 per byte"),
        Term("base.quant_state", state, how),
    ]


def _stored_embeddings(w: Workload, s: ModelShape) -> Term:
    size = _stored_dtype_bytes(w)
    upcast = w.load_in_4bit and w.upcast
    why = "float32 (prepare_model_for_kbit_training upcasts them)" if upcast else w.compute_dtype
    return Term(
        "base.embeddings_head_norms",
        (s.embedding_params + s.norm_params) * size,
        f"embeddings, lm_head and norms in {why}",
    )


# ----------------------------------------------------------------------------- adapter, optimizer
def _lora_tensors(w: Workload, s: ModelShape) -> list[int]:
    """Element counts of every LoRA matrix (A: r x in, B: out x r), per layer and projection."""
    shapes = [s.projection(m) for m in w.targets]
    rank: int = w.lora_r
    layers: int = s.layers
    return [n for a, b in shapes for n in (rank * a, b * rank)] * layers


def _lora_numel(w: Workload, s: ModelShape) -> int:
    return sum(_lora_tensors(w, s))


def _lora_terms(w: Workload, s: ModelShape, copy_bytes: int | None) -> list[Term]:
    """float32 LoRA weights and gradients; the fast engine also keeps compute-dtype copies,
    whose gradients are the ones alive during the backward."""
    n, size = _lora_numel(w, s), int(w.lora_bytes)
    dtype = "float32" if size == FP32 else "bf16 (trl's cast)"
    terms = [Term("lora.weights", n * size, f"{n:,} LoRA weights in {dtype}")]
    if copy_bytes is None or copy_bytes == size:
        terms.append(Term("lora.gradients", n * size, f"{dtype} gradients"))
        return terms
    terms.append(
        Term("lora.compute_copies", n * copy_bytes, "compute-dtype copies used by the forward")
    )
    terms.append(
        Term(
            "lora.gradients", n * copy_bytes, "gradients of the copies (handed back after backward)"
        )
    )
    return terms


def _optimizer_terms(name: str, tensors: list[int]) -> list[Term]:
    if name == "sgd":
        return []
    if name == "adafactor":  # factored second moment: a row and a column vector per matrix
        size = sum(2 * math.isqrt(n) for n in tensors) * FP32
        return [Term("optimizer.states", size, "Adafactor factored states (approximate)")]
    paged = name.startswith("paged")
    eight = name.endswith("8bit")
    pooled = outside = 0
    for n in tensors:
        per = (2 + 2 * FP32 / OPTIM_BLOCK) if eight and n >= EIGHT_BIT_MIN else 2 * FP32
        if paged and n >= PAGED_MIN:
            outside += round(n * per)
        else:
            pooled += round(n * per)
    kind = f"{'8' if eight else '32'}-bit AdamW states ({name})"
    terms = [Term("optimizer.states", pooled, kind)] if pooled else []
    if outside:
        terms.append(
            Term(
                "optimizer.paged_states", outside, kind + ": paged (unified memory)", in_pool=False
            )
        )
    return terms


# ----------------------------------------------------------------------------- activations
def _lora_saved(w: Workload, s: ModelShape, size: int, shared: dict[str, int]) -> int:
    """Bytes per token the adapters save: each A's output; with dropout, each adapter's dropped
    input and mask; without, each distinct input not already saved (`shared`: input -> bytes)."""
    total = 0
    for m in w.targets:
        width, _ = s.projection(m)
        total += w.lora_r * size
        if w.lora_dropout > 0:
            total += width * size + width  # dropped input + bool mask
    if w.lora_dropout == 0:
        inputs = {_input_of(m) for m in w.targets}
        total += sum(shared[i] for i in inputs)
    return total


def _input_of(module: str) -> str:
    """Which tensor feeds a projection (q, k and v share one; gate and up share one)."""
    inputs = {"q_proj": "attn_norm", "k_proj": "attn_norm", "v_proj": "attn_norm"}
    inputs |= {"o_proj": "attn_out", "gate_proj": "mlp_norm", "up_proj": "mlp_norm"}
    inputs |= {"qkv_proj": "attn_norm", "gate_up_proj": "mlp_norm"}
    return inputs.get(module, "mlp_product")


def _attention_saved(s: ModelShape, size: int) -> int:
    """q, k, v and the output kept by flash / memory-efficient attention; k and v are
    expanded to every query head first when the model groups them."""
    q, kv = s.heads * s.head_size, s.kv_heads * s.head_size
    kv_kept = q if kv != q else kv
    return int((2 * q + 2 * kv_kept) * size + FP32 * s.heads)


def _fast_layer_bytes(w: Workload, s: ModelShape, c: int) -> int:
    """FastDecoder._block: RMSNorm inputs, attention's q/k/v/out, SwiGLU's gate|up and silu(gate),
    the adapters' inputs. Frozen projections save nothing (their weights need no gradient)."""
    h, i = s.hidden, s.intermediate
    shared = {"attn_norm": h * c, "attn_out": 0, "mlp_norm": h * c, "mlp_product": i * c}
    return int(2 * h * c + _attention_saved(s, c) + 3 * i * c + _lora_saved(w, s, c, shared))


def _reference_layer_bytes(w: Workload, s: ModelShape, r: int) -> int:
    """transformers' LlamaDecoderLayer with peft LoRA on bitsandbytes 4-bit layers: the same
    tensors as the fast engine, in the residual dtype (4-bit matmuls cast back to it), plus the
    attention output made contiguous for o_proj."""
    h, i, q = s.hidden, s.intermediate, s.heads * s.head_size
    shared = {"attn_norm": h * r, "attn_out": q * r, "mlp_norm": h * r, "mlp_product": i * r}
    lora = _lora_saved(w, s, int(w.lora_bytes), shared)  # peft casts inputs to the LoRA dtype
    return int(2 * h * r + _attention_saved(s, r) + 3 * i * r + lora)
