"""qlc data on the shipped specs: the first examples as training renders them with their loss
mask (marks when piped, styles in a terminal), the counts and checks, the length histogram as
text and PNG, and the plan's own step and token arithmetic; a hub input without the hub is a
clear error at once."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console
from tiny_runs import call_cli

from qlc import cli
from qlc.compiler.context import plan_spec
from qlc.runtime.data_preview import histogram, preview

REPO = Path(__file__).resolve().parents[2]
SPECS = REPO / "specs"


@pytest.fixture(scope="module")
def chat_preview() -> object:
    spec = SPECS / "chat.toml"
    plan, _ = plan_spec(spec.read_bytes(), "specs/chat.toml")
    return preview(plan, spec, shown=2)


def test_chat_examples_show_the_trained_answers_between_marks(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    png = tmp_path / "lengths.png"
    code, out, err = call_cli(
        ["data", str(SPECS / "chat.toml"), "--rows", "2", "--histogram", str(png)], capsys
    )
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "loss mask: trained text between {+ and +}; the rest is masked"
    assert lines[1] == "--- training example 1 of 14: 41 tokens, 20 trained"
    assert lines[2] == (
        "<s>[INST] What is the capital of France? [/INST]{+ The capital of France is Paris. </s>+}"
    )
    assert "rows: 14 for training, 2 for evaluation" in lines
    assert "  examples per step: batch_size 4 x grad_accum 2 x 1 process(es) = 8" in lines
    assert "  14 training examples -> 2 steps per epoch; 3 epoch(s): 6 steps" in lines
    assert "  EOS '</s>': 14 of 14 examples end with it, trained (0 appended by qlc)" in lines
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"histogram: {png}" in lines


def test_multi_turn_answers_are_each_marked(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = call_cli(["data", str(SPECS / "chat.toml"), "--rows", "14"], capsys)
    assert code == 0
    (line,) = [line for line in out.splitlines() if line.count("{+") == 2]  # the 2-turn row
    first, between, second = re.fullmatch(r".*?\{\+(.+?)\+\}(.+?)\{\+(.+?)\+\}", line).groups()
    assert first.endswith("</s>") and second.endswith("</s>")
    assert between.startswith("<s>[INST]") and between.endswith("[/INST]")  # the user: masked


def test_text_spec_counts_truncation_and_the_max_steps_arithmetic(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, _ = call_cli(["data", str(SPECS / "tiny.toml"), "--rows", "1"], capsys)
    assert code == 0
    lines = out.splitlines()
    assert lines[2].startswith("{+<s>[INST]") and lines[2].endswith("</s>+}")
    assert "  over data.max_length = 128 (truncated): " in out
    assert (
        "  56 training examples -> 14 steps per epoch; train.max_steps = 12: 12 steps "
        "(0.86 epochs)" in lines
    )
    assert re.search(r"BOS '<s>': 56 of 56 examples start with it; 56 had it twice", out)


def test_a_sample_estimates_the_epoch_from_the_rows_tokenized(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, _ = call_cli(
        ["data", str(SPECS / "tiny.toml"), "--rows", "0", "--sample", "28"], capsys
    )
    assert code == 0
    assert "rows: 56 for training (the first 28 tokenized), 8 for evaluation" in out
    assert "  about 56 training examples -> 14 steps per epoch" in out
    assert re.search(r"tokens per epoch: about [\d,]+ \(about [\d,]+ trained\)", out)


def test_in_a_terminal_trained_text_is_styled(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    screen = io.StringIO()
    monkeypatch.setattr(
        cli,
        "out",
        Console(file=screen, force_terminal=True, color_system="standard", highlight=False),
    )
    code, _, _ = call_cli(["data", str(SPECS / "instruction.toml"), "--rows", "1"], capsys)
    assert code == 0
    shown = screen.getvalue()
    assert "trained tokens in green" in shown and "{+" not in shown
    assert "\x1b[1;32m" in shown and "\x1b[2m" in shown  # bold green and dim


def test_the_preview_is_the_trainer_s_own_preparation(chat_preview: object) -> None:
    from qlc.runtime.data_preview import Preview
    from qlc.trainer.examples import prepare
    from qlc.trainer.model import ModelSource, load_tokenizer
    from qlc.trainer.rows import load_rows

    assert isinstance(chat_preview, Preview)
    plan = chat_preview.plan
    rows = load_rows(plan, str(SPECS / "chat" / "data.jsonl"), None)
    tokenizer = load_tokenizer(plan, ModelSource(str(SPECS / "tiny" / "model"), None, True))
    prepared = prepare(rows.train, plan.data, tokenizer, rows.source, "train")
    assert chat_preview.train.examples == prepared.examples
    assert chat_preview.train.report == prepared.report
    assert [s.labels for s in chat_preview.shown] == [e["labels"] for e in prepared.examples[:2]]


def test_histogram_bins_cover_every_length() -> None:
    bins = histogram([5, 5, 6, 40, 100])
    assert sum(count for _, _, count in bins) == 5
    assert bins[0][0] == 5 and bins[-1][1] >= 100


def test_a_hub_input_without_the_hub_is_a_clear_error_at_once() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env["HF_ENDPOINT"] = "http://127.0.0.1:9"  # nothing listens on port 9
    started = time.perf_counter()
    command = [sys.executable, "-m", "qlc", "data", str(SPECS / "guanaco.toml")]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and time.perf_counter() - started < 60
    assert "the Hugging Face hub is not reachable from here (only its cache was read)" in (
        done.stderr)  # fmt: skip
    assert "cannot load dataset 'mlabonne/guanaco-llama2-1k'" in done.stderr
    assert "Retrying" not in done.stderr and "Traceback" not in done.stderr
