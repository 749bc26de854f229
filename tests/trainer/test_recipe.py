"""The run, top to bottom, as the compiled train.py calls it: what it refuses before writing
anything (an edited train.py, a plan of another version, a directory that is not its own), the
data problems it stops on before any model loads (issue 19), and the adapter swap.

The CPU trainings of the tiny spec live in test_training.py (one shared run) and
test_distributed.py (two gloo processes)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
from trainer_support import (
    TINY_MODEL,
    compile_to,
    edited_spec,
    manifest,
    run_train,
)

from qlc import contract
from qlc.compiler.plan import Plan
from qlc.trainer.errors import UserError
from qlc.trainer.recipe import check_settings, publish_adapter, read_plan, settings_text

PLAN_SHA = "a" * 64


# --- the plan and train.py's settings -------------------------------------------------------


def test_the_plan_is_read_beside_train_py_or_from_qlc_plan(tiny_context: Path) -> None:
    script = str(tiny_context / "train.py")
    plan, data = read_plan(script, {})
    assert data == (tiny_context / "plan.json").read_bytes() and plan.spec_name == "specs/tiny.toml"
    with pytest.raises(UserError, match=r"cannot read the plan /nowhere/plan\.json: No such file"):
        read_plan(script, {contract.ENV_PLAN: "/nowhere/plan.json"})


def test_a_plan_of_another_version_is_refused(tiny_context: Path, tmp_path: Path) -> None:
    plan = json.loads((tiny_context / "plan.json").read_text())
    plan["version"] = 1
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    with pytest.raises(UserError) as caught:
        read_plan(str(tiny_context / "train.py"), {contract.ENV_PLAN: str(tmp_path / "plan.json")})
    message = str(caught.value)
    assert "plan.json is not a plan this trainer reads (" in message
    assert message.endswith("): recompile the spec with this qlc")
    (tmp_path / "plan.json").write_text("{}")
    with pytest.raises(UserError, match="not a plan this trainer reads"):
        read_plan("train.py", {contract.ENV_PLAN: str(tmp_path / "plan.json")})


def test_train_py_settings_must_be_the_plans(tiny_plan: Plan) -> None:
    settings = {row.name: row.value for row in tiny_plan.settings()}
    check_settings(tiny_plan, settings)
    with pytest.raises(UserError) as caught:
        check_settings(tiny_plan, {**settings, "lora_r": 64, "learning_rate": 1.0})
    assert str(caught.value) == (
        "train.py says learning_rate = 1.0 but plan.json says 0.01 (2 setting(s) differ): "
        "train.py is generated from the plan; change the spec and recompile instead of editing it"
    )
    with pytest.raises(UserError, match=r"train\.py says seed = null but plan\.json says 42"):
        check_settings(tiny_plan, {k: v for k, v in settings.items() if k != "seed"})
    with pytest.raises(UserError, match=r"train\.py says extra = 1 but plan\.json says null"):
        check_settings(tiny_plan, {**settings, "extra": 1})


def test_the_settings_table_names_every_source(tiny_plan: Plan) -> None:
    lines = settings_text(tiny_plan).splitlines()
    assert len(lines) == len(tiny_plan.settings())
    assert any(line.startswith("lora_r ") and line.endswith("8  (lora.r)") for line in lines)


def test_an_edited_train_py_stops_before_writing_anything(
    tiny_context: Path, tmp_path: Path
) -> None:
    context = tmp_path / "ctx"
    shutil.copytree(tiny_context, context)
    script = context / "train.py"
    text = script.read_text()
    assert '"lora_r": 8,' in text
    script.write_text(text.replace('"lora_r": 8,', '"lora_r": 64,'))
    out = tmp_path / "out"
    result = run_train(context, out)
    assert result.returncode == contract.EXIT_USER_ERROR, result.stderr[-3000:]
    assert result.stderr == (
        "error: train.py says lora_r = 64 but plan.json says 8 (1 setting(s) differ): train.py "
        "is generated from the plan; change the spec and recompile instead of editing it\n"
    )
    assert not out.exists()


# --- the run directory ----------------------------------------------------------------------


def test_a_new_directory_is_claimed_with_a_marker(tmp_path: Path) -> None:
    out = tmp_path / "runs" / "r1"
    assert contract.claim_run_dir(out, PLAN_SHA, "tiny", "r1") is None
    claimed = json.loads((out / contract.RUN_MARKER).read_text())
    assert claimed == {"plan_sha256": PLAN_SHA, "job": "tiny", "run_id": "r1"}
    empty = tmp_path / "empty"
    empty.mkdir()
    assert contract.claim_run_dir(empty, PLAN_SHA, "tiny", None) is None
    assert (empty / contract.RUN_MARKER).is_file()


def test_a_directory_with_foreign_files_is_refused(tmp_path: Path) -> None:
    for name in ("plan.json", "report.md", "notes.txt", "z"):
        (tmp_path / name).write_text("mine")
    problem = contract.claim_run_dir(tmp_path, PLAN_SHA, "tiny", None)
    assert problem == (
        f"{tmp_path} is not a qlc run directory (it holds notes.txt, plan.json, report.md ... "
        "and no .qlc-run): a run writes only into a new directory or one qlc made for the "
        "same plan"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "notes.txt",
        "plan.json",
        "report.md",
        "z",
    ]


def test_another_plans_run_and_a_finished_run_are_refused(tmp_path: Path) -> None:
    assert contract.claim_run_dir(tmp_path, "b" * 64, "other-job", None) is None
    problem = contract.claim_run_dir(tmp_path, PLAN_SHA, "tiny", None)
    assert problem is not None and "holds a run of another plan (job 'other-job')" in problem
    mine = tmp_path / "mine"
    assert contract.claim_run_dir(mine, PLAN_SHA, "tiny", None) is None
    (mine / contract.MANIFEST_FILE).write_text(json.dumps({"predicate": {"status": "running"}}))
    assert contract.claim_run_dir(mine, PLAN_SHA, "tiny", None) is None  # unfinished: resumed
    (mine / contract.MANIFEST_FILE).write_text(json.dumps({"predicate": {"status": "succeeded"}}))
    problem = contract.claim_run_dir(mine, PLAN_SHA, "tiny", None)
    assert problem == f"{mine} holds a finished run (status succeeded): it is never rewritten"
    (mine / contract.RUN_MARKER).write_text("{broken")
    problem = contract.claim_run_dir(mine, PLAN_SHA, "tiny", None)
    assert problem is not None and "is unreadable" in problem


def test_a_finished_run_is_never_rewritten(tiny_context: Path, tmp_path: Path) -> None:
    plan_sha = contract.sha256_file(tiny_context / "plan.json")
    assert contract.claim_run_dir(tmp_path, plan_sha, "tiny", None) is None
    (tmp_path / contract.MANIFEST_FILE).write_text('{"predicate": {"status": "succeeded"}}')
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    result = run_train(tiny_context, tmp_path)
    assert result.returncode == contract.EXIT_USER_ERROR, result.stderr[-3000:]
    assert f"error: {tmp_path} holds a finished run (status succeeded)" in result.stderr
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_a_run_never_writes_into_a_foreign_directory(tiny_context: Path, tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text("my own notes")
    result = run_train(tiny_context, tmp_path)
    assert result.returncode == contract.EXIT_USER_ERROR, result.stderr[-3000:]
    assert f"error: {tmp_path} is not a qlc run directory" in result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]
    assert (tmp_path / "manifest.json").read_text() == "my own notes"


# --- data problems stop the run before any model loads (issue 19) ---------------------------


@pytest.fixture(scope="module")
def trap_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model's tokenizer and config with weights that cannot load: a run that loaded
    the model would fail with another error than the data's."""
    folder = tmp_path_factory.mktemp("trap-model")
    for path in TINY_MODEL.iterdir():
        shutil.copy(path, folder / path.name)
    (folder / "model.safetensors").write_bytes(b"not safetensors")
    return folder


@pytest.fixture(scope="module")
def contexts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """specs/tiny.toml compiled for each data file format (the format follows data.path)."""
    made = {}
    for suffix in ("jsonl", "parquet", "csv"):
        source = edited_spec("tiny.toml", {'"tiny/data.jsonl"': f'"tiny/data.{suffix}"'})
        made[suffix] = compile_to("tiny.toml", tmp_path_factory.mktemp(f"ctx-{suffix}"), source)
    return made


@pytest.fixture(scope="module")
def no_training_stack(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A PYTHONPATH folder on which transformers, peft and trl cannot be imported: a file that
    cannot be read stops the run before the training stack even loads."""
    folder = tmp_path_factory.mktemp("no-training-stack")
    for name in ("transformers", "peft", "trl"):
        (folder / name).mkdir()
        (folder / name / "__init__.py").write_text(f"raise ImportError('{name} was imported')\n")
    return folder


def rows_file(*rows: Any) -> bytes:
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


# Rows that read but have no text: found by rendering, once the tokenizer is loaded.
SHAPE_PROBLEMS = ("no-text.jsonl", "wrong-field.jsonl")
DATA_PROBLEMS = [
    ("empty.jsonl", b"", r"data file {path} is empty: it needs at least one row"),
    ("blank.jsonl", b"\n  \n", r"data file {path} is empty: it needs at least one row"),
    ("broken.jsonl", b'{"text": "ok"}\n{"text": oops}\n', r"{path}:2: not a JSON line"),
    ("latin1.jsonl", b'{"text": "caf\xe9"}\n', r"{path}:1: not UTF-8 text \(byte 0xe9"),
    ("list.jsonl", b'{"text": "ok"}\n[1, 2]\n', r"{path}:2: a row must be a JSON object, got list"),
    ("wide.csv", b'text\n"a","b"\n', r"{path}:2: more values than the header has columns"),
    ("corrupt.parquet", b"PAR1 not really PAR1", r"{path}: not a readable parquet file"),
    (  # rows 8 and 10 are held out for evaluation (seeded): rows keep their file numbers
        "no-text.jsonl",
        rows_file(
            *[{"text": "ok"}] * 8,
            {"text": None},
            {"text": "ok"},
            *[{"text": None}] * 3,
            *[{"text": ""}] * 3,
        ),
        r"{path}: 7 of 14 train rows have no text to train on \('text' is null: rows 9, 11, 12, "
        r"13; 'text' is an empty string: rows 14, 15, 16\): fix the data",
    ),
    (
        "wrong-field.jsonl",
        rows_file(*[{"body": "no text field here"}] * 8),
        r"{path}: no train row has the field 'text' that data\.format = 'text' reads "
        r"\(fields: 'body'\)",
    ),
]


@pytest.mark.parametrize(
    ("name", "content", "message"), DATA_PROBLEMS, ids=[p[0] for p in DATA_PROBLEMS]
)
def test_bad_data_stops_the_run_before_any_model_loads(
    contexts: dict[str, Path],
    trap_model: Path,
    no_training_stack: Path,
    tmp_path: Path,
    name: str,
    content: bytes,
    message: str,
) -> None:
    data = tmp_path / name
    data.write_bytes(content)
    out = tmp_path / "out"
    context = contexts[name.rsplit(".", 1)[1]]
    extra = {contract.ENV_DATA_PATH: str(data), contract.ENV_MODEL_PATH: str(trap_model)}
    if name not in SHAPE_PROBLEMS:
        extra["PYTHONPATH"] = str(no_training_stack)
    result = run_train(context, out, **extra)
    assert result.returncode == contract.EXIT_USER_ERROR, result.stderr[-3000:]
    expected = message.format(path=re.escape(str(data)))
    assert re.search(f"^error: {expected}", result.stderr, re.MULTILINE), result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    predicate = manifest(out)["predicate"]
    assert predicate["status"] == "failed" and re.match(expected, predicate["error"])
    assert manifest(out)["subject"] == [] and predicate["metrics"] == {}
    assert predicate["inputs"] == {"model": {}, "data": {}}  # recorded once the model loaded
    assert not (out / contract.DATA_REPORT_FILE).exists()
    assert not (out / contract.METRICS_FILE).exists()


# --- publishing the adapter -----------------------------------------------------------------


def test_the_adapter_is_swapped_in_whole(tmp_path: Path) -> None:
    old = tmp_path / contract.ADAPTER_DIR
    old.mkdir()
    (old / "adapter_model.safetensors").write_bytes(b"old")
    staging = tmp_path / contract.ADAPTER_STAGING_DIR
    staging.mkdir()
    (staging / "adapter_model.safetensors").write_bytes(b"new")
    config = {"target_modules": ["v_proj", "q_proj", "k_proj"], "r": 8}
    (staging / "adapter_config.json").write_text(json.dumps(config))
    publish_adapter(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [contract.ADAPTER_DIR]
    assert (old / "adapter_model.safetensors").read_bytes() == b"new"
    written = json.loads((old / "adapter_config.json").read_text())
    assert written["target_modules"] == ["k_proj", "q_proj", "v_proj"]  # the same bytes each run


def test_missing_gpus_stop_the_run_with_a_failed_manifest(tmp_path: Path) -> None:
    source = edited_spec("tiny.toml", {"gpus = 0\n": "gpus = 2\n", 'python = "3.11"\n': ""})
    context = compile_to("tiny.toml", tmp_path / "ctx", source)
    result = run_train(context, tmp_path / "out", CUDA_VISIBLE_DEVICES="")
    assert result.returncode == contract.EXIT_USER_ERROR, result.stderr[-3000:]
    assert "error: runtime.gpus = 2 asks for 2 GPU(s) but 0 are visible" in result.stderr
    assert "Traceback" not in result.stderr and "launching" not in result.stdout
    predicate = manifest(tmp_path / "out")["predicate"]
    assert predicate["status"] == "failed" and "0 are visible" in predicate["error"]
