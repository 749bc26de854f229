"""The fast engine's parts on CPU, against the model's own forward on real 4-bit layers: one
packed batch's loss and gradients, the dtypes each computation actually uses, the optimizer
the plan names, and the run-time decisions (recomputation, the generic-path fallback)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fast_support import (
    DTYPES,
    VOCAB,
    adapter,
    load_model,
    make_examples,
    make_plan,
    run_fast,
    save_tiny_llama,
    train_losses,
    with_engine,
)

from qlc.compiler.plan import Plan
from qlc.trainer.fast.decoder import DecoderSetup, FastDecoder
from qlc.trainer.fast.engine import FastLoss
from qlc.trainer.fast.generic import GenericLoss
from qlc.trainer.fast.kernels import Attention
from qlc.trainer.fast.loss import upcast_matmul
from qlc.trainer.fast.optimizer import make_optimizer
from qlc.trainer.fast.path import decide_recompute
from qlc.trainer.fast.precision import Dtypes
from qlc.trainer.fast.schedule import pack, pad
from qlc.trainer.types import Decisions, SampleRequest

torch = pytest.importorskip("torch")
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

CPU = torch.device("cpu")
MOMENTS = {"state1", "state2", "exp_avg", "exp_avg_sq", "exp_avg_sq_row", "exp_avg_sq_col"}
R = 8  # the LoRA rank of fast_support.spec


def decoder_for(model: Any, plan: Plan, recompute: bool = False) -> FastDecoder:
    engine = plan.train.engine
    setup = DecoderSetup(
        device=CPU,
        dtypes=Dtypes.of(engine.precision),
        base_weights=engine.base_weights,
        chunked_loss=engine.loss == "chunked",
        attention=Attention(None),
        head_matmul=upcast_matmul,
    )
    decoder = FastDecoder(model, setup)
    decoder.recompute = recompute
    return decoder


def reference_loss(model: Any, examples: list[Any]) -> Any:
    batch = pad(examples, 0, CPU)
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    return torch.nn.functional.cross_entropy(
        logits.float().flatten(0, 1), batch.targets.flatten(), reduction="sum"
    )


def grads(model: Any) -> dict[str, Any]:
    found = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return found


@pytest.mark.parametrize(
    ("base_weights", "lean"), [("dequantized", False), ("4bit", True), ("streamed", True)]
)
def test_one_packed_batch_has_the_models_loss_and_gradients(
    tiny_dir: Path, base_weights: str, lean: bool
) -> None:
    """The sharp check, before any optimizer: the summed loss and every adapter gradient of
    one packed batch (lean: chunked loss, every layer recomputed)."""
    plan = with_engine(make_plan(memory="lean" if lean else "standard"), base_weights=base_weights)
    examples = make_examples(4, seed=11)
    model = load_model(tiny_dir, plan, b_std=0.2)  # adapters that move the output visibly
    expected = reference_loss(model, examples)
    expected.backward()
    expected_grads = grads(model)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}

    decoder = decoder_for(model, plan, recompute=lean)
    loss = decoder.loss_sum(pack(examples, CPU))
    loss.backward()
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    for name, got in grads(model).items():
        error = float((got - expected_grads[name]).norm() / expected_grads[name].norm())
        assert error < 1e-4, f"{name}: gradient differs by {error:.2e}"
    assert (decoder.stream is not None) == (base_weights == "streamed")
    assert (decoder.weight_bytes() > 0) == (base_weights == "dequantized")
    decoder.release()
    for name, param in model.named_parameters():
        assert torch.equal(param.detach(), weights[name]), f"{name} changed or moved"


class MatmulLog(TorchDispatchMode):
    """Every matrix product dispatched: (kind, operand dtypes, output dtype). A product is the
    adapter's when one of its dimensions is the LoRA rank, the head's when one is the
    vocabulary, else the base's; attention is logged with its input dtype."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, tuple[Any, ...], Any]] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        name = func.__name__.split(".")[0]
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if name in ("mm", "addmm", "gemm_4bit"):
            operands = tensors[-2:] if name == "addmm" else tensors[:2]
            dims = {d for t in operands for d in t.shape}
            kind = "adapter" if R in dims else "head" if VOCAB in dims else "base"
            dtypes = tuple(t.dtype for t in operands[: 1 if name == "gemm_4bit" else 2])
            self.seen.append((kind, dtypes, out.dtype))
        elif "scaled_dot_product" in name:
            self.seen.append(("attention", (tensors[0].dtype,), None))
        return out

    def dtypes(self, kind: str) -> set[Any]:
        return {d for k, operands, _ in self.seen if k == kind for d in operands}

    def outputs(self, kind: str) -> set[Any]:
        return {out for k, _, out in self.seen if k == kind}


PRECISIONS = [  # (base matmul, activations, adapter compute)
    ("float32", "float32", "float32"),
    ("bfloat16", "bfloat16", "float32"),  # compute_dtype bfloat16, mixed_precision "no"
    ("float16", "float16", "float16"),  # fp16 mixed precision
    ("bfloat16", "float32", "bfloat16"),  # each part its own
]


@pytest.mark.parametrize("path", ["dequantized", "4bit", "padded"])
@pytest.mark.parametrize(("base", "activations", "adapter_dtype"), PRECISIONS)
def test_each_computation_uses_the_dtype_the_plan_names(
    tiny_dir: Path, path: str, base: str, activations: str, adapter_dtype: str
) -> None:
    """Forward and backward of one batch, every matrix product logged: the base matmuls take
    base-dtype operands, the LoRA matmuls adapter-dtype ones, attention runs on activations,
    the logits come out in float32; the float32 adapter weights get float32 gradients."""
    precision = {"base_matmul": base, "activations": activations,
                 "adapter_compute": adapter_dtype}  # fmt: skip
    plan = with_engine(make_plan(), precision=precision)
    examples = [
        {"input_ids": list(range(3, 3 + n)), "labels": list(range(3, 3 + n))} for n in (11, 13, 17)
    ]  # fmt: skip   (41 tokens: no dimension is R or VOCAB)
    model = load_model(tiny_dir, plan, dtype=DTYPES[activations])
    log = MatmulLog()
    if path == "padded":
        generic = GenericLoss(model, 0, Dtypes.of(plan.train.engine.precision), False, Decisions())
        with log:
            generic.loss_sum(examples, CPU).backward()
        generic.release()
    else:
        plan = with_engine(plan, base_weights=path)
        loss = FastLoss(decoder_for(model, plan))
        loss.after_step()
        with log:
            loss.loss_sum(examples, CPU).backward()
        loss.after_backward()
    assert log.dtypes("base") == {DTYPES[base]}
    assert log.dtypes("adapter") == {DTYPES[adapter_dtype]}
    assert log.dtypes("attention") == {DTYPES[activations]}
    assert log.outputs("head") == {torch.float32}
    assert {p.grad.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}


def test_16_bit_adapter_copies_follow_the_float32_weights(tiny_dir: Path) -> None:
    plan = with_engine(make_plan(), precision={"adapter_compute": "bfloat16"})
    model = load_model(tiny_dir, plan)
    loss = FastLoss(decoder_for(model, plan))
    loss.after_step()
    loss.loss_sum(make_examples(3, seed=2), CPU).backward()
    loss.after_backward()
    assert all(lora.copies is not None for lora in loss.loras)
    assert all(c.grad is None for lora in loss.loras for c in lora.copies or ())
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                assert p.grad is not None
                p.add_(1.0)
    loss.after_step()
    for lora in loss.loras:
        assert lora.copies is not None and torch.equal(lora.copies[0], lora.A.bfloat16())


@pytest.mark.parametrize(
    ("optimizer", "memory", "expected"),
    [
        ("adamw_torch", "standard", ("AdamW", torch.float32)),
        ("adamw_8bit", "standard", ("AdamW", torch.uint8)),
        ("adamw_torch", "lean", ("AdamW", torch.uint8)),  # lean: 8-bit states (substituted)
        ("sgd", "standard", ("SGD", None)),
        ("adafactor", "standard", ("Adafactor", torch.float32)),
    ],
)
def test_the_optimizer_is_the_one_the_plan_names(
    optimizer: str, memory: str, expected: tuple[str, Any]
) -> None:
    plan = make_plan(optimizer=optimizer, memory=memory, weight_decay=0.1).train.engine.optimizer
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 2))
    decisions = Decisions()
    built = make_optimizer(model, plan, CPU, decisions)
    assert type(built).__name__ == expected[0]
    assert [g["weight_decay"] for g in built.param_groups] == [0.1, 0.0]  # no decay on biases
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    built.step()
    big = built.state[model[0].weight]
    moments = {v.dtype for k, v in big.items() if k in MOMENTS}  # not scales or step counts
    assert moments == ({expected[1]} if expected[1] else set())
    small = [d for d in decisions.entries if d["what"] == "train.engine.optimizer.state_bits"]
    assert bool(small) == (expected[1] == torch.uint8)  # bitsandbytes' 32-bit small tensors


def test_when_short_recomputes_only_when_the_activations_do_not_fit(
    tiny_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rule, on a GPU's free memory (mem_get_info stands in for the GPU here)."""
    plan = with_engine(make_plan(), recompute="when-short")
    model = load_model(tiny_dir, plan)
    examples = make_examples(8, seed=1)
    gpu = torch.device("cuda", 0)
    for free, chosen in ((64 * 2**30, "none"), (2**30, "every-layer")):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda _d, f=free: (f, 80 * 2**30))
        decisions = Decisions()
        assert decide_recompute(model, plan, examples, gpu, decisions) is (chosen != "none")
        (entry,) = decisions.entries
        assert entry["what"] == "train.engine.recompute" and entry["chosen"] == chosen
        assert "GiB free on the GPU" in entry["why"]
    decisions = Decisions()
    assert decide_recompute(model, plan, examples, CPU, decisions) is False
    assert decisions.entries[0]["chosen"] == "none"
    for rule, expected in (("none", False), ("every-layer", True)):
        fixed = with_engine(plan, recompute=rule)
        decisions = Decisions()
        assert decide_recompute(model, fixed, examples, CPU, decisions) is expected
        assert decisions.entries == []  # the plan decided: nothing to record


@pytest.mark.slow
def test_what_the_decoder_does_not_model_trains_on_the_generic_path_recorded(
    tiny_dir: Path, tmp_path: Path
) -> None:
    plan = make_plan(max_steps=2, lora={"target_modules": ["q_proj", "lm_head"]})
    model = load_model(tiny_dir, plan)
    before = adapter(model)
    result, records, decisions = run_fast(model, plan, make_examples(12, seed=9), tmp_path)
    (entry,) = [d for d in decisions.entries if d["what"] == "train.engine.batches"]
    assert entry["chosen"] == "padded" and "LoRA on ['lm_head']" in entry["why"]
    assert [d["what"] for d in decisions.entries if "base_weights" in d["what"]] == [
        "train.engine.base_weights"  # the plan's dequantized copy: the model's 4-bit layers
    ]
    assert len(train_losses(records)) == result.steps == 2
    assert all(not torch.equal(v, before[n]) for n, v in adapter(model).items())


@pytest.mark.slow
def test_tied_embeddings_fall_back_to_the_generic_path(tmp_path: Path) -> None:
    tied = save_tiny_llama(tmp_path / "tied", tie_word_embeddings=True)
    plan = make_plan(max_steps=1)
    model = load_model(tied, plan)
    result, _, decisions = run_fast(model, plan, make_examples(6, seed=9), tmp_path / "out")
    assert result.steps == 1
    reasons = [d["why"] for d in decisions.entries if d["what"] == "train.engine.batches"]
    assert reasons and "tied input and output embeddings" in reasons[0]


def test_streaming_holds_three_layers_and_puts_every_weight_back(tmp_path: Path) -> None:
    """WeightStream's bookkeeping (on CPU the copies are the host tensors themselves): at most
    three layers resident, one fetch per layer in the forward and one in the recomputation
    (the last layer's forward copy is reused), and release() leaves the model as it was."""
    plan = with_engine(make_plan(memory="lean"), base_weights="streamed")
    model = load_model(save_tiny_llama(tmp_path, layers=5, hidden=32), plan)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    decoder = decoder_for(model, plan, recompute=True)
    stream = decoder.stream
    assert stream is not None
    seen: list[list[int]] = []
    get = stream.get
    stream.get = lambda i: (seen.append(sorted(stream.resident)), get(i))[1]  # type: ignore[method-assign]
    decoder.loss_sum(pack(make_examples(3, seed=4), CPU)).backward()
    layers = len(decoder.layers)
    assert stream.fetches == layers + (layers - 2)
    assert max(len(r) for r in seen) <= 3 and len(stream.resident) <= 3
    assert all(part.streamed is None for layer in decoder.layers for part in layer.parts)
    decoder.release()
    for name, param in model.named_parameters():
        assert torch.equal(param.detach(), weights[name]), f"{name} changed or moved"


def test_streamed_sample_is_the_models_greedy_continuation(tiny_dir: Path) -> None:
    plan = with_engine(make_plan(memory="lean"), base_weights="streamed")
    model = load_model(tiny_dir, plan)
    prompt = make_examples(1, seed=8)[0]["input_ids"][:12]
    decoder = decoder_for(model, plan)
    got = decoder.greedy(prompt, 6, stop=None)
    decoder.release()
    with torch.no_grad():
        ids = torch.tensor([prompt])
        for _ in range(6):
            ids = torch.cat([ids, model(input_ids=ids).logits[:, -1:].argmax(-1)], dim=1)
    assert got == ids[0, len(prompt) :].tolist()


@pytest.mark.slow
def test_streamed_run_returns_the_sample(tiny_dir: Path, tmp_path: Path) -> None:
    plan = with_engine(make_plan(memory="lean", max_steps=1), base_weights="streamed")
    model = load_model(tiny_dir, plan)
    request = SampleRequest(prompt_ids=[1, 5, 9, 12], new_tokens=3, stop_id=None)
    result, _, _ = run_fast(model, plan, make_examples(6, seed=1), tmp_path, sample=request)
    assert result.sample_ids is not None and len(result.sample_ids) == 3


@pytest.mark.slow
def test_dropout_runs_are_reproducible(tiny_dir: Path, tmp_path: Path) -> None:
    """Dropout masks come from the job's seed: the same seed twice trains the same adapter
    (and dropout is on: without it the same steps give other losses)."""
    plan = make_plan(max_steps=3, lora={"dropout": 0.1})
    other = make_plan(max_steps=3, lora={"dropout": 0.0})
    runs = []
    for name, run_plan in (("a", plan), ("b", plan), ("c", other)):
        model = load_model(tiny_dir, run_plan)
        _, records, _ = run_fast(model, run_plan, make_examples(18, seed=4), tmp_path / name)
        runs.append((train_losses(records), adapter(model)))
    (losses_a, adapter_a), (losses_b, adapter_b), (losses_c, _) = runs
    assert losses_a == losses_b
    assert all(torch.equal(adapter_a[n], adapter_b[n]) for n in adapter_a)
    assert losses_c[0] != losses_a[0]
