"""The compiled train.py trains for real on CPU with bitsandbytes 4-bit layers.

specs/tiny.toml end to end (outputs, manifest, progress lines), the smoke mode of the guanaco,
chat and instruction specs, an over-fit run whose loss falls, the adapter loading back onto the
4-bit base, bit-identical adapters in deterministic mode, and resume after a kill.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    GUANACO,
    TINY_MODEL,
    assert_ok,
    compile_to,
    edit_plan,
    manifest,
    progress,
    run_train,
    sha256,
    start_train,
)

ADAPTER = Path("adapter") / "adapter_model.safetensors"


def test_user_error_fails_cleanly_with_a_manifest(tiny_context: Path, tmp_path: Path) -> None:
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"body": "no text field here"}) + "\n" * 1)
    data.write_text(data.read_text() * 8)
    result = run_train(tiny_context, tmp_path / "out", QLC_DATA_PATH=str(data))
    assert result.returncode == 2
    assert "error: row 0: no field 'text'" in result.stderr and "Traceback" not in result.stderr
    made = manifest(tmp_path / "out")["predicate"]
    assert made["status"] == "failed" and "no field 'text'" in made["error"]
    assert manifest(tmp_path / "out")["subject"] == []


@pytest.mark.slow
def test_tiny_spec_end_to_end(tiny_run: tuple[Path, str]) -> None:
    out, stdout = tiny_run
    statement = manifest(out)
    predicate = statement["predicate"]
    assert statement["_type"] == "https://in-toto.io/Statement/v1"
    assert predicate["status"] == "succeeded" and predicate["error"] is None
    subjects = {s["name"]: s["digest"]["sha256"] for s in statement["subject"]}
    assert subjects["adapter/adapter_model.safetensors"] == sha256(out / ADAPTER)
    assert all(sha256(out / name) == digest for name, digest in subjects.items())
    assert {"adapter/adapter_config.json", "adapter/tokenizer.json"} <= set(subjects)
    inputs = predicate["inputs"]
    assert inputs["model"]["files"]["model.safetensors"] == sha256(TINY_MODEL / "model.safetensors")
    assert inputs["data"]["files"]["data.jsonl"] == sha256(TINY_MODEL.parent / "data.jsonl")
    assert predicate["run"]["deterministic"] is True and predicate["run"]["resumed_from"] is None
    assert predicate["environment"]["bitsandbytes"] == "0.50.2"
    metrics = predicate["metrics"]
    assert metrics["steps"] == 12 and metrics["tokens_trained"] > 0 and metrics["eval_loss"] > 0
    assert metrics["peak_memory_bytes"] > 0 and metrics["train_seconds"] > 0

    lines = progress(stdout)
    assert [line["step"] for line in lines] == list(range(1, 13))
    assert set(lines[0]) == {
        "step",
        "max_steps",
        "epoch",
        "loss",
        "lr",
        "grad_norm",
        "tokens_per_s",
        "elapsed_s",
    }
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["event"] for r in records].count("train") == 12
    assert records[-1]["event"] == "summary" and records[-1]["final_loss"] > 0
    assert any(r["event"] == "eval" and r["step"] == 6 for r in records)

    report = json.loads((out / "data_report.json").read_text())
    assert report["train"]["examples"] == 56 and report["eval"]["examples"] == 8
    assert report["train"]["doubled_bos_fixed"] == 56  # guanaco rows start with <s>
    sample = json.loads((out / "sample.json").read_text())
    assert sample["held_out"] and sample["prompt"].endswith("[/INST]") and "completion" in sample
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir() if p.is_dir())
    assert checkpoints == ["checkpoint-12", "checkpoint-8"]  # save_steps 4, keep 2
    assert (out / "adapter" / "README.md").is_file()


@pytest.mark.slow
def test_adapter_loads_back_onto_the_4bit_base_and_changes_outputs(
    tiny_run: tuple[Path, str],
) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    out, _ = tiny_run
    quant = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    base = AutoModelForCausalLM.from_pretrained(
        TINY_MODEL, quantization_config=quant, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(out / "adapter")
    ids = tokenizer("[INST] What is the capital of France? [/INST]", return_tensors="pt")
    with torch.no_grad():
        before = base(**ids).logits
        tuned = PeftModel.from_pretrained(base, out / "adapter")
        after = tuned(**ids).logits
    assert type(base.model.layers[0].self_attn.q_proj.base_layer).__name__ == "Linear4bit"
    assert (after - before).abs().max().item() > 1e-3


@pytest.mark.slow
def test_deterministic_mode_gives_identical_adapters(
    tiny_context: Path, tiny_run: tuple[Path, str], tmp_path: Path
) -> None:
    result = run_train(tiny_context, tmp_path)
    assert_ok(result)
    assert sha256(tmp_path / ADAPTER) == sha256(tiny_run[0] / ADAPTER)


@pytest.mark.slow
def test_resume_after_a_kill_matches_an_uninterrupted_run(
    tiny_context: Path, tiny_run: tuple[Path, str], tmp_path: Path
) -> None:
    marker = tmp_path / "checkpoints" / "checkpoint-4" / "qlc-complete.json"
    process = start_train(tiny_context, tmp_path)
    deadline = time.time() + 300
    while not marker.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    stdout, _ = process.communicate(timeout=120)
    assert marker.exists(), stdout[-3000:]
    assert process.returncode == 128 + signal.SIGTERM, stdout[-3000:]
    killed = manifest(tmp_path)
    assert killed["predicate"]["status"] == "interrupted" and killed["subject"] == [], stdout[
        -2000:
    ]
    assert not (tmp_path / ADAPTER).exists()

    result = run_train(tiny_context, tmp_path)
    assert_ok(result)
    resumed = manifest(tmp_path)["predicate"]
    assert resumed["status"] == "succeeded"
    resumed_step = int(Path(resumed["run"]["resumed_from"]).name.split("-")[1])
    assert resumed_step in (4, 8) and progress(result.stdout)[0]["step"] == resumed_step + 1
    assert sha256(tmp_path / ADAPTER) == sha256(tiny_run[0] / ADAPTER)


@pytest.mark.slow
def test_loss_falls_on_an_overfit_run(tmp_path: Path) -> None:
    rows = (TINY_MODEL.parent / "data.jsonl").read_text().splitlines()[:8]
    data = tmp_path / "few.jsonl"
    data.write_text("\n".join(rows) + "\n")
    context = compile_to("tiny.toml", tmp_path / "ctx")
    edit_plan(
        context,
        train={
            "max_steps": 24,
            "eval_steps": None,
            "save_steps": None,
            "gradient_checkpointing": False,
            "warmup_steps": 0,
        },
        data={"eval_fraction": 0.0, "max_length": 64},
    )
    result = run_train(context, tmp_path / "out", QLC_DATA_PATH=str(data))
    assert_ok(result)
    losses = [line["loss"] for line in progress(result.stdout)]
    assert len(losses) == 24
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first - 0.5, losses


def smoke_case(name: str) -> tuple[str, dict[str, str]]:
    extra = {"QLC_SMOKE": "1"}
    if name == "guanaco.toml":
        extra["QLC_DATA_PATH"] = str(GUANACO)
    return name, extra


@pytest.mark.slow
@pytest.mark.parametrize("spec_name", ["guanaco.toml", "chat.toml", "instruction.toml"])
def test_smoke_mode(spec_name: str, tmp_path: Path) -> None:
    _, extra = smoke_case(spec_name)
    context = compile_to(spec_name, tmp_path / "ctx")
    result = run_train(context, tmp_path / "out", **extra)
    assert_ok(result)
    out = tmp_path / "out"
    predicate: dict[str, Any] = manifest(out)["predicate"]
    assert predicate["status"] == "succeeded" and predicate["run"]["smoke"] is True
    assert predicate["inputs"]["model"]["id"] is None  # a tiny model made in the run, no hub
    assert [line["step"] for line in progress(result.stdout)] == [1, 2, 3, 4]
    report = json.loads((out / "data_report.json").read_text())["train"]
    config = json.loads((out / "smoke-model" / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 2
    if spec_name == "guanaco.toml":
        assert predicate["inputs"]["data"]["files"] == {
            "train.parquet": "fddeae968b8101aafa18d777ff74a75f2cfe72ae2af2149c1993e279ebeca4ed"
        }
        assert report["rows"] == 64 and report["doubled_bos_fixed"] == 64
        assert report["trained_tokens"] == report["tokens"]
    else:  # loss = "completion": prompts masked, each example ends with a trained EOS
        assert 0 < report["trained_tokens"] < report["tokens"] / 2
    assert (out / ADAPTER).is_file()


@pytest.mark.slow
def test_fast_engine_trains_the_tiny_spec(tmp_path: Path) -> None:
    context = compile_to("tiny.toml", tmp_path / "ctx")
    edit_plan(context, train={"engine": "fast"})
    result = run_train(context, tmp_path / "out")
    assert_ok(result)
    predicate = manifest(tmp_path / "out")["predicate"]
    assert predicate["status"] == "succeeded" and predicate["run"]["engine"] == "fast"
    assert predicate["metrics"]["steps"] == 12
    assert len(progress(result.stdout)) == 12
    assert (tmp_path / "out" / ADAPTER).is_file()
