"""The rendered train.py: valid, lint-clean Python for every spec, user strings only as data,
and data rendering with the right special tokens and loss masks (fast: no training)."""

from __future__ import annotations

import ast
import hashlib
import json
import py_compile
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from conftest import GUANACO, REPO, SPECS, compile_to

SPEC_NAMES = sorted(p.name for p in SPECS.glob("*.toml"))


@pytest.mark.parametrize("spec_name", SPEC_NAMES)
def test_script_compiles_and_passes_ruff(spec_name: str, tmp_path: Path) -> None:
    context = compile_to(spec_name, tmp_path)
    py_compile.compile(str(context / "train.py"), doraise=True)
    for command in (["check"], ["format", "--check"]):
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "ruff",
                *command,
                "--config",
                str(REPO / "pyproject.toml"),
                str(context / "train.py"),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode == 0, result.stdout + result.stderr


def test_script_reads_plan_at_run_time_and_bakes_no_spec_values(tmp_path: Path) -> None:
    hostile = 'x"""\nimport os; os.system("echo pwned") #\\'
    source = (
        (SPECS / "tiny.toml")
        .read_text()
        .replace('path = "tiny/model"', f"path = {json.dumps(hostile)}")
    )
    context = compile_to("tiny.toml", tmp_path, source.encode())
    code = (context / "train.py").read_text()
    assert hostile not in code and "pwned" not in code
    assert json.loads((context / "plan.json").read_text())["spec"]["model"]["path"] == hostile
    tree = ast.parse(code)
    doc = ast.get_docstring(tree) or ""
    assert '"specs/tiny.toml"' in doc and "sha256" in doc


def test_hostile_spec_name_stays_inside_the_docstring() -> None:
    from qlc.compiler.context import compile_spec

    name = 'evil"""; import os #\\.toml'
    context = compile_spec((SPECS / "tiny.toml").read_bytes(), name, require_lock=False)
    tree = ast.parse(context.files["train.py"].decode())
    assert f'spec:   "{name}"' in (ast.get_docstring(tree) or "")
    first_code = tree.body[1]
    assert isinstance(first_code, ast.ImportFrom) and first_code.module == "__future__"


def test_importing_the_script_has_no_side_effects(tmp_path: Path) -> None:
    context = compile_to("tiny.toml", tmp_path / "ctx")
    probe = (
        "import importlib.util, sys\n"
        f"s = importlib.util.spec_from_file_location('t', {str(context / 'train.py')!r})\n"
        "m = importlib.util.module_from_spec(s); sys.modules['t'] = m; s.loader.exec_module(m)\n"
        "print(callable(m.main))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=False
    )
    assert result.stdout.strip() == "True", result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ctx"]


# --- data: rendering, special tokens, masks -------------------------------------------------


def data_spec(script: ModuleType, **data: Any) -> dict[str, Any]:
    spec = json.loads((Path(script.__file__).parent / "plan.json").read_text())["spec"]
    spec["data"].update(data)
    return spec


def test_guanaco_text_gets_one_bos_and_a_trained_eos(
    script: ModuleType, tiny_tokenizer: Any
) -> None:
    import pyarrow.parquet as pq

    rows = pq.read_table(GUANACO).slice(0, 8).to_pylist()
    spec = data_spec(script, max_length=100_000)
    examples, _rendered, report = script.prepare_examples(rows, spec, tiny_tokenizer, "train")
    bos, eos = tiny_tokenizer.bos_token_id, tiny_tokenizer.eos_token_id
    assert report["doubled_bos_fixed"] == 8 and report["eos_appended"] == 0
    for row, example in zip(rows, examples, strict=True):
        ids, labels = example["input_ids"], example["labels"]
        assert ids[0] == bos and ids[1] != bos
        assert ids.count(bos) == row["text"].count("<s>")
        assert ids[-1] == eos and labels[-1] == eos
        assert labels == ids  # loss "all"


def test_instruction_masks_the_prompt_and_trains_response_and_eos(
    script: ModuleType, tiny_tokenizer: Any
) -> None:
    spec = data_spec(
        script, format="instruction", loss="completion", input_field="input", max_length=1024
    )
    rows = [{"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}]
    (example,), (rendered,), report = script.prepare_examples(rows, spec, tiny_tokenizer, "train")
    assert "### Input:\n2 and 3" in rendered.text and rendered.text.endswith("### Response:\n5")
    trained = [
        i for i, label in zip(example["input_ids"], example["labels"], strict=True) if label != -100
    ]
    assert tiny_tokenizer.decode(trained) == "5</s>"
    assert report["eos_appended"] == 1 and report["trained_tokens"] == len(trained)
    prompt_len = len(tiny_tokenizer(rendered.prompt)["input_ids"])
    assert all(label == -100 for label in example["labels"][:prompt_len])


def test_instruction_without_input_uses_the_short_template(
    script: ModuleType, tiny_tokenizer: Any
) -> None:
    spec = data_spec(
        script,
        format="instruction",
        loss="all",
        input_field="input",
        template="chatml",
        prompt_field="q",
        response_field="a",
    )
    rows = [{"q": "Say hi.", "input": "", "a": "hi"}]
    (example,), (rendered,), _ = script.prepare_examples(rows, spec, tiny_tokenizer, "train")
    assert (
        rendered.text
        == "<|im_start|>user\nSay hi.<|im_end|>\n<|im_start|>assistant\nhi<|im_end|>\n"
    )
    assert all(label != -100 for label in example["labels"])


def test_chat_trains_every_assistant_turn_only(script: ModuleType, tiny_tokenizer: Any) -> None:
    spec = data_spec(script, format="chat", loss="completion", messages_field="conv")
    conv = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi?"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye?"},
        {"role": "assistant", "content": "Bye."},
    ]
    (example,), (rendered,), report = script.prepare_examples(
        [{"conv": conv}], spec, tiny_tokenizer, "c"
    )
    ids, labels = example["input_ids"], example["labels"]
    assert ids.count(tiny_tokenizer.bos_token_id) == rendered.text.count("<s>")
    assert ids[0] == tiny_tokenizer.bos_token_id and ids[1] != tiny_tokenizer.bos_token_id
    trained_runs, current = [], []
    for tid, label in zip(ids, labels, strict=True):
        if label != -100:
            current.append(tid)
        elif current:
            trained_runs.append(tiny_tokenizer.decode(current))
            current = []
    trained_runs.append(tiny_tokenizer.decode(current))
    assert [run.strip() for run in trained_runs if run] == ["Hello. </s>", "Bye. </s>"]
    assert rendered.prompt.endswith("Bye? [/INST]")
    assert report["eos_appended"] == 0


def test_chat_without_a_template_is_an_error(script: ModuleType, tiny_tokenizer: Any) -> None:
    spec = data_spec(script, format="chat")
    template = tiny_tokenizer.chat_template
    tiny_tokenizer.chat_template = None
    try:
        with pytest.raises(script.UserError, match="no chat template"):
            script.prepare_examples([{"messages": []}], spec, tiny_tokenizer, "train")
    finally:
        tiny_tokenizer.chat_template = template


def test_all_masked_and_nothing_left_are_errors(script: ModuleType, tiny_tokenizer: Any) -> None:
    spec = data_spec(script, format="instruction", loss="completion", max_length=8)
    rows = [{"instruction": "A long instruction that fills the window", "output": "ok"}]
    with pytest.raises(script.UserError, match="no train example is left after truncating"):
        script.prepare_examples(rows, spec, tiny_tokenizer, "train")
    spec = data_spec(script, format="chat", loss="completion")
    with pytest.raises(script.UserError, match="no assistant message"):
        script.prepare_examples(
            [{"messages": [{"role": "user", "content": "x"}]}], spec, tiny_tokenizer, "train"
        )
    with pytest.raises(script.UserError, match="no field 'text'"):
        script.prepare_examples([{"body": "x"}], data_spec(script), tiny_tokenizer, "train")


def test_truncation_is_counted_and_keeps_max_length(
    script: ModuleType, tiny_tokenizer: Any
) -> None:
    spec = data_spec(script, max_length=16)
    rows = [{"text": "<s>[INST] hello there [/INST] " + "word " * 40 + "</s>"}, {"text": "hi"}]
    examples, _, report = script.prepare_examples(rows, spec, tiny_tokenizer, "train")
    assert len(examples[0]["input_ids"]) == 16 and report["truncated"] == 1
    assert report["longest"] == 16 and report["examples"] == 2


def test_example_display_marks_masked_tokens(script: ModuleType, tiny_tokenizer: Any) -> None:
    spec = data_spec(script, format="instruction", loss="completion", max_length=1024)
    rows = [{"instruction": "Say yes.", "output": "yes"}]
    (example,), (rendered,), _ = script.prepare_examples(rows, spec, tiny_tokenizer, "train")
    shown = script.show_example(rendered, example, tiny_tokenizer)
    assert "'<s>'~" in shown and "'</s>'~" not in shown and "'</s>'" in shown


def test_local_data_split_rules_and_eval_fraction(script: ModuleType, tmp_path: Path) -> None:
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(20)))
    env = script.Env.read({"QLC_DATA_PATH": str(data)})
    spec = data_spec(script, eval_fraction=0.25)
    rows, eval_rows = script.load_rows(spec, env)
    assert len(rows) == 15 and len(eval_rows) == 5
    assert {r["text"] for r in rows}.isdisjoint(r["text"] for r in eval_rows)
    assert script.load_rows(spec, env) == (rows, eval_rows)  # seeded
    with pytest.raises(script.UserError, match="local file is one split"):
        script.load_rows(data_spec(script, split="validation"), env)
    smoke = script.Env.read({"QLC_DATA_PATH": str(data), "QLC_SMOKE": "1"})
    assert smoke.smoke and script.load_rows(data_spec(script, eval_fraction=0.0), smoke)[0][0] == {
        "text": "row 0"
    }


def test_latest_checkpoint_skips_incomplete_ones(script: ModuleType, tmp_path: Path) -> None:
    for step, complete in ((2, True), (4, True), (6, False)):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        if complete:
            (folder / script.COMPLETE_MARKER).write_text("{}")
    (tmp_path / "checkpoint-x").mkdir()
    assert script.latest_checkpoint(tmp_path).name == "checkpoint-4"
    assert script.latest_checkpoint(tmp_path / "missing") is None


def test_manifest_lists_adapter_files_only_on_success(
    script: ModuleType, tmp_path: Path, tiny_context: Path
) -> None:
    plan_bytes = (tiny_context / "plan.json").read_bytes()
    env = script.Env.read({"QLC_OUTPUT_DIR": str(tmp_path)})
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_model.safetensors").write_bytes(b"weights")
    made = script.new_manifest(json.loads(plan_bytes), plan_bytes, env)
    assert made["predicate"]["status"] == "running" and made["subject"] == []
    script.finish_manifest(made, tmp_path, "failed", "boom")
    assert made["subject"] == [] and made["predicate"]["error"] == "boom"
    script.finish_manifest(made, tmp_path, "succeeded", None)
    digest = hashlib.sha256(b"weights").hexdigest()
    assert made["subject"] == [
        {"name": "adapter/adapter_model.safetensors", "digest": {"sha256": digest}}
    ]
    predicate = made["predicate"]
    assert predicate["spec"]["name"] == "specs/tiny.toml" and len(predicate["plan_sha256"]) == 64
    assert (
        predicate["environment"]["packages"]["torch"] and "uid" in predicate["environment"]["user"]
    )
