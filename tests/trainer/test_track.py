"""The trackers as MetricsLog listeners: which values go where, TensorBoard's event format read
back by TensorBoard itself, and a tracker that fails never failing the run."""

from __future__ import annotations

import socket
import struct
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from trainer_support import plan_from

from qlc.trainer import track
from qlc.trainer.tbevents import EventWriter, crc32c, masked_crc32c
from qlc.trainer.types import MetricsLog

SPEC: dict[str, Any] = {
    "job": {"name": "t"},
    "model": {"path": "m"},
    "data": {"path": "d.jsonl", "format": "text"},
    "runtime": {"gpus": 0},
}


def test_crc32c_is_castagnoli() -> None:
    # RFC 3720 (iSCSI) B.4 check value, and the empty string
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(b"") == 0
    assert masked_crc32c(b"") == 0xA282EAD8


def test_event_files_pass_tensorboards_reader_with_checksums(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.compat.tensorflow_stub import errors
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import PyRecordReader_New

    writer = EventWriter(tmp_path)
    writer.scalars(1, {"train/loss": 2.5, "train/lr": 1e-3}, wall_time=1000.5)
    writer.scalars(2**40, {"eval/loss": -0.1})  # int64 steps, negative values
    writer.close()
    reader, records = PyRecordReader_New(str(writer.path)), 0
    with pytest.raises(errors.OutOfRangeError):  # the end, after every checksum held
        while True:
            reader.GetNext()
            records += 1
    assert records == 3  # the file version, then two events
    accumulator = EventAccumulator(str(tmp_path))
    accumulator.Reload()
    [loss] = accumulator.Scalars("train/loss")
    assert (loss.step, loss.value, loss.wall_time) == (1, 2.5, 1000.5)
    assert (
        accumulator.Scalars("train/lr")[0].value == struct.unpack("<f", struct.pack("<f", 1e-3))[0]
    )
    [evaluation] = accumulator.Scalars("eval/loss")
    assert evaluation.step == 2**40 and evaluation.value == pytest.approx(-0.1)


def test_a_corrupted_event_is_refused_by_tensorboard(tmp_path: Path) -> None:
    from tensorboard.compat.tensorflow_stub import errors
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import PyRecordReader_New

    writer = EventWriter(tmp_path)
    writer.scalars(1, {"train/loss": 2.5})
    writer.close()
    data = bytearray(writer.path.read_bytes())
    data[-6] ^= 0xFF  # inside the last event's float
    writer.path.write_bytes(bytes(data))
    reader = PyRecordReader_New(str(writer.path))
    reader.GetNext()
    with pytest.raises(errors.DataLossError):
        reader.GetNext()


def test_train_and_eval_records_become_the_same_tags_for_every_tracker() -> None:
    train = {"event": "train", "step": 3, "loss": 2.0, "lr": 0.01, "grad_norm": None,
             "tokens_per_s": 90, "memory_bytes": 10, "epoch": 0.5, "elapsed_s": 1.0}  # fmt: skip
    assert track.scalars(train) == (3, {"train/loss": 2.0, "train/lr": 0.01,
                                        "train/tokens_per_s": 90.0,
                                        "train/memory_bytes": 10.0})  # fmt: skip
    assert track.scalars({"event": "eval", "step": 6, "eval_loss": 1.5}) == (
        6, {"eval/loss": 1.5})  # fmt: skip
    assert track.scalars({"event": "resume", "checkpoint": "checkpoint-4"}) is None
    assert track.scalars({"event": "summary", "steps": 12, "eval_loss": 1.0}) is None
    assert track.scalars({"event": "train", "loss": 2.0}) is None  # no step


def test_a_tracker_that_fails_is_recorded_switched_off_and_the_log_goes_on(
    tmp_path: Path,
) -> None:
    warnings: list[str] = []
    trackers = track.Trackers(warn=warnings.append)
    first, second = (
        track.TensorBoardTracker(tmp_path / "a"),
        track.TensorBoardTracker(tmp_path / "b"),
    )
    trackers.add("tensorboard", lambda: first)
    trackers.add("tensorboard", lambda: second)
    log = MetricsLog(tmp_path / "metrics.jsonl", enabled=True)
    log.listeners.append(trackers)
    log({"event": "train", "step": 1, "loss": 2.0})
    first.writer._file.close()  # its disk went away: every write now raises
    log({"event": "train", "step": 2, "loss": 1.5})
    log({"event": "train", "step": 3, "loss": 1.0})
    trackers.finish("succeeded")
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 3
    assert first.entry["error"] == "log: ValueError: write to closed file"
    assert second.entry["error"] is None and "sha256" in second.entry
    assert trackers.active == [] and trackers.entries == [first.entry, second.entry]
    assert warnings == [f"tracker tensorboard failed ({first.entry['error'][5:]}): switched "
                        "off, the run goes on"]  # fmt: skip


def test_a_tracker_that_cannot_start_is_recorded_and_the_others_start(tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    plan = plan_from({**SPEC, "track": {"wandb": {"mode": "online", "project": "p"}}})
    warnings: list[str] = []
    monkeypatch.setattr(track, "_warn", warnings.append)
    trackers = track.start(plan, tmp_path, "run-1", {})
    assert [e["tracker"] for e in trackers.entries] == ["tensorboard", "wandb"]
    assert trackers.entries[1] == {
        "tracker": "wandb",
        "error": "start: RuntimeError: the secret WANDB_API_KEY (track.wandb.api_key) is not set",
    }
    assert len(trackers.active) == 1 and "did not start" in warnings[0]
    trackers.finish("failed")


def test_an_mlflow_server_that_is_down_costs_seconds_not_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("mlflow")
    for name in track.MLFLOW_REQUEST_DEFAULTS:
        monkeypatch.delenv(name, raising=False)
    with socket.socket() as probe:  # a loopback port nothing listens on
        probe.bind(("127.0.0.1", 0))
        uri = f"http://127.0.0.1:{probe.getsockname()[1]}"
    plan = plan_from({**SPEC, "track": {"tensorboard": False, "mlflow": {"uri": uri}}})
    monkeypatch.setattr(track, "_warn", lambda line: None)
    started = time.monotonic()
    trackers = track.start(plan, tmp_path, "run-1", {})
    assert time.monotonic() - started < 60
    [entry] = trackers.entries
    assert entry["tracker"] == "mlflow" and entry["error"].startswith("start: ")
    assert trackers.active == []


def test_a_python_without_the_trackers_client_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    plan = plan_from({**SPEC, "track": {"tensorboard": False,
                                        "wandb": {"mode": "offline", "project": "p"}}})  # fmt: skip
    monkeypatch.setattr(track, "_warn", lambda line: None)
    [entry] = track.start(plan, tmp_path, "run-1", {}).entries
    assert entry["tracker"] == "wandb" and entry["error"].startswith(
        "start: RuntimeError: track.wandb needs the wandb package, which this Python lacks"
    )
    assert "pip install 'qlc[track]'" in entry["error"]
