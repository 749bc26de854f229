"""The records the engines share: metrics.jsonl with one progress line per logged step (rank 0
only), the final loss, and run-time decisions with what was chosen and why."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qlc import contract
from qlc.trainer.types import PROGRESS_KEYS, Decisions, MetricsLog


def test_each_logged_step_is_one_line_of_metrics_and_one_of_progress(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = MetricsLog(tmp_path / contract.METRICS_FILE, enabled=True)
    seen: list[dict[str, object]] = []
    log.listeners.append(seen.append)
    log({"event": "train", "step": 1, "loss": 2.5, "lr": 0.1, "grad_norm": float("inf")})
    log({"event": "eval", "step": 1, "eval_loss": float("nan")})
    log({"event": "resume", "checkpoint": "checkpoint-4"})
    lines = [json.loads(x) for x in (tmp_path / contract.METRICS_FILE).read_text().splitlines()]
    assert [line["event"] for line in lines] == ["train", "eval", "resume"]
    assert lines[0]["grad_norm"] is None and lines[1]["eval_loss"] is None  # not JSON otherwise
    assert all("elapsed_s" in line for line in lines) and seen == lines
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 1 and printed[0].startswith(contract.PROGRESS_PREFIX)
    progress = json.loads(printed[0][len(contract.PROGRESS_PREFIX) :])
    assert tuple(progress) == PROGRESS_KEYS and progress["loss"] == 2.5


def test_other_processes_log_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = MetricsLog(tmp_path / contract.METRICS_FILE, enabled=False)
    log({"event": "train", "step": 1, "loss": 2.5})
    assert not (tmp_path / contract.METRICS_FILE).exists() and capsys.readouterr().out == ""
    assert log.final_loss() == 2.5


def test_the_final_loss_is_the_mean_of_the_last_tenth(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path / contract.METRICS_FILE, enabled=False)
    assert log.final_loss() is None
    for step in range(1, 21):
        log({"event": "train", "step": step, "loss": float(step)})
    assert log.final_loss() == pytest.approx(19.5)  # steps 19 and 20


def test_decisions_are_recorded_and_said(capsys: pytest.CaptureFixture[str]) -> None:
    decisions = Decisions(echo=print)
    decisions.record("world size", 2, "2 processes: grad_accum 1")
    assert decisions.entries == [
        {"what": "world size", "chosen": 2, "why": "2 processes: grad_accum 1"}
    ]
    assert capsys.readouterr().out == "qlc: world size: 2 (2 processes: grad_accum 1)\n"
