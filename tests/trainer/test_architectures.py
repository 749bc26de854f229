"""Each architecture a spec can name, proven on CPU with its tiny smoke model (the features that
set it apart: Llama 3's rope scaling, Qwen 3's head_dim and query/key norms, Gemma 2's
soft-capping and sliding window, Gemma 3's sliding layers, tied embeddings, Phi-3's fused
projections): the reference engine and the fast engine train it in 4 bits (the loss falls,
every gradient norm is finite), the adapter loads onto the base in plain peft and changes its
outputs, and the memory estimate's shape read from its config.json counts exactly the
parameters transformers builds."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from data_support import TINY_DATA, plan_of

from qlc import contract
from qlc.compiler.plan import Plan
from qlc.compiler.settle import MODEL_TYPES
from qlc.compiler.shapes import PROJECTIONS, shape_from_config
from qlc.trainer.model import SMOKE_ARCHITECTURES, smoke_config

ARCHITECTURES = sorted(MODEL_TYPES)
FUSED = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")  # Phi-3's projections
Trained = tuple[Path, list[dict[str, Any]]]  # the run's folder, its training steps' records
TRAIN = (
    '[quantization]\ncompute_dtype = "float32"\n[lora]\nr = 8\nalpha = 16\ndropout = 0.0\n'
    'target_modules = "all-linear"\n[train]\nmax_steps = 10\nbatch_size = 4\n'
    'learning_rate = 5e-2\nlr_scheduler = "constant"\noptimizer = "adamw_torch"\n'
    "logging_steps = 1\n[runtime]\ngpus = 0\n"
)


def arch_plan(architecture: str, engine: str = "reference") -> Plan:
    head = f'[job]\nname = "t"\nseed = 5\n[model]\npath = "m"\narchitecture = "{architecture}"\n'
    train = TRAIN.replace("[train]\n", f'[train]\nengine = "{engine}"\n')
    return plan_of('path = "d.jsonl"\nformat = "text"\nmax_length = 64', train, head=head)


def test_every_architecture_has_a_tiny_model_of_its_own_type() -> None:
    assert sorted(SMOKE_ARCHITECTURES) == ARCHITECTURES
    for architecture in ARCHITECTURES:
        assert smoke_config(architecture).model_type in MODEL_TYPES[architecture]
    assert smoke_config("llama3").rope_parameters["rope_type"] == "llama3"
    gemma2 = smoke_config("gemma2")
    assert gemma2.attn_logit_softcapping and gemma2.final_logit_softcapping
    assert gemma2.sliding_window == 16 and gemma2.tie_word_embeddings
    assert "sliding_attention" in smoke_config("gemma3").layer_types


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_the_shape_from_config_counts_the_parameters_transformers_builds(
    architecture: str,
) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    config = smoke_config(architecture)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    shape = shape_from_config(config.to_dict(), "config.json")
    named = dict(model.named_parameters())
    linear = sum(p.numel() for n, p in named.items() if n.endswith("proj.weight"))
    norms = sum(p.numel() for n, p in named.items() if "norm" in n)
    embeddings = sum(p.numel() for n, p in named.items() if "embed" in n or "lm_head" in n)
    bias = sum(p.numel() for n, p in named.items() if n.endswith("proj.bias"))
    assert shape.linear_params == linear and shape.norm_params == norms
    assert shape.embedding_params == embeddings  # one matrix when tied
    assert sum(p.numel() for p in named.values()) == linear + norms + embeddings + bias
    assert shape.tied_embeddings == config.tie_word_embeddings


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_the_memory_estimate_reads_each_architecture_s_config(architecture: str) -> None:
    from qlc.compiler.memory import estimate

    shape = shape_from_config(smoke_config(architecture).to_dict(), "config.json")
    terms = {t.key: t for t in estimate(arch_plan(architecture), shape).terms}
    lora = arch_plan(architecture).lora
    weights = shape.layers * sum(
        lora.r * (a + b) for a, b in map(shape.projection, FUSED if architecture == "phi3"
                                         else PROJECTIONS))  # fmt: skip
    assert terms["lora.weights"].bytes == weights * 4  # float32, on the model's own modules


def test_a_multimodal_gemma3_config_is_read_from_its_text_config() -> None:
    text = smoke_config("gemma3").to_dict()
    text.pop("tie_word_embeddings")  # transformers' default for Gemma: tied
    shape = shape_from_config({"model_type": "gemma3", "text_config": text}, "config.json")
    assert shape.tied_embeddings and shape.head_size == 32 and shape.norms_per_layer == 4


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Trained]:
    """Every architecture's tiny model trained once by the reference engine: its folder (the
    smoke model in model/, the adapter in .adapter.partial/) and its metrics records."""
    return {arch: train_tiny(arch, tmp_path_factory.mktemp(arch)) for arch in ARCHITECTURES}


@pytest.fixture(scope="module")
def trained_fast(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Trained, Any]]:
    """Every architecture's tiny model trained once by the fast engine: (its folder and
    training records, the engine's recorded decisions)."""
    return {arch: train_tiny_fast(arch, tmp_path_factory.mktemp(f"fast-{arch}"))
            for arch in ARCHITECTURES}  # fmt: skip


def train_tiny_fast(architecture: str, out: Path) -> tuple[Trained, Any]:
    from qlc.trainer import fast
    from qlc.trainer.examples import prepare
    from qlc.trainer.model import build_smoke_model, load_model, load_tokenizer
    from qlc.trainer.types import Decisions, MetricsLog, StopFlag

    plan = arch_plan(architecture, engine="fast")
    rows = [json.loads(line) for line in TINY_DATA.read_text().splitlines()[:4]]
    source = build_smoke_model(plan, rows, out / "model")
    tokenizer = load_tokenizer(plan, source)
    examples = prepare(rows, plan.data, tokenizer, "tiny", "train").examples
    model = load_model(plan, source, use_cpu=True, local_rank=0, world_size=1)
    log, decisions = MetricsLog(out / contract.METRICS_FILE, enabled=True), Decisions()
    fast.train(model=model, pad_id=int(tokenizer.pad_token_id), train_examples=examples,
               eval_examples=[], plan=plan, plan_sha256="0" * 64, out=out, log=log,
               decisions=decisions, stop=StopFlag(), resume_from=None, sample=None)  # fmt: skip
    records = [json.loads(line) for line in (out / contract.METRICS_FILE).read_text().splitlines()]
    return (out, [r for r in records if r.get("event") == "train"]), decisions


def train_tiny(architecture: str, out: Path) -> Trained:
    from qlc.trainer import reference
    from qlc.trainer.examples import prepare
    from qlc.trainer.model import build_smoke_model, load_model, load_tokenizer
    from qlc.trainer.observe import Observer
    from qlc.trainer.types import Decisions, MetricsLog, StopFlag

    plan = arch_plan(architecture)
    rows = [json.loads(line) for line in TINY_DATA.read_text().splitlines()[:4]]
    source = build_smoke_model(plan, rows, out / "model")
    tokenizer = load_tokenizer(plan, source)
    examples = prepare(rows, plan.data, tokenizer, "tiny", "train").examples
    model = load_model(plan, source, use_cpu=True, local_rank=0, world_size=1)
    log = MetricsLog(out / contract.METRICS_FILE, enabled=True)
    reference.train(
        model=model,
        tokenizer=tokenizer,
        train_examples=examples,
        eval_examples=[],
        plan=plan,
        plan_sha256="0" * 64,
        out=out,
        log=log,
        decisions=Decisions(),
        stop=StopFlag(),
        resume_from=None,
        use_cpu=True,
        world_size=1,
        observer=Observer(plan.lora.r, int(model.get_base_model().config.vocab_size)),
    )
    records = [json.loads(line) for line in (out / contract.METRICS_FILE).read_text().splitlines()]
    return out, [r for r in records if r.get("event") == "train"]


@pytest.mark.slow
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_the_reference_engine_trains_each_architecture(
    architecture: str, trained: dict[str, Trained]
) -> None:
    _, steps = trained[architecture]
    losses = [step["loss"] for step in steps]
    assert [step["step"] for step in steps] == list(range(1, 11))
    assert all(math.isfinite(step["grad_norm"]) and step["grad_norm"] > 0 for step in steps)
    # the same four examples every step: a random model falls from ln(512) = 6.24 towards the
    # examples' token distribution (its frozen random head keeps it far from zero)
    assert sum(losses[-3:]) / 3 < losses[0] - 0.1 and losses[-1] < losses[0], losses


@pytest.mark.slow
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_the_fast_engine_trains_each_architecture(
    architecture: str, trained_fast: dict[str, tuple[Trained, Any]]
) -> None:
    """The fast engine takes its padding-free decoder where it models the architecture and the
    model's own forward where settle says it does not (recorded): either way the loss falls."""
    from qlc.compiler.settle import FAST_UNMODELLED

    (_, steps), _ = trained_fast[architecture]
    losses = [step["loss"] for step in steps]
    assert [step["step"] for step in steps] == list(range(1, 11))
    assert all(math.isfinite(step["grad_norm"]) and step["grad_norm"] > 0 for step in steps)
    assert sum(losses[-3:]) / 3 < losses[0] - 0.1 and losses[-1] < losses[0], losses
    plan = arch_plan(architecture, engine="fast")
    assert (architecture in FAST_UNMODELLED) == (plan.engine.batches == "padded"), plan.engine


@pytest.mark.slow
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_the_fast_engine_follows_the_reference_path(
    architecture: str,
    trained: dict[str, Trained],
    trained_fast: dict[str, tuple[Trained, Any]],
) -> None:
    """The same model, examples and adapter start: step 1 (B = 0) is the base's loss in both
    engines; later steps drift only as the two engines' arithmetic does at a learning rate of
    5e-2. Measured: step 1 equal to 1e-6 relative, every step within 1.4% over 10 steps
    (Gemma 2's soft-capped path the farthest). Bounds 1e-4 and 4%."""
    reference = [step["loss"] for step in trained[architecture][1]]
    fast = [step["loss"] for step in trained_fast[architecture][0][1]]
    assert abs(fast[0] - reference[0]) / reference[0] <= 1e-4, (reference, fast)
    gaps = [abs(f - r) / r for f, r in zip(fast, reference, strict=True)]
    assert max(gaps) <= 0.04, (reference, fast)


@pytest.mark.slow
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_the_adapter_loads_in_plain_peft_and_changes_the_outputs(
    architecture: str, trained: dict[str, Trained]
) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    out, _ = trained[architecture]
    adapter = out / contract.ADAPTER_STAGING_DIR
    config = json.loads((adapter / "adapter_config.json").read_text())
    fused = architecture == "phi3"
    expected = {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"} if fused else set(PROJECTIONS)
    assert {name.rsplit(".", 1)[-1] for name in config["target_modules"]} == expected
    quant = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    base = AutoModelForCausalLM.from_pretrained(
        out / "model", quantization_config=quant, dtype=torch.float32
    )
    ids = AutoTokenizer.from_pretrained(out / "model")(
        "[INST] What is it? [/INST]", return_tensors="pt"
    )
    with torch.no_grad():
        before = base(**ids).logits
        after = PeftModel.from_pretrained(base, adapter)(**ids).logits
    assert torch.isfinite(after).all()
    assert (after - before).abs().max().item() > 1e-3
