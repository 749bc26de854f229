"""The fast engine on a GPU (marked `gpu`: run through the device tool, never in CI): the
kernels chosen at start (varlen flash attention, float32-output logits) pass their checks, one
packed batch gives the model's own loss and gradients for each base-weights setting, and a run
of each precision the plan can name trains, checkpoints and puts the model back.

bfloat16 tolerances (loss 1e-2, gradients 5e-2 relative): the model's own forward computes its
logits in bfloat16 where the engine's are float32, and rounds the residual stream at other
points; the CPU tests bound the same differences at 2e-4 on the loss of a smaller model."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from fast_support import (
    make_examples,
    make_plan,
    run_fast,
    save_tiny_llama,
    train_losses,
    with_engine,
)

from qlc.trainer.fast.decoder import DecoderSetup, FastDecoder
from qlc.trainer.fast.kernels import Attention
from qlc.trainer.fast.loss import head_matmul
from qlc.trainer.fast.precision import Dtypes
from qlc.trainer.fast.schedule import pack, pad

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("small"), layers=4, hidden=256)


def load_on(path: Path, compute: str, device: str) -> Any:
    config = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=DTYPES[compute]
    )
    base = transformers.AutoModelForCausalLM.from_pretrained(
        path, quantization_config=config, dtype=DTYPES[compute], device_map=device
    )
    torch.manual_seed(1)
    lora = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS,
                           task_type="CAUSAL_LM")  # fmt: skip
    model = peft.get_peft_model(base, lora)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    return model


@pytest.mark.parametrize("base_weights", ["dequantized", "4bit", "streamed"])
def test_one_batch_on_the_gpu_has_the_models_loss_and_gradients(
    small_dir: Path, base_weights: str
) -> None:
    memory = "standard" if base_weights == "dequantized" else "lean"
    plan = with_engine(make_plan(gpus=1, compute="bfloat16", memory=memory),
                       base_weights=base_weights)  # fmt: skip
    device = torch.device("cuda", torch.cuda.current_device())
    model = load_on(small_dir, "bfloat16", "cuda")
    examples = make_examples(4, seed=11)
    batch = pad(examples, 0, device)
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    expected = torch.nn.functional.cross_entropy(
        logits.float().flatten(0, 1), batch.targets.flatten(), reduction="sum"
    )
    expected.backward()
    expected_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)

    dtypes = Dtypes.of(plan.train.engine.precision)
    attention, why = Attention.for_device(device, dtypes.activations)
    matmul, how = head_matmul(device, dtypes.base)
    assert attention.varlen is not None, why
    assert "out_dtype" in how, how
    setup = DecoderSetup(device, dtypes, plan.train.engine.base_weights,
                         plan.train.engine.loss == "chunked", attention, matmul)  # fmt: skip
    decoder = FastDecoder(model, setup)
    decoder.recompute = memory == "lean"
    loss = decoder.loss_sum(pack(examples, device))
    loss.backward()
    assert float(loss) == pytest.approx(float(expected), rel=1e-2)
    for name, param in model.named_parameters():
        if param.requires_grad:
            error = float((param.grad - expected_grads[name]).norm() / expected_grads[name].norm())
            assert error < 5e-2, f"{name}: {error:.2e}"
    decoder.release()


@pytest.mark.parametrize(
    ("compute", "mixed", "memory"),
    [
        ("bfloat16", "no", "standard"),
        ("bfloat16", "bf16", "standard"),
        ("float16", "fp16", "standard"),  # float16 adapters: dynamic loss scaling
        ("bfloat16", "no", "lean"),  # streamed from host memory
        ("float32", "no", "standard"),
    ],
)
def test_a_run_of_each_precision_trains_on_the_gpu(
    small_dir: Path, tmp_path: Path, compute: str, mixed: str, memory: str
) -> None:
    plan = make_plan(gpus=1, compute=compute, mixed=mixed, memory=memory, max_steps=6,
                     batch_size=4, grad_accum=2, save_steps=3)  # fmt: skip
    model = load_on(small_dir, compute, "cpu" if memory == "lean" else "cuda")
    homes = {n: p.device for n, p in model.named_parameters()}
    examples = make_examples(48, seed=3)
    result, records, decisions = run_fast(model, plan, examples, tmp_path, examples[:8])
    losses = train_losses(records)
    assert len(losses) == result.steps == 6 and all(math.isfinite(x) for x in losses)
    assert result.eval_loss is not None and result.peak_memory_reserved
    chosen = {d["what"]: d["chosen"] for d in decisions.entries}
    expected = "SDPA per example" if compute == "float32" else "varlen flash attention"
    assert chosen["train.engine.attention"] == expected  # varlen kernels are 16-bit
    assert (tmp_path / "checkpoints" / "checkpoint-3").is_dir()
    assert {n: p.device for n, p in model.named_parameters()} == homes
