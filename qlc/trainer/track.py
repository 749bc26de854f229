"""Experiment trackers: the scalars MetricsLog records, sent on to TensorBoard, Weights & Biases
and MLflow as the run goes (rank 0 only).

Both engines log through MetricsLog with the same keys at the same steps, so every tracker gets
the same values at the same steps: train/loss, train/lr, train/grad_norm, train/tokens_per_s,
train/memory_bytes, eval/loss. A tracker never fails a training: one that raises (at start,
while logging, at the end) is recorded in the manifest with the error, switched off with a
warning, and the run goes on. Credentials come from environment variables the plan names
(runtime secrets), never from the plan itself.
"""

from __future__ import annotations

import importlib
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from qlc import contract
from qlc.compiler.plan import MlflowPlan, Plan, WandbPlan
from qlc.trainer.tbevents import EventWriter

TENSORBOARD_DIR = "tensorboard"
WANDB_DIR = "wandb"  # W&B writes its run folders (offline-run-*, run-*) in <run dir>/wandb/
# metrics.jsonl key -> tracker tag, per record event
TAGS = {
    "train": {"loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm",
              "tokens_per_s": "train/tokens_per_s", "memory_bytes": "train/memory_bytes"},
    "eval": {"eval_loss": "eval/loss"},
}  # fmt: skip
RUN_ID_TAG = "qlc.run_id"  # MLflow tag naming the qlc run (a resumed run continues its run)
MLFLOW_PARAM_MAX = 6000  # MLflow's longest parameter value
MLFLOW_BATCH_PARAMS = 100  # the most parameters one log_batch request may carry
# MLflow retries a failed request up to 7 times with growing pauses (minutes for a server that
# is down): a tracker must not hold a training up that long. A setting of your own wins.
MLFLOW_REQUEST_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
                           "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}  # fmt: skip


def scalars(record: dict[str, Any]) -> tuple[int, dict[str, float]] | None:
    """(step, {tag: value}) of a train or eval record; None for other records (resume,
    summary) or a record without a step. A value that diverged (None) is left out."""
    tags = TAGS.get(str(record.get("event", "train")))
    step = record.get("step")
    if tags is None or not isinstance(step, int):
        return None
    values = {
        tag: float(record[key])
        for key, tag in tags.items()
        if isinstance(record.get(key), int | float) and not isinstance(record.get(key), bool)
    }
    return (step, values) if values else None


class Tracker(Protocol):
    entry: dict[str, Any]  # what the manifest records of this tracker

    def log(self, step: int, values: dict[str, float]) -> None: ...

    def finish(self, status: str) -> None: ...


class TensorBoardTracker:
    def __init__(self, out: Path) -> None:
        self.out = out
        self.writer = EventWriter(out / TENSORBOARD_DIR)
        self.entry: dict[str, Any] = {
            "tracker": "tensorboard",
            "log_dir": TENSORBOARD_DIR,
            "file": self.writer.path.relative_to(out).as_posix(),
            "error": None,
        }

    def log(self, step: int, values: dict[str, float]) -> None:
        self.writer.scalars(step, values)

    def finish(self, status: str) -> None:
        self.writer.close()
        self.entry["sha256"] = contract.sha256_file(self.writer.path)


class WandbTracker:
    def __init__(self, plan: WandbPlan, out: Path, run_id: str | None,
                 config: dict[str, Any]) -> None:  # fmt: skip
        wandb = _client("wandb", "track.wandb")
        api_key = os.environ.get(plan.api_key_env) if plan.api_key_env else None
        if plan.mode == "online" and not api_key:
            raise RuntimeError(f"the secret {plan.api_key_env} (track.wandb.api_key) is not set")
        (out / WANDB_DIR).mkdir(exist_ok=True)
        settings = wandb.Settings(
            api_key=api_key, console="off", silent=True, x_disable_stats=True,
            disable_git=True, save_code=False, x_save_requirements=False, init_timeout=60,
        )  # fmt: skip
        self.run = wandb.init(
            project=plan.project, entity=plan.entity, name=plan.name or run_id, id=run_id,
            resume="allow" if run_id else None, mode=plan.mode, dir=str(out), config=config,
            settings=settings,
        )  # fmt: skip
        folder = Path(self.run.dir).parent  # <run dir>/wandb/<offline-run-...>/files
        self.entry: dict[str, Any] = {
            "tracker": "wandb",
            "mode": plan.mode,
            "project": plan.project,
            "entity": plan.entity,
            "run_id": self.run.id,
            "url": self.run.url if plan.mode == "online" else None,
            "log_dir": _inside(folder, out),
            "error": None,
        }
        if plan.mode == "offline":
            self.entry["sync"] = f"wandb sync {_inside(folder, out)}"

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def finish(self, status: str) -> None:
        self.run.finish(exit_code=0 if status == "succeeded" else 1)


class MlflowTracker:
    def __init__(self, plan: MlflowPlan, run_id: str | None, job: str,
                 params: dict[str, Any]) -> None:  # fmt: skip
        for name, value in MLFLOW_REQUEST_DEFAULTS.items():
            os.environ.setdefault(name, value)
        if plan.token_env is not None:
            token = os.environ.get(plan.token_env)
            if not token:
                raise RuntimeError(f"the secret {plan.token_env} (track.mlflow.token) is not set")
            os.environ["MLFLOW_TRACKING_TOKEN"] = token
        _client("mlflow", "track.mlflow")
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=plan.uri)
        found = self.client.get_experiment_by_name(plan.experiment)
        experiment = (
            found.experiment_id if found else self.client.create_experiment(plan.experiment)
        )
        self.run_id = (
            self.existing_run(experiment, run_id)
            or self.client.create_run(
                experiment, run_name=run_id, tags={RUN_ID_TAG: run_id or "", "qlc.job": job}
            ).info.run_id
        )
        listed = [
            Param(key, str(value)[:MLFLOW_PARAM_MAX]) for key, value in sorted(params.items())
        ]
        for start in range(0, len(listed), MLFLOW_BATCH_PARAMS):
            self.client.log_batch(self.run_id, params=listed[start : start + MLFLOW_BATCH_PARAMS])
        self.entry: dict[str, Any] = {
            "tracker": "mlflow",
            "uri": plan.uri,
            "experiment": plan.experiment,
            "experiment_id": experiment,
            "run_id": self.run_id,
            "url": f"{plan.uri}/#/experiments/{experiment}/runs/{self.run_id}",
            "error": None,
        }

    def existing_run(self, experiment: str, run_id: str | None) -> str | None:
        """The MLflow run of this qlc run, when it resumes after a preemption."""
        if run_id is None or "'" in run_id or "\\" in run_id:
            return None
        runs = self.client.search_runs([experiment], f"tags.`{RUN_ID_TAG}` = '{run_id}'",
                                       max_results=1)  # fmt: skip
        return str(runs[0].info.run_id) if runs else None

    def log(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        metrics = [Metric(tag, value, stamp, step) for tag, value in values.items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def finish(self, status: str) -> None:
        ended = {"succeeded": "FINISHED", "interrupted": "KILLED"}.get(status, "FAILED")
        self.client.set_terminated(self.run_id, ended)


def _client(module: str, key: str) -> Any:
    """The tracker's client library; a clear error where it is missing (a --local run in a
    Python without qlc's track extra: an image has it from its lock)."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise RuntimeError(
            f"{key} needs the {module} package, which this Python lacks ({error}): install "
            "qlc's track extra (pip install 'qlc[track]'), or run in the image"
        ) from None


def _inside(path: Path, out: Path) -> str:
    """`path` relative to the run directory (absolute when outside it)."""
    try:
        return path.resolve().relative_to(out.resolve()).as_posix()
    except ValueError:
        return str(path)


def _warn(line: str) -> None:
    print(f"warning: {line}", file=sys.stderr, flush=True)


class Trackers:
    """The run's trackers as one MetricsLog listener; `entries` goes into the manifest."""

    def __init__(self, warn: Callable[[str], None] | None = None) -> None:
        self.active: list[Tracker] = []
        self.entries: list[dict[str, Any]] = []
        self.warn = warn or _warn

    def add(self, name: str, make: Callable[[], Tracker]) -> None:
        try:
            tracker = make()
        except Exception as error:
            self.entries.append({"tracker": name, "error": f"start: {_reason(error)}"})
            self.warn(f"tracker {name} did not start ({_reason(error)}): the run goes on "
                      "without it")  # fmt: skip
            return
        self.active.append(tracker)
        self.entries.append(tracker.entry)

    def __call__(self, record: dict[str, Any]) -> None:
        found = scalars(record)
        if found is None:
            return
        step, values = found
        for tracker in list(self.active):
            self.guarded(tracker, "log", lambda t: t.log(step, values))

    def finish(self, status: str) -> None:
        for tracker in list(self.active):
            self.guarded(tracker, "finish", lambda t: t.finish(status))
        self.active.clear()

    def guarded(self, tracker: Tracker, stage: str, call: Callable[[Tracker], None]) -> None:
        try:
            call(tracker)
        except Exception as error:
            self.active.remove(tracker)
            tracker.entry["error"] = f"{stage}: {_reason(error)}"
            name = tracker.entry["tracker"]
            self.warn(f"tracker {name} failed ({_reason(error)}): switched off, the run goes on")


def _reason(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:300]}" if text else type(error).__name__


def start(plan: Plan, out: Path, run_id: str | None, settings: dict[str, Any]) -> Trackers:
    """Start the plan's trackers for the run in `out` (rank 0 calls this)."""
    track, trackers = plan.track, Trackers()
    if track.tensorboard:
        trackers.add("tensorboard", lambda: TensorBoardTracker(out))
    wandb, mlflow = track.wandb, track.mlflow
    if wandb is not None:
        trackers.add("wandb", lambda: WandbTracker(wandb, out, run_id, settings))
    if mlflow is not None:
        trackers.add("mlflow", lambda: MlflowTracker(mlflow, run_id, plan.job.name, settings))
    return trackers
