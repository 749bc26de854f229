"""qlc validate --inputs: paths, the model's architecture, the fields data.format reads in the
first rows, the chat template's completion mask; a wrong field name fails in under two seconds
with the fields listed, and `qlc run SPEC` stops on it before any build or launch."""

from __future__ import annotations

import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tiny_runs import call_cli

REPO = Path(__file__).resolve().parents[2]
SHIPPED = ("chat", "instruction", "guanaco")


def project(tmp_path: Path, spec: str = "tiny.toml", **edits: str) -> Path:
    """specs/<spec> and the tiny assets copied into tmp_path, with text edits made."""
    shutil.copytree(REPO / "specs" / "tiny", tmp_path / "tiny")
    for folder in ("chat", "instruction"):
        shutil.copytree(REPO / "specs" / folder, tmp_path / folder)
    text = (REPO / "specs" / spec).read_text()
    for old, new in edits.items():
        assert old in text
        text = text.replace(old, new)
    path = tmp_path / spec
    path.write_text(text)
    return path


def test_a_wrong_field_name_fails_in_under_two_seconds_listing_the_fields(
    tmp_path: Path,
) -> None:
    spec = project(tmp_path, **{'text_field = "text"': 'text_field = "body"'})
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "qlc", "validate", "--inputs", str(spec)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    assert done.returncode == 2, done.stderr
    assert done.stderr == (
        f"{spec}: error: data.path: data.text_field = 'body', but no row among the first 64 of "
        "data.jsonl has that field; the rows' fields: 'text': set data.text_field to the one "
        "that holds the text\n"
    )
    assert "Traceback" not in done.stderr and "ok" not in done.stdout
    # CPU seconds: what the command costs on an idle machine (CI's), whatever else runs here
    assert cpu < 2.0, (cpu, wall)


def test_shipped_specs_pass_with_what_was_checked(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = call_cli(
        ["validate", "--inputs", *(str(REPO / "specs" / f"{n}.toml") for n in SHIPPED)],
        capsys,
    )
    assert code == 0, err
    assert f"{REPO}/specs/chat.toml: ok (inputs too)" in out
    assert "chat template: assistant turns found for the completion-only loss" in out
    assert "data.path: the first 16 rows have the fields 'instruction', 'output'" in out
    assert "model.id = 'NousResearch/Llama-2-7b-chat-hf': on the hub (not checked here)" in out


def test_missing_paths_are_each_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = project(
        tmp_path,
        **{
            'path = "tiny/model"': 'path = "gone/model"',
            'path = "tiny/data.jsonl"': 'path = "gone.jsonl"',
        },
    )
    code, _, err = call_cli(["validate", "--inputs", str(spec)], capsys)
    assert code == 2
    assert f"model.path = 'gone/model': no such directory ({tmp_path}/gone/model;" in err
    assert f"data.path = 'gone.jsonl': no such file ({tmp_path}/gone.jsonl;" in err


def test_an_architecture_other_than_the_model_s_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = project(tmp_path, **{'architecture = "llama"': 'architecture = "qwen3"'})
    code, _, err = call_cli(["validate", "--inputs", str(spec)], capsys)
    assert code == 2
    assert (
        "model_type 'llama' is not model.architecture = 'qwen3' (model_type qwen3): set "
        "model.architecture to the model's family"
    ) in err


def test_rows_without_text_warn_and_a_majority_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = project(tmp_path)
    data = tmp_path / "tiny" / "data.jsonl"
    lines = data.read_text().splitlines()
    data.write_text("\n".join([json.dumps({"text": None}), *lines]) + "\n")
    code, _, err = call_cli(["validate", "--inputs", str(spec)], capsys)
    assert code == 0, err
    assert (
        "1 of the first 65 rows of data.jsonl have no text to train on ('text' is null: "
        "rows 1): they are left out of training"
    ) in err
    data.write_text("\n".join([json.dumps({"text": 3})] * 3) + "\n")
    code, _, err = call_cli(["validate", "--inputs", str(spec)], capsys)
    assert code == 2 and "'text' is a number: rows 1, 2, 3): fix the data" in err


def test_keys_that_do_not_apply_are_warnings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = project(tmp_path, **{'text_field = "text"': 'text_field = "text"\nmessages_field = "m"'})
    code, _, err = call_cli(["validate", "--inputs", str(spec)], capsys)
    assert code == 0
    assert 'data.messages_field: does not apply to data.format = "text"' in err


def test_a_template_without_the_completion_mask_is_named_with_the_alternative(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rewriting = (
        "{% for m in messages %}{{ m['content'] }}{% if loop.last %}!{% endif %}{% endfor %}"
    )
    spec = project(
        tmp_path,
        "chat.toml",
        **{'loss = "completion"': f'loss = "completion"\nchat_template = {json.dumps(rewriting)}'},
    )
    code, _, err = call_cli(["validate", "--inputs", str(spec)], capsys)
    assert code == 2
    assert "chat template: the chat template does not render a conversation as the prefix" in err
    assert 'use data.loss = "all"' in err


def test_a_chat_template_file_is_found_and_used(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = project(
        tmp_path,
        "chat.toml",
        **{'loss = "completion"': 'loss = "completion"\nchat_template_file = "t/chat.jinja"'},
    )
    code, _, err = call_cli(["validate", "--inputs", str(spec)], capsys)
    assert code == 2 and "data.chat_template_file = 't/chat.jinja': no such file" in err
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "chat.jinja").write_text(
        "{% for m in messages %}{{ m['content'] }}{% if loop.last %}!{% endif %}{% endfor %}"
    )
    code, _, err = call_cli(["validate", "--inputs", str(spec)], capsys)
    assert code == 2 and "the chat template does not render a conversation as the prefix" in err


def test_qlc_run_stops_on_a_wrong_field_before_building(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = project(tmp_path, **{'text_field = "text"': 'text_field = "body"'})
    started = time.perf_counter()
    code, _, err = call_cli(["run", str(spec)], capsys)  # no daemon is asked for anything
    assert code == 2 and time.perf_counter() - started < 30
    assert "data.text_field = 'body', but no row among the first 64" in err
    assert "the inputs above must be fixed before the run (nothing ran)" in err
    assert not (tmp_path / ".qlc").exists() and not (tmp_path / "runs").exists()
