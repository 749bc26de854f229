"""Experiment tracking on real runs, read back by each tracker's own reader.

- TensorBoard: the shared tiny run (TensorBoard is on by default) read by TensorBoard's
  EventAccumulator: every scalar equals metrics.jsonl (as the float32 TensorBoard stores).
- MLflow and W&B: one tiny run of the fast engine (the shared run trains with the reference
  engine) logging to a real `mlflow server` on loopback and to W&B in offline mode; MLflow's
  client reads the run, its params and metric histories back, and the offline run's .wandb file
  is read with W&B's own record protocol buffers.
Every tracker is compared with metrics.jsonl, step by step, and the two engines' TensorBoard
files hold the same scalars at the same steps.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import pytest
from mlflow_fixture import mlflow_server  # noqa: F401  (the fixture)
from suite_support import copy_tiny_project
from tiny_runs import TRAIN, tiny_spec

from qlc import contract
from qlc.trainer.track import TAGS

pytestmark = pytest.mark.slow

TRACKED = """
[track.wandb]
mode = "offline"
project = "qlc-tests"

[track.mlflow]
uri = "{uri}"
experiment = "qlc-tests"
"""


def expected_scalars(run_dir: Path) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} from metrics.jsonl, named as every tracker names them."""
    found: dict[str, dict[int, float]] = {}
    for line in (run_dir / contract.METRICS_FILE).read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        for key, tag in TAGS.get(record.get("event", "train"), {}).items():
            if isinstance(record.get(key), int | float):
                found.setdefault(tag, {})[record["step"]] = float(record[key])
    return found


def tracking(run_dir: Path, name: str) -> dict[str, Any]:
    manifest = contract.read_manifest_file(run_dir / contract.MANIFEST_FILE)
    entries = {e["tracker"]: e for e in manifest["predicate"]["tracking"]}
    return dict(entries[name])


def float32(value: float) -> float:
    return float(struct.unpack("<f", struct.pack("<f", value))[0])


@pytest.fixture(scope="module")
def tracked_run(mlflow_server: str, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    """A finished tiny run of the fast engine (qlc run --local) logging to TensorBoard, W&B
    offline and MLflow."""
    from rich.console import Console

    from qlc.runtime.run_local import run_local

    project = tmp_path_factory.mktemp("tracked") / "project"
    spec = copy_tiny_project(project)
    train = TRAIN + 'engine = "fast"\neval_steps = 3\n'  # eval/loss at steps 3 and 6
    spec.write_bytes(tiny_spec(train) + TRACKED.format(uri=mlflow_server).encode())
    spec.with_suffix(".lock").unlink()  # the lock would pin wandb and mlflow-skinny: this Python
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "MLFLOW_"))}
    result = run_local(spec, project, console=Console(quiet=True), environ=environ)
    assert result.status == "succeeded", result.message
    return result.run_dir


def tensorboard_scalars(run_dir: Path) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} as TensorBoard's own reader reads the run's event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    entry = tracking(run_dir, "tensorboard")
    assert entry["error"] is None and entry["log_dir"] == "tensorboard"
    assert contract.sha256_file(run_dir / entry["file"]) == entry["sha256"]
    accumulator = EventAccumulator(str(run_dir / entry["log_dir"]))
    accumulator.Reload()
    found = {}
    for tag in accumulator.Tags()["scalars"]:
        events = accumulator.Scalars(tag)
        assert [e.step for e in events] == sorted({e.step for e in events}), tag  # once each
        found[tag] = {e.step: e.value for e in events}
    return found


@pytest.mark.parametrize("engine", ["reference", "fast"])
def test_tensorboard_reads_back_every_scalar_of_metrics_jsonl(
    engine: str, request: pytest.FixtureRequest
) -> None:
    run_dir: Path = request.getfixturevalue(
        "trained_tiny_run" if engine == "reference" else "tracked_run"
    )
    expected = expected_scalars(run_dir)
    assert set(expected) >= set(TAGS["train"].values())
    assert tensorboard_scalars(run_dir) == {
        tag: {step: float32(value) for step, value in values.items()}
        for tag, values in expected.items()
    }


def test_both_engines_log_the_same_scalars_at_the_same_steps(
    trained_tiny_run: Path, tracked_run: Path
) -> None:
    """The shared run (reference engine) and the tracked run (fast engine) train the same six
    steps, logged every step; the tracked run also evaluates at steps 3 and 6."""
    reference, fast = tensorboard_scalars(trained_tiny_run), tensorboard_scalars(tracked_run)
    assert {tag: sorted(v) for tag, v in reference.items()} == {
        tag: list(range(1, 7)) for tag in TAGS["train"].values()
    }
    assert {tag: sorted(v) for tag, v in fast.items()} == {
        **{tag: sorted(v) for tag, v in reference.items()},
        "eval/loss": [3, 6],
    }


def test_mlflow_server_holds_the_run_its_params_and_every_metric(
    tracked_run: Path,
    mlflow_server: str,  # noqa: F811
) -> None:
    from mlflow.tracking import MlflowClient

    entry = tracking(tracked_run, "mlflow")
    assert entry["error"] is None and entry["uri"] == mlflow_server
    assert entry["url"] == (f"{mlflow_server}/#/experiments/{entry['experiment_id']}/runs/"
                            f"{entry['run_id']}")  # fmt: skip
    client = MlflowClient(tracking_uri=mlflow_server)
    run = client.get_run(entry["run_id"])
    assert run.info.status == "FINISHED"
    assert run.info.experiment_id == client.get_experiment_by_name("qlc-tests").experiment_id
    assert run.data.tags["qlc.run_id"] == tracked_run.name
    effective = contract.read_manifest_file(tracked_run / contract.MANIFEST_FILE)["predicate"][
        "effective"
    ]
    assert run.data.params == {key: str(value) for key, value in effective.items()}
    expected = expected_scalars(tracked_run)
    assert set(expected) == {*TAGS["train"].values(), *TAGS["eval"].values()}
    for tag, values in expected.items():
        history = client.get_metric_history(entry["run_id"], tag)
        assert {m.step: m.value for m in history} == values, tag
        assert len(history) == len(values), tag


def wandb_records(path: Path) -> list[Any]:
    """The records of a .wandb file, through W&B's own protocol buffers. The file is a LevelDB
    log: a 7-byte header (':W&B', magic 0xBEE1, version), then 32 KiB blocks of chunks, each
    a checksum, a length, a type (full, first, middle, last) and the bytes."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B" and struct.unpack("<H", data[4:6])[0] == 0xBEE1
    block, position, pending, records = 32768, 7, b"", []
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a chunk header
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        chunk = data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # full, last
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending + chunk)
            records.append(record)
            pending = b""
        elif kind in (2, 3):  # first, middle
            pending += chunk
    return records


def item_key(item: Any) -> str:
    """A history or config item's name (W&B writes a name with '/' as its `nested_key`)."""
    return str(item.key or "/".join(item.nested_key))


def test_wandb_offline_run_files_hold_every_metric_and_the_settings(tracked_run: Path) -> None:
    entry = tracking(tracked_run, "wandb")
    assert entry["error"] is None and entry["mode"] == "offline" and entry["url"] is None
    assert entry["run_id"] == tracked_run.name and entry["project"] == "qlc-tests"
    assert entry["sync"] == f"wandb sync {entry['log_dir']}"
    folder = tracked_run / entry["log_dir"]
    records = wandb_records(folder / f"run-{entry['run_id']}.wandb")
    kinds = [r.WhichOneof("record_type") for r in records]
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert run.run_id == tracked_run.name and run.project == "qlc-tests"
    found: dict[str, dict[int, float]] = {}
    for record in (r for r in records if r.WhichOneof("record_type") == "history"):
        items = {item_key(item): json.loads(item.value_json) for item in record.history.item}
        step = items.pop("_step")
        for tag, value in items.items():
            if not tag.startswith("_"):
                found.setdefault(tag, {})[step] = value
    assert found == expected_scalars(tracked_run)
    # the config W&B starts the run with (in its run record), then any later updates
    updates = [run.config, *(r.config for r in records if r.WhichOneof("record_type") == "config")]
    config = {item_key(item): json.loads(item.value_json) for c in updates for item in c.update}
    effective = contract.read_manifest_file(tracked_run / contract.MANIFEST_FILE)["predicate"][
        "effective"
    ]
    assert {key: config[key] for key in effective} == effective
    assert "exit" in kinds  # the run was finished, not left open


def test_report_names_where_each_tracker_logged(tracked_run: Path) -> None:
    report = (tracked_run / contract.REPORT_FILE).read_text(encoding="utf-8")
    section = report.split("## Tracking", 1)[1].split("\n## ", 1)[0]
    for name in ("tensorboard", "wandb", "mlflow"):
        entry = tracking(tracked_run, name)
        assert f"- {name}: " in section
        for key in ("url", "run_id", "log_dir"):
            if entry.get(key):
                assert f"`{entry[key]}`" in section, (name, key)
    assert f"`{tracking(tracked_run, 'wandb')['sync']}`" in section
