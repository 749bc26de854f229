from __future__ import annotations

import io

from rich.console import Console

from qlc.runtime.progress import BuildProgress, RunProgress, describe, parse_progress


def plain_console() -> tuple[Console, io.StringIO]:
    buffer = io.StringIO()
    return Console(file=buffer, force_terminal=False, width=200), buffer


def test_parse_progress_reads_the_contract_line() -> None:
    line = 'QLC_PROGRESS {"step": 3, "max_steps": 12, "loss": 2.5, "elapsed_s": 6.0}'
    assert parse_progress(line) == {"step": 3, "max_steps": 12, "loss": 2.5, "elapsed_s": 6.0}


def test_parse_progress_ignores_other_and_broken_lines() -> None:
    assert parse_progress("loss 2.5") is None
    assert parse_progress("QLC_PROGRESS {broken") is None
    assert parse_progress('QLC_PROGRESS {"loss": 1}') is None  # no step
    assert parse_progress("QLC_PROGRESS [1, 2]") is None


def test_describe_includes_eta_and_speed() -> None:
    event = {
        "step": 3,
        "max_steps": 12,
        "loss": 2.5,
        "lr": 0.002,
        "tokens_per_s": 1234.5,
        "elapsed_s": 6.0,
    }
    assert describe(event) == "step 3/12 loss 2.5000 lr 2.0e-03 1,234 tok/s eta 0:18"


def test_describe_survives_missing_and_nan_values() -> None:
    assert describe({"step": 1, "loss": float("nan"), "lr": None}) == "step 1/?"


def test_run_progress_without_terminal_prints_plain_lines() -> None:
    console, buffer = plain_console()
    with RunProgress(console, "tiny") as bar:
        bar.feed("loading model")
        bar.feed('QLC_PROGRESS {"step": 1, "max_steps": 2, "loss": 3.0, "elapsed_s": 1.0}')
    assert buffer.getvalue().splitlines() == ["loading model", "step 1/2 loss 3.0000 eta 0:01"]
    assert bar.last_event is not None and bar.last_event["step"] == 1


def test_build_progress_shows_only_steps_without_terminal() -> None:
    console, buffer = plain_console()
    with BuildProgress(console, "build") as bar:
        bar.feed("Step 2/9 : RUN pip install x")
        bar.feed("Collecting x")
    assert buffer.getvalue().splitlines() == ["build step 2/9: RUN pip install x"]


def test_run_progress_on_a_terminal_draws_a_bar() -> None:
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=True, width=120)
    with RunProgress(console, "tiny") as bar:
        bar.feed('QLC_PROGRESS {"step": 2, "max_steps": 4, "loss": 1.5, "elapsed_s": 2.0}')
    assert "2/4" in buffer.getvalue()
