"""The fast engine trains the same mathematics as a plain reference loop (CPU, real 4-bit layers).

A tiny random-weight Llama (grouped-query attention, 2 layers) is loaded 4-bit NF4 through
bitsandbytes on the CPU and wrapped with peft LoRA. The reference is the textbook loop: right-padded
batches through the model's own forward and loss, torch AdamW, transformers' scheduler, gradient
clipping. The fast engine packs each step's examples into one padding-free row and computes the
decoder itself. Both see the same examples per step.

Tolerance: float32 compute on CPU, so the two differ only by summation order: per-step losses
within 1e-4 relative, adapter weights within 1e-3 relative (Adam's normalisation amplifies
rounding in near-zero gradient entries, hence the looser bound on weights).
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")

from qlc.templates import fast_engine  # noqa: E402

pytestmark = pytest.mark.slow

STEPS = 6


def make_spec(**train: object) -> dict:
    spec_train = {
        "epochs": None,
        "max_steps": STEPS,
        "batch_size": 3,
        "grad_accum": 2,
        "learning_rate": 1e-3,
        "lr_scheduler": "cosine",
        "warmup_ratio": 0.2,
        "warmup_steps": None,
        "weight_decay": 0.01,
        "optimizer": "paged_adamw_32bit",
        "max_grad_norm": 0.3,
        "group_by_length": True,
        "gradient_checkpointing": True,
        "mixed_precision": "no",
        "engine": "fast",
        "memory": "standard",
        "logging_steps": 1,
        "eval_steps": None,
        "save_steps": None,
        "save_total_limit": 2,
    }
    spec_train.update(train)
    return {
        "job": {"seed": 7},
        "quantization": {
            "load_in_4bit": True,
            "quant_type": "nf4",
            "compute_dtype": "float32",
            "double_quant": False,
        },
        "lora": {
            "r": 8,
            "alpha": 16,
            "dropout": 0.0,
            "bias": "none",
            "target_modules": ["q_proj", "v_proj", "down_proj"],
            "modules_to_save": [],
        },
        "train": spec_train,
    }


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    model = transformers.LlamaForCausalLM(config)
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    return path


def load_peft(path: Path, spec: dict):
    bnb = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    base = transformers.AutoModelForCausalLM.from_pretrained(
        path, quantization_config=bnb, dtype=torch.float32, device_map="cpu"
    )
    lora = spec["lora"]
    config = peft.LoraConfig(
        r=lora["r"],
        lora_alpha=lora["alpha"],
        lora_dropout=lora["dropout"],
        target_modules=lora["target_modules"],
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(1)
    model = peft.get_peft_model(base, config)
    with torch.no_grad():  # a non-zero B, so that every adapter weight gets a gradient at once
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    return model


def make_examples(n: int, seed: int) -> list[dict[str, list[int]]]:
    gen = torch.Generator().manual_seed(seed)
    examples = []
    for _ in range(n):
        length = int(torch.randint(4, 40, (1,), generator=gen))
        ids = [1, *torch.randint(3, 97, (length - 1,), generator=gen).tolist()]
        labels = list(ids)
        labels[: length // 4] = [-100] * (length // 4)  # a masked prompt
        examples.append({"input_ids": ids, "labels": labels})
    return examples


def reference_train(model, examples: list[dict], spec: dict) -> list[float]:
    """Plain loop: padded batches, the model's own forward and loss."""
    train = spec["train"]
    schedule = fast_engine.step_schedule([len(e["input_ids"]) for e in examples], train, 7)
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for n, p in model.named_parameters() if p.requires_grad and "bias" not in n]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": train["weight_decay"]}], lr=train["learning_rate"]
    )
    scheduler = transformers.get_scheduler(
        train["lr_scheduler"],
        optimizer,
        num_training_steps=len(schedule),
        num_warmup_steps=math.ceil(len(schedule) * train["warmup_ratio"]),
    )
    model.train()
    losses = []
    for micro in schedule:
        n_targets = sum(
            sum(t != -100 for t in examples[i]["labels"][1:]) for mb in micro for i in mb
        )
        total = 0.0
        for mb in micro:
            batch = fast_engine.pad([examples[i] for i in mb], 0, torch.device("cpu"))
            out = model(**batch)
            logits = out.logits.float()
            shifted = torch.nn.functional.pad(batch["labels"][:, 1:], (0, 1), value=-100)
            loss = torch.nn.functional.cross_entropy(
                logits.flatten(0, 1), shifted.flatten(), ignore_index=-100, reduction="sum"
            )
            (loss / n_targets).backward()
            total += float(loss.detach()) / n_targets
        torch.nn.utils.clip_grad_norm_(params, train["max_grad_norm"])
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        losses.append(total)
    return losses


def adapter(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def fast_train(model, examples, spec, tmp_path: Path, eval_examples=()):
    logged: list[dict] = []
    tokenizer = type("Tok", (), {"pad_token_id": 0})()
    summary = fast_engine.train(
        model=model,
        tokenizer=tokenizer,
        train_examples=examples,
        eval_examples=list(eval_examples),
        spec=spec,
        output_dir=tmp_path,
        log=logged.append,
        resume_from=None,
    )
    return summary, logged


@pytest.mark.parametrize("memory", ["standard", "lean", "lean-streamed"])
def test_fast_engine_matches_reference_loop(
    tiny_dir: Path, tmp_path: Path, memory: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if memory == "lean-streamed":  # the GPU's weight streaming, run on CPU
        memory = "lean"
        monkeypatch.setenv("QLC_FAST_STREAM", "1")
    spec = make_spec(memory=memory)
    examples = make_examples(36, seed=3)
    reference_model = load_peft(tiny_dir, spec)
    fast_model = load_peft(tiny_dir, spec)
    before = adapter(fast_model)
    ref_losses = reference_train(reference_model, examples, spec)
    summary, logged = fast_train(fast_model, examples, spec, tmp_path, examples[:5])

    assert "padding-free decoder" in summary["path"]
    fast_losses = [row["loss"] for row in logged if "loss" in row]
    assert len(fast_losses) == STEPS
    for ref, got in zip(ref_losses, fast_losses, strict=True):
        assert got == pytest.approx(ref, rel=1e-4)
    ref_adapter, fast_adapter = adapter(reference_model), adapter(fast_model)
    for name, ref in ref_adapter.items():
        assert not torch.equal(fast_adapter[name], before[name]), f"{name} did not train"
        err = (fast_adapter[name] - ref).norm() / ref.norm()
        assert err < 1e-3, f"{name}: relative difference {err:.2e}"
    assert summary["tokens_trained"] > 0 and summary["eval_loss"] is not None
    assert summary["final_loss"] == pytest.approx(fast_losses[-1])


def test_checkpoint_resume_gives_the_same_adapter(tiny_dir: Path, tmp_path: Path) -> None:
    examples = make_examples(24, seed=5)
    spec = make_spec(save_steps=3, lora_dropout=None) if False else make_spec(save_steps=3)
    spec = copy.deepcopy(spec)
    spec["lora"]["dropout"] = 0.1  # dropout RNG must be restored too
    straight = load_peft(tiny_dir, spec)
    fast_train(straight, examples, spec, tmp_path / "a")
    checkpoint = tmp_path / "a" / "checkpoints" / "checkpoint-3"
    assert (checkpoint / "adapter_model.safetensors").exists()

    resumed = load_peft(tiny_dir, spec)
    tokenizer = type("Tok", (), {"pad_token_id": 0})()
    fast_engine.train(
        model=resumed,
        tokenizer=tokenizer,
        train_examples=examples,
        eval_examples=[],
        spec=spec,
        output_dir=tmp_path / "b",
        log=lambda _: None,
        resume_from=checkpoint,
    )
    for name, value in adapter(straight).items():
        assert torch.allclose(adapter(resumed)[name], value, rtol=1e-5, atol=1e-7), name


def test_generic_path_for_unmodelled_adapters(tiny_dir: Path, tmp_path: Path) -> None:
    spec = make_spec(max_steps=2)
    spec["lora"]["target_modules"] = ["q_proj", "lm_head"]
    model = load_peft(tiny_dir, spec)
    summary, logged = fast_train(model, make_examples(12, seed=9), spec, tmp_path)
    assert summary["path"].startswith("generic path")
    assert all(math.isfinite(row["loss"]) for row in logged if "loss" in row)


def test_schedule_counts_steps_like_the_trainer() -> None:
    train = make_spec(max_steps=None, epochs=1.0, batch_size=4, grad_accum=1)["train"]
    assert fast_engine.total_steps(1000, train) == 250
    train = make_spec(max_steps=None, epochs=2.0, batch_size=4, grad_accum=3)["train"]
    assert fast_engine.total_steps(50, train) == 2 * 5  # 13 batches -> 5 updates per epoch
    schedule = fast_engine.step_schedule(list(range(1, 51)), train, seed=1)
    assert len(schedule) == 10
    first_epoch = [i for step in schedule[:5] for mb in step for i in mb]
    assert sorted(first_epoch) == list(range(50))
    assert fast_engine.warmup_steps(250, {"warmup_ratio": 0.03, "warmup_steps": None}) == 8


@pytest.mark.parametrize(
    ("memory", "fuse", "stream"),
    [("standard", "1", "0"), ("standard", "0", "0"), ("lean", "1", "0"), ("lean", "1", "1")],
)
def test_one_step_loss_and_gradients_match(
    tiny_dir: Path, memory: str, fuse: str, stream: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sharp check: loss sum and every adapter gradient of one packed batch, before Adam."""
    monkeypatch.setenv("QLC_FAST_FUSE", fuse)
    monkeypatch.setenv("QLC_FAST_STREAM", stream)
    spec = make_spec(memory=memory)
    spec["lora"]["dropout"] = 0.0
    examples = make_examples(4, seed=11)
    model = load_peft(tiny_dir, spec)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2)  # adapters that move the output visibly
    model.train()  # bitsandbytes' CPU eval mode repacks weights for a bf16 kernel
    cpu = torch.device("cpu")
    batch = fast_engine.pad(examples, 0, cpu)
    logits = model(**batch).logits.float()
    shifted = torch.nn.functional.pad(batch["labels"][:, 1:], (0, 1), value=-100)
    ref_loss = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), shifted.flatten(), ignore_index=-100, reduction="sum"
    )
    ref_loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()

    settings = fast_engine.Settings.choose(model, spec)
    decoder, path = fast_engine.build_decoder(model, spec, settings, examples)
    assert decoder is not None, path
    assert decoder.dequantize is (memory == "standard")
    loss = decoder.loss_sum(fast_engine.pack(examples, cpu))
    loss.backward()
    assert float(loss) == pytest.approx(float(ref_loss), rel=1e-5)
    for name, param in model.named_parameters():
        if param.requires_grad:
            err = (param.grad - ref_grads[name]).norm() / ref_grads[name].norm()
            assert err < 1e-4, f"{name}: gradient differs by {err:.2e}"
    model.zero_grad()
    padded = fast_engine.pack(examples, cpu, bucket=16)  # a filler segment changes nothing
    assert (
        padded.input_ids.numel() % 16 == 0
        and padded.n_targets == fast_engine.pack(examples, cpu).n_targets
    )
    loss = decoder.loss_sum(padded)
    loss.backward()
    assert float(loss) == pytest.approx(float(ref_loss), rel=1e-5)
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert (param.grad - ref_grads[name]).norm() / ref_grads[name].norm() < 1e-4, name


def test_bf16_compute_copies_hand_gradients_back(tiny_dir: Path) -> None:
    """With bf16 compute the adapter is used through bf16 copies; its float32 parameters must
    still receive the gradients (compared with float32 compute, at bf16 tolerance), and the
    copies must follow the parameters after an optimizer step."""
    spec = make_spec()
    examples = make_examples(4, seed=13)
    model = load_peft(tiny_dir, spec)
    model.train()
    cpu = torch.device("cpu")
    grads = {}
    for dtype in (torch.float32, torch.bfloat16):
        settings = fast_engine.Settings(device=cpu, dtype=dtype, lean=False)
        decoder = fast_engine.FastDecoder(model, settings, dequantize=True, recompute=False)
        loss_fn = fast_engine.FastLoss(model, decoder)
        loss_fn.loss_sum(examples, cpu).backward()
        loss_fn.after_backward()
        grads[dtype] = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        if dtype == torch.bfloat16:
            assert all(lora.A_c.grad is None for lora in loss_fn.loras)
            with torch.no_grad():
                for p in model.parameters():
                    if p.requires_grad:
                        p.add_(1.0)
            loss_fn.after_step()
            for lora in loss_fn.loras:
                assert torch.equal(lora.A_c, lora.A.to(torch.bfloat16))
        model.zero_grad(set_to_none=True)
    for name, ref in grads[torch.float32].items():
        got = grads[torch.bfloat16][name]
        assert got.dtype == torch.float32
        assert (got - ref).norm() / ref.norm() < 3e-2, name


def test_streamed_lean_fetches_each_layer_per_pass_and_puts_weights_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """WeightStream's bookkeeping (on CPU the copies are the host tensors themselves): at most
    three layers resident, one fetch per layer in the forward and one in the recomputation
    (the last layer's forward copy is reused), and release() leaves the model as it was."""
    monkeypatch.setenv("QLC_FAST_STREAM", "1")
    spec = make_spec(memory="lean")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=5,
        num_attention_heads=4,
        max_position_embeddings=128,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path)
    model = load_peft(tmp_path, spec)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    examples = make_examples(3, seed=4)
    settings = fast_engine.Settings.choose(model, spec)
    decoder, path = fast_engine.build_decoder(model, spec, settings, examples)
    assert decoder is not None and decoder.stream is not None, path
    assert "streamed" in path
    layers = len(decoder.layers)
    seen: list[list[int]] = []
    get = decoder.stream.get
    decoder.stream.get = lambda i: (seen.append(sorted(decoder.stream.resident)), get(i))[1]
    decoder.loss_sum(fast_engine.pack(examples, settings.device)).backward()
    # forward: layers 0..L-1; recomputation: L-1 and L-2 still there, L-3..0 fetched (and
    # layer 1, the next forward's second layer, still there beside 0)
    assert decoder.stream.fetches == layers + (layers - 2)
    assert max(len(r) for r in seen) <= 3 and len(decoder.stream.resident) <= 3
    assert all(part.streamed is None for layer in decoder.layers for part in layer.parts)
    decoder.release()
    for name, param in model.named_parameters():
        assert torch.equal(param.detach(), weights[name]), f"{name} changed or moved"


def test_streamed_greedy_sample_matches_generate(
    tiny_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("QLC_FAST_STREAM", "1")
    spec = make_spec(memory="lean")
    model = load_peft(tiny_dir, spec)
    model.train()  # bitsandbytes' CPU eval mode repacks weights for a bf16 kernel
    prompt = make_examples(1, seed=8)[0]["input_ids"][:12]
    settings = fast_engine.Settings.choose(model, spec)
    decoder, _ = fast_engine.build_decoder(model, spec, settings, make_examples(2, seed=8))
    decoder.training = False
    got = decoder.greedy(prompt, 6, stop=None)
    decoder.release()
    with torch.no_grad():
        ids = torch.tensor([prompt])
        for _ in range(6):  # the model's own forward, greedily (dropout is 0 in this spec)
            ids = torch.cat([ids, model(input_ids=ids).logits[:, -1:].argmax(-1)], dim=1)
    assert got == ids[0, len(prompt) :].tolist()
