"""The compiled train.py trains for real on CPU with bitsandbytes 4-bit layers (slow).

One uninterrupted run of specs/tiny.toml (conftest's tiny_run) is read by most tests: its
records, its adapter loaded back, its evaluation loss recomputed. One more run is stopped by
SIGTERM and resumed: its first steps match tiny_run's bit for bit (deterministic mode) and its
final adapter is tiny_run's. The smoke mode runs once per data format.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import pytest
from trainer_support import (
    ADAPTER,
    TINY_DATA,
    TINY_MODEL,
    Stopped,
    assert_ok,
    compile_to,
    manifest,
    metrics,
    progress,
    run_train,
    sha256,
    stop_and_resume,
)

from qlc import contract
from qlc.compiler.plan import Plan
from qlc.trainer.recipe import settings_text

pytestmark = pytest.mark.slow
STOP_AFTER = 3  # SIGTERM once step 3 is logged: the run stops after the step it is in


@pytest.mark.slow
def test_the_tiny_spec_end_to_end(tiny_run: tuple[Path, str], tiny_context: Path) -> None:
    out, stdout = tiny_run
    statement = manifest(out)  # read back through the contract's schema
    predicate = statement["predicate"]
    assert predicate["status"] == "succeeded" and predicate["error"] is None
    subjects = {s["name"]: s["digest"]["sha256"] for s in statement["subject"]}
    assert subjects["adapter/adapter_model.safetensors"] == sha256(out / ADAPTER)
    assert all(sha256(out / name) == digest for name, digest in subjects.items())
    assert {"adapter/adapter_config.json", "adapter/tokenizer.json", "adapter/README.md"} <= set(
        subjects
    )
    assert predicate["records"] == {
        name: sha256(out / name) for name in contract.TRAINER_RECORDS
    }  # every record the trainer wrote, hashed
    inputs = predicate["inputs"]
    assert inputs["model"]["files"]["model.safetensors"] == sha256(TINY_MODEL / "model.safetensors")
    assert inputs["data"]["files"] == {"data.jsonl": sha256(TINY_DATA)}
    run = predicate["run"]
    assert run["deterministic"] is True and run["resumed_from"] is None
    assert (run["world_size"], run["examples_per_step"], run["grad_accum"]) == (1, 4, 1)
    assert predicate["environment"]["bitsandbytes"] == "0.50.2"
    assert predicate["decisions"] == [] and predicate["substitutions"] == []
    assert predicate["plan_sha256"] == sha256(tiny_context / "plan.json")
    assert predicate["lock_sha256"] == sha256(tiny_context / "requirements.lock")
    plan = Plan.model_validate_json((tiny_context / "plan.json").read_bytes())
    assert predicate["effective"] == {
        **{row.name: row.value for row in plan.settings()},
        "eval_loss_definition": contract.EVAL_LOSS_DEFINITION,  # what eval_loss means, in words
    }
    assert (out / contract.PLAN_FILE).read_bytes() == (tiny_context / "plan.json").read_bytes()
    assert (out / contract.SETTINGS_FILE).read_text() == settings_text(plan)
    assert 'qlc settings:\nengine                 "reference"  (train.engine)' in stdout
    found = predicate["metrics"]
    assert found["steps"] == 12 and found["tokens_trained"] > 0 and found["eval_loss"] > 0
    assert found["peak_memory_bytes"] > 0 and found["train_seconds"] > 0


@pytest.mark.slow
def test_every_step_is_logged_once_and_the_loss_falls(tiny_run: tuple[Path, str]) -> None:
    out, stdout = tiny_run
    lines = progress(stdout)
    assert [line["step"] for line in lines] == list(range(1, 13))
    assert tuple(lines[0]) == (
        "step",
        "max_steps",
        "epoch",
        "loss",
        "lr",
        "grad_norm",
        "tokens_per_s",
        "elapsed_s",
    )
    assert stdout.count("'loss':") == 0  # the Trainer's own dict lines are not printed
    records = metrics(out)
    train = [r for r in records if r["event"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 13))
    assert train[0]["lr"] == 0.0 and train[2]["lr"] == 0.01  # 2 warmup steps, then the peak
    losses = [r["loss"] for r in train]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.1, losses  # it learns
    evals = [r for r in records if r["event"] == "eval"]
    assert [r["step"] for r in evals] == [6, 12]  # eval_steps = 6
    summary = records[-1]
    assert summary["event"] == "summary" and summary["final_loss"] == losses[-1]  # last 10%
    assert (
        summary["eval_loss"]
        == evals[-1]["eval_loss"]
        == manifest(out)["predicate"]["metrics"]["eval_loss"]
    )


@pytest.mark.slow
def test_the_runs_records(tiny_run: tuple[Path, str], tiny_context: Path) -> None:
    out, _ = tiny_run
    report = json.loads((out / contract.DATA_REPORT_FILE).read_text())
    assert report["train"]["examples"] == 56 and report["eval"]["examples"] == 8
    assert report["train"]["doubled_bos_fixed"] == 56  # guanaco rows start with <s>
    assert report["train"]["rows_without_text"] == 0
    sample = json.loads((out / contract.SAMPLE_FILE).read_text())
    assert sample["held_out"] and sample["prompt"].endswith("[/INST]") and "completion" in sample
    checkpoints = sorted(p.name for p in (out / contract.CHECKPOINTS_DIR).iterdir())
    assert checkpoints == ["checkpoint-12", "checkpoint-8"]  # save_steps 4, keep 2; no trl card
    marker = json.loads((out / "checkpoints/checkpoint-12" / contract.COMPLETE_MARKER).read_text())
    assert marker["step"] == 12 and marker["engine"] == "reference"
    assert not (out / "checkpoints/checkpoint-12" / contract.MODEL_CARD_FILE).exists()
    assert not (out / ADAPTER.parent / "training_args.bin").exists()
    config = json.loads((out / ADAPTER.parent / "adapter_config.json").read_text())
    assert config["target_modules"] == sorted(config["target_modules"]) and config["r"] == 8
    card = (out / ADAPTER.parent / contract.MODEL_CARD_FILE).read_text()
    header = card.split("\n---\n", 1)[0]
    assert "base_model" not in header  # specs/tiny's model is a local folder
    assert "| peak\\_memory\\_bytes | " in card and " GiB |" in card
    assert f"| adapter/adapter\\_model.safetensors | sha256:{sha256(out / ADAPTER)} |" in card
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == [contract.RUN_MARKER]


@pytest.mark.slow
def test_the_adapter_loads_back_onto_the_4bit_base_and_changes_outputs(
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
    tokenizer = AutoTokenizer.from_pretrained(out / ADAPTER.parent)
    ids = tokenizer("[INST] What is the capital of France? [/INST]", return_tensors="pt")
    with torch.no_grad():
        before = base(**ids).logits
        tuned = PeftModel.from_pretrained(base, out / ADAPTER.parent)
        after = tuned(**ids).logits
    assert type(base.model.layers[0].self_attn.q_proj.base_layer).__name__ == "Linear4bit"
    assert (after - before).abs().max().item() > 1e-3


@pytest.mark.slow
def test_the_recorded_eval_loss_is_the_token_weighted_loss_of_the_held_out_rows(
    tiny_run: tuple[Path, str], tiny_plan: Plan, tiny_tokenizer: Any
) -> None:
    """Recomputed from the published adapter on the held-out rows: the manifest's eval_loss
    is qlc's token-weighted definition, of the final model."""
    from peft import PeftModel

    from qlc.trainer.evaluate import token_weighted_loss
    from qlc.trainer.examples import prepare
    from qlc.trainer.model import ModelSource, load_model
    from qlc.trainer.rows import load_rows

    out, _ = tiny_run
    rows = load_rows(tiny_plan, str(TINY_DATA), None)
    held = prepare(rows.eval, tiny_plan.data, tiny_tokenizer, "d", "eval")
    model = load_model(tiny_plan, ModelSource(str(TINY_MODEL), None, True), True, 0, 1)
    tuned = PeftModel.from_pretrained(model.get_base_model(), out / ADAPTER.parent)
    loss = token_weighted_loss(tuned, held.examples, tiny_plan, tiny_tokenizer.pad_token_id)
    recorded = manifest(out)["predicate"]["metrics"]["eval_loss"]
    assert loss == pytest.approx(recorded, rel=1e-5)


# --- stopped by SIGTERM, resumed ------------------------------------------------------------


@pytest.fixture(scope="module")
def stopped_run(tiny_context: Path, tmp_path_factory: pytest.TempPathFactory) -> Stopped:
    """specs/tiny.toml stopped by SIGTERM after step 3, then run again in the same directory."""
    return stop_and_resume(tiny_context, tmp_path_factory.mktemp("stopped") / "run", STOP_AFTER)


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_after_the_step_and_exits_143(stopped_run: Stopped) -> None:
    run = stopped_run
    assert run.code == contract.EXIT_PREEMPTED == 128 + signal.SIGTERM, run.output[-3000:]
    assert "qlc: SIGTERM: stopping after this step, with a checkpoint" in run.output
    predicate = run.manifest["predicate"]
    assert predicate["status"] == "interrupted" and run.manifest["subject"] == []
    assert run.step >= STOP_AFTER
    assert predicate["error"] == (
        f"stopped by SIGTERM; checkpoint-{run.step} saved: the run resumes from it"
    )
    assert contract.COMPLETE_MARKER in run.checkpoints[f"checkpoint-{run.step}"]


@pytest.mark.slow
def test_a_stopped_run_resumes_to_the_uninterrupted_adapter(
    stopped_run: Stopped, tiny_run: tuple[Path, str]
) -> None:
    out, step = stopped_run.out, stopped_run.step
    predicate = manifest(out)["predicate"]
    assert predicate["status"] == "succeeded"
    assert predicate["run"]["resumed_from"] == f"checkpoint-{step}"
    assert f"qlc: resuming from checkpoint-{step} (same plan)" in stopped_run.resumed
    assert [line["step"] for line in progress(stopped_run.resumed)] == list(range(step + 1, 13))
    records = metrics(out)
    assert [r["step"] for r in records if r["event"] == "train"] == list(range(1, 13))
    assert [r["checkpoint"] for r in records if r["event"] == "resume"] == [f"checkpoint-{step}"]
    assert sha256(out / ADAPTER) == sha256(tiny_run[0] / ADAPTER)  # bit-identical


@pytest.mark.slow
def test_deterministic_runs_are_bit_identical(
    stopped_run: Stopped, tiny_run: tuple[Path, str]
) -> None:
    """Two fresh runs of a deterministic plan log the same numbers, to the last bit."""
    keys = ("step", "loss", "grad_norm", "lr", "epoch")
    fresh = [{k: r[k] for k in keys} for r in metrics(tiny_run[0]) if r["event"] == "train"]
    again = [{k: r[k] for k in keys} for r in stopped_run.metrics if r["event"] == "train"]
    assert len(again) >= STOP_AFTER and again == fresh[: len(again)]


# --- the smoke mode -------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("spec_name", ["guanaco.toml", "chat.toml", "instruction.toml"])
def test_smoke_mode(spec_name: str, tmp_path: Path) -> None:
    extra = {contract.ENV_SMOKE: "1"}
    if spec_name == "guanaco.toml":  # its hub dataset's rows: the tiny spec's 64 guanaco rows
        extra[contract.ENV_DATA_PATH] = str(TINY_DATA)
    context = compile_to(spec_name, tmp_path / "ctx")
    out = tmp_path / "out"
    result = run_train(context, out, **extra)
    assert_ok(result)
    predicate: dict[str, Any] = manifest(out)["predicate"]
    assert predicate["status"] == "succeeded" and predicate["run"]["smoke"] is True
    assert predicate["inputs"]["model"]["id"] is None  # a tiny model made in the run, no hub
    assert predicate["effective"]["adapter_compute_dtype"] == "float32"  # the smoke variant
    assert predicate["effective"]["world_size"] == 1
    assert [line["step"] for line in progress(result.stdout)] == [1, 2, 3, 4]
    report = json.loads((out / contract.DATA_REPORT_FILE).read_text())["train"]
    config = json.loads((out / contract.SMOKE_MODEL_DIR / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 2
    if spec_name == "guanaco.toml":
        assert predicate["inputs"]["data"]["files"] == {"data.jsonl": sha256(TINY_DATA)}
        assert report["rows"] == 64 and report["doubled_bos_fixed"] == 64
        assert report["trained_tokens"] == report["tokens"]
    else:  # loss = "completion": prompts masked, each example ends with a trained EOS
        assert 0 < report["trained_tokens"] < report["tokens"] / 2
    assert (out / ADAPTER).is_file()
