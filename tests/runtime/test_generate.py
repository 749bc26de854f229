"""qlc generate: a real tiny run, its adapter changes the answer, untrusted inputs are refused.

One tiny run per session, shared read-only with test_merge (conftest's trained_tiny_run,
tiny_runs.py): the tiny spec with a high learning rate for a few steps, so the adapter
visibly moves the model.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")

from tiny_runs import REPO, TINY, TRAIN, call_cli, tiny_spec

from qlc.compiler.plan import Plan
from qlc.runtime.generate import encode, render_prompt

PROMPT = "<s>[INST] What is the capital of France? [/INST]"


def copy_run(run_dir: Path, target: Path) -> Path:
    shutil.copytree(run_dir, target, ignore=shutil.ignore_patterns("checkpoints"))
    return target


@pytest.mark.slow
def test_adapter_changes_the_answer(
    trained_tiny_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["generate", str(trained_tiny_run), "--prompt", PROMPT, "--max-new-tokens", "12"]
    code, tuned, err = call_cli(args, capsys)
    assert code == 0, err
    code, base, err = call_cli([*args, "--no-adapter"], capsys)
    assert code == 0, err
    assert tuned.strip() and base.strip()
    assert tuned != base


@pytest.mark.slow
def test_sampling_is_seeded(trained_tiny_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = str(trained_tiny_run / "manifest.json")  # the manifest names the run as well
    args = ["generate", manifest, "--prompt", PROMPT, "--max-new-tokens", "12"]
    sampled = [*args, "--temperature", "1.5"]
    first = call_cli([*sampled, "--seed", "1"], capsys)
    again = call_cli([*sampled, "--seed", "1"], capsys)
    other = call_cli([*sampled, "--seed", "2"], capsys)
    assert first[0] == again[0] == other[0] == 0
    assert first[1] == again[1]
    assert first[1] != other[1]


@pytest.mark.slow
def test_prompts_file_answers_each(
    trained_tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps(PROMPT) + "\n" + json.dumps({"prompt": "Hello"}) + "\n")
    args = ["generate", str(trained_tiny_run), "--prompts", str(prompts), "--max-new-tokens", "4"]
    code, printed, err = call_cli(args, capsys)
    assert code == 0, err
    assert re.findall(r"^--- prompt (\d):", printed, re.M) == ["1", "2"]


@pytest.mark.slow
def test_prompt_tokens_follow_training(trained_tiny_run: Path) -> None:
    from transformers import AutoTokenizer

    from qlc.trainer.examples import tokenize
    from qlc.trainer.render import Rendered

    plan = Plan.model_validate_json((trained_tiny_run / "plan.json").read_bytes())
    tokenizer = AutoTokenizer.from_pretrained(str(trained_tiny_run / "adapter"))
    ids = encode(render_prompt(plan, PROMPT, tokenizer), tokenizer)["input_ids"]
    assert ids[0].tolist().count(tokenizer.bos_token_id) == 1  # the text's <s>, not doubled
    assert ids[0, 0] == tokenizer.bos_token_id
    assert ids[0, -1] != tokenizer.eos_token_id
    example, _ = tokenize(Rendered(PROMPT, [(0, len(PROMPT))], PROMPT), tokenizer)
    assert ids[0].tolist() == example["input_ids"][:-1]  # training's ids, less the trained EOS

    instruction = plan.model_copy(update={"data": plan.data.model_copy(
        update={"format": "instruction"})})  # fmt: skip
    rendered = render_prompt(instruction, "Name a colour.", tokenizer)
    assert rendered.endswith("### Instruction:\nName a colour.\n\n### Response:\n")
    chat = plan.model_copy(update={"data": plan.data.model_copy(update={"format": "chat"})})
    expected = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert render_prompt(chat, "Hi", tokenizer) == expected


@pytest.mark.slow
def test_run_without_adapter_is_refused(
    trained_tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = copy_run(trained_tiny_run, tmp_path / "run")
    shutil.rmtree(broken / "adapter")
    code, _, err = call_cli(["generate", str(broken), "--prompt", PROMPT], capsys)
    assert code == 2
    assert "no adapter here" in err and "Traceback" not in err


@pytest.mark.slow
def test_changed_adapter_is_refused(
    trained_tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = copy_run(trained_tiny_run, tmp_path / "run")
    weights = broken / "adapter" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    code, _, err = call_cli(["generate", str(broken), "--prompt", PROMPT], capsys)
    assert code == 2
    assert "adapter_model.safetensors: sha256 differs" in err


@pytest.mark.slow
def test_unfinished_run_is_refused(
    trained_tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = copy_run(trained_tiny_run, tmp_path / "run")
    manifest = json.loads((broken / "manifest.json").read_text())
    manifest["predicate"]["status"] = "interrupted"
    (broken / "manifest.json").write_text(json.dumps(manifest))
    code, _, err = call_cli(["generate", str(broken), "--prompt", PROMPT], capsys)
    assert code == 2
    assert "'interrupted'" in err


@pytest.mark.slow
def test_missing_or_different_base_model_is_refused(
    trained_tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["generate", str(trained_tiny_run), "--prompt", PROMPT]
    code, _, err = call_cli([*args, "--model", str(tmp_path / "nowhere")], capsys)
    assert code == 2
    assert "nowhere is missing" in err

    changed = tmp_path / "model"
    shutil.copytree(TINY / "model", changed)
    config = json.loads((changed / "config.json").read_text())
    config["rms_norm_eps"] = config.get("rms_norm_eps", 1e-6) * 2
    (changed / "config.json").write_text(json.dumps(config))
    code, _, err = call_cli([*args, "--model", str(changed)], capsys)
    assert code == 2
    assert "config.json differs from the file the run trained on" in err

    (changed / "config.json").write_bytes((TINY / "model" / "config.json").read_bytes())
    (changed / "extra.safetensors").write_bytes(b"not part of the run")
    code, _, err = call_cli([*args, "--model", str(changed)], capsys)
    assert code == 2
    assert "extra.safetensors was not part of the run's model" in err


@pytest.mark.slow
def test_container_run_finds_its_plan_and_model_through_the_recorded_spec(
    trained_tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As `qlc run` leaves it: the model was mounted at /inputs/model, the run directory has
    no plan.json, and the runtime recorded the spec's path on the host."""
    from qlc.runtime.generate import RunInputError, open_run

    project = tmp_path / "project"
    (project / "specs").mkdir(parents=True)
    (project / "specs" / "tiny.toml").write_bytes(tiny_spec(TRAIN))
    shutil.copy(REPO / "specs" / "tiny.lock", project / "specs" / "tiny.lock")
    shutil.copytree(TINY / "model", project / "specs" / "tiny" / "model")
    moved = copy_run(trained_tiny_run, tmp_path / "run")
    (moved / "plan.json").unlink()
    manifest = json.loads((moved / "manifest.json").read_text())
    manifest["predicate"]["inputs"]["model"]["path"] = "/inputs/model"
    manifest["predicate"]["host"] = {"spec_path": str(project / "specs" / "tiny.toml")}
    (moved / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.chdir(tmp_path)  # no .qlc/contexts here

    opened = open_run(moved)
    assert opened.base.source == str((project / "specs" / "tiny" / "model").resolve())
    assert opened.plan == Plan.model_validate_json((trained_tiny_run / "plan.json").read_bytes())

    (project / "specs" / "tiny.toml").write_bytes(tiny_spec(TRAIN + "weight_decay = 0.5\n"))
    with pytest.raises(RunInputError, match="no plan with the manifest's plan_sha256"):
        open_run(moved)


@pytest.mark.slow
def test_model_card_written_before_the_final_manifest_keeps_the_run_usable(
    trained_tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The order the trainer uses: card first, then finish_manifest hashes adapter/ (card
    included), then the manifest is written."""
    import yaml

    from qlc.contract import sha256_file
    from qlc.trainer.model_card import write_model_card
    from qlc.trainer.provenance import finish_manifest, write_manifest

    run = copy_run(trained_tiny_run, tmp_path / "run")
    plan = Plan.model_validate_json((run / "plan.json").read_bytes())
    manifest = json.loads((run / "manifest.json").read_text())
    card = write_model_card(run, plan, manifest)
    finish_manifest(manifest, run, "succeeded", None)
    write_manifest(run, manifest)

    subjects = {s["name"]: s["digest"]["sha256"] for s in manifest["subject"]}
    assert subjects["adapter/README.md"] == sha256_file(card)
    text = card.read_text(encoding="utf-8")
    header = yaml.safe_load(text.split("\n---\n", 1)[0].removeprefix("---\n"))
    assert "base_model" not in header  # a local model folder is no hub id
    assert "the local model folder `model`" in text
    assert f"sha256:{subjects['adapter/adapter_model.safetensors']}" in text
    assert f"sha256:{manifest['predicate']['plan_sha256']}" in text
    args = ["generate", str(run), "--prompt", PROMPT, "--max-new-tokens", "4"]
    code, printed, err = call_cli(args, capsys)
    assert code == 0, err
    assert printed.strip()


@pytest.mark.slow
def test_the_trained_run_carries_its_model_card(trained_tiny_run: Path) -> None:
    import hashlib

    import yaml

    card = trained_tiny_run / "adapter" / "README.md"
    text = card.read_text(encoding="utf-8")
    header = yaml.safe_load(text.split("\n---\n", 1)[0].removeprefix("---\n"))
    manifest = json.loads((trained_tiny_run / "manifest.json").read_text())
    subjects = {s["name"]: s["digest"]["sha256"] for s in manifest["subject"]}
    assert "base_model" not in header and "datasets" in header
    assert header["library_name"] == "peft" and "qlc" in header["tags"]
    assert subjects["adapter/README.md"] == hashlib.sha256(card.read_bytes()).hexdigest()
    assert f"sha256:{subjects['adapter/adapter_model.safetensors']}" in text
    assert "qlc reproduce manifest.json" in text
