"""The tokenizer and the model as the plan loads them: the tiny base in 4 bits through
bitsandbytes on CPU with LoRA from peft, where each is placed, what a failed load says, and the
smoke mode's tiny model of the same architecture."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from trainer_support import TINY_MODEL

from qlc.compiler.plan import Plan
from qlc.trainer.errors import UserError
from qlc.trainer.model import (
    SMOKE_VOCAB,
    ModelSource,
    build_smoke_model,
    device_map,
    load_model,
    load_tokenizer,
    model_source,
    quantized_on_gpu_kept_on_host,
)

TINY = ModelSource(str(TINY_MODEL), None, local=True)


def with_engine(plan: Plan, **engine: Any) -> Plan:
    train = plan.train.model_copy(update={"engine": plan.engine.model_copy(update=engine)})
    return plan.model_copy(update={"train": train})


def test_the_tiny_base_loads_in_4_bits_with_lora_adapters(tiny_plan: Plan) -> None:
    model = load_model(tiny_plan, TINY, use_cpu=True, local_rank=0, world_size=1)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert type(layer.base_layer).__name__ == "Linear4bit"
    assert layer.base_layer.weight.quant_state.quant_type == "nf4"
    assert layer.r["default"] == 8 and layer.scaling["default"] == 2.0
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    assert {p.dtype for name, p in model.named_parameters() if name in trainable} == {torch.float32}
    assert model.config.use_cache is False
    flags = [
        m.support_avx512bf16_for_cpu
        for m in model.modules()
        if hasattr(m, "support_avx512bf16_for_cpu")
    ]
    assert flags and not any(flags)  # no repacking at the first eval: resumed runs match


def test_the_tokenizer_gets_a_pad_token_and_pads_right(tiny_plan: Plan) -> None:
    tokenizer = load_tokenizer(tiny_plan, TINY)
    assert tokenizer.pad_token == "<unk>" and tokenizer.padding_side == "right"
    assert tokenizer.eos_token == "</s>" and tokenizer.is_fast


def test_a_tokenizer_without_eos_is_an_error(tiny_plan: Plan, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL)
    tokenizer.eos_token = None
    tokenizer.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text((TINY_MODEL / "config.json").read_text())
    with pytest.raises(UserError, match="the tokenizer has no EOS token"):
        load_tokenizer(tiny_plan, ModelSource(str(tmp_path), None, local=True))


def test_a_local_folder_without_a_model_is_an_error(tiny_plan: Plan, tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"model directory '.*' has no config\.json"):
        model_source(tiny_plan.model, str(tmp_path))
    (tmp_path / "config.json").write_text((TINY_MODEL / "config.json").read_text())
    source = model_source(tiny_plan.model, str(tmp_path))
    with pytest.raises(UserError, match=rf"cannot load the tokenizer from {tmp_path}: ") as caught:
        load_tokenizer(tiny_plan, source)  # transformers 5 raises ValueError here, not OSError
    assert str(caught.value).splitlines()[1].startswith("fix: the model folder needs its tokenizer")
    with pytest.raises(UserError, match=rf"cannot load the model from {tmp_path}"):
        load_model(tiny_plan, source, use_cpu=True, local_rank=0, world_size=1)


@pytest.mark.parametrize("what", ["tokenizer", "model"])
def test_no_hub_is_a_user_error_with_the_fix(
    tiny_plan: Plan, monkeypatch: pytest.MonkeyPatch, what: str
) -> None:
    import transformers

    def offline(*args: Any, **kwargs: Any) -> Any:
        raise OSError("We couldn't connect to 'https://huggingface.co'\nsecond line")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", offline)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", offline)
    hub = ModelSource("org/model", "abc", local=False)
    with pytest.raises(UserError) as caught:
        if what == "tokenizer":
            load_tokenizer(tiny_plan, hub)
        else:
            load_model(tiny_plan, hub, use_cpu=True, local_rank=0, world_size=1)
    message = str(caught.value)
    assert message.startswith(f"cannot load the {what} 'org/model' from the Hugging Face hub")
    assert "OSError: We couldn't connect" in message and "second line" not in message
    assert "HF_TOKEN as a runtime.secrets name" in message


@pytest.mark.parametrize(
    ("base_weights", "distributed", "use_cpu", "world", "placed"),
    [
        ("4bit", "ddp", True, 1, None),  # CPU: where from_pretrained puts it
        ("4bit", "ddp", False, 1, {"": 0}),
        ("4bit", "ddp", False, 2, {"": 1}),  # each process its own GPU (local rank 1 here)
        ("4bit", "fsdp", False, 2, None),  # FSDP places the shards itself
        ("4bit", "fsdp", False, 1, {"": 1}),  # one process: nothing to shard
        ("streamed", "ddp", False, 1, {"": "cpu"}),  # host memory; the engine streams it
        ("streamed", "ddp", True, 1, None),
    ],
)
def test_where_the_base_model_is_placed(
    tiny_plan: Plan,
    base_weights: str,
    distributed: str,
    use_cpu: bool,
    world: int,
    placed: Any,
) -> None:
    plan = with_engine(tiny_plan, base_weights=base_weights, distributed=distributed)
    assert (
        device_map(plan, use_cpu, local_rank=1 if placed != {"": 0} else 0, world_size=world)
        == placed
    )


def test_quantizing_on_the_gpu_is_off_unless_streamed() -> None:
    import bitsandbytes.functional as bnbf

    original = bnbf.quantize_4bit
    with quantized_on_gpu_kept_on_host(False):
        assert bnbf.quantize_4bit is original


def test_the_smoke_model_is_tiny_and_its_tokenizer_adds_bos(
    tiny_plan: Plan, tmp_path: Path
) -> None:
    from transformers import AutoTokenizer

    rows = [{"text": f"<s>[INST] question {i} [/INST] answer {i} </s>"} for i in range(32)]
    source = build_smoke_model(tiny_plan, rows, tmp_path)
    assert source == ModelSource(str(tmp_path), None, local=True)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 2
    assert config["vocab_size"] == SMOKE_VOCAB
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    ids = tokenizer("[INST] question 3 [/INST]")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and tokenizer.chat_template
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert tokenizer.apply_chat_template(conv, tokenize=False) == "<s>[INST] hi [/INST] yo </s>"
    again = tmp_path / "again"
    build_smoke_model(tiny_plan, rows, again)
    for name in ("model.safetensors", "tokenizer.json"):  # a pure function of plan and rows
        assert (again / name).read_bytes() == (tmp_path / name).read_bytes()
