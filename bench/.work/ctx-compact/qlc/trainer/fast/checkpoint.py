"""Checkpoints: out/checkpoints/checkpoint-N, written whole in a temporary folder, then renamed.

Each holds a usable adapter (the model's save_pretrained), the training state (trainable
weights, optimizer, learning-rate scheduler, loss scaler, every process's random state) and,
written last, contract.COMPLETE_MARKER: {"step", "engine": "fast", "plan_sha256"}.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qlc.contract import CHECKPOINTS_DIR, COMPLETE_MARKER, MODEL_CARD_FILE, write_json_atomic
from qlc.trainer.errors import UserError
from qlc.trainer.fast.precision import LossScaler
from qlc.trainer.types import Decisions

TRAINING_STATE_FILE = "training_state.pt"
ENGINE = "fast"


@dataclass
class TrainingState:
    """What a checkpoint restores besides the step."""

    model: Any  # the peft model
    optimizer: torch.optim.Optimizer
    scheduler: Any  # transformers' LambdaLR
    scaler: LossScaler


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step}"


def save_checkpoint(
    out: Path,
    step: int,
    state: TrainingState,
    rng_states: list[dict[str, Any]],
    plan_sha256: str,
    keep: int,
) -> str:
    """Write checkpoint-`step` (rank 0; `rng_states` holds every process's); its name."""
    root = out / CHECKPOINTS_DIR
    name = checkpoint_name(step)
    partial = root / f".{name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    state.model.save_pretrained(str(partial))
    # peft's placeholder card ("More Information Needed", the base model's local path): a
    # checkpoint is for resuming; the finished adapter gets the run's own card
    (partial / MODEL_CARD_FILE).unlink(missing_ok=True)
    trainable = {
        n: p.detach().cpu().clone() for n, p in state.model.named_parameters() if p.requires_grad
    }
    blob = {
        "trainable": trainable,
        "optimizer": state.optimizer.state_dict(),
        "scheduler": state.scheduler.state_dict(),
        "scaler": state.scaler.state_dict(),
        "rng": rng_states,
    }
    torch.save(blob, partial / TRAINING_STATE_FILE)
    marker = {"step": step, "engine": ENGINE, "plan_sha256": plan_sha256}
    write_json_atomic(partial / COMPLETE_MARKER, marker)
    final = root / name
    shutil.rmtree(final, ignore_errors=True)
    partial.rename(final)
    _prune(root, keep)
    return name


def _prune(root: Path, keep: int) -> None:
    """Keep the newest `keep` complete checkpoints."""
    done = [p for p in root.glob("checkpoint-*") if (p / COMPLETE_MARKER).is_file()]
    done.sort(key=lambda p: int(p.name.rsplit("-", 1)[-1]))
    for old in done[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def read_marker(path: Path, plan_sha256: str) -> int:
    """The step of a complete fast-engine checkpoint of this plan; UserError otherwise."""
    marker = path / COMPLETE_MARKER
    if not marker.is_file() or not (path / TRAINING_STATE_FILE).is_file():
        raise UserError(
            f"{path} is not a complete fast-engine checkpoint (no {COMPLETE_MARKER} or "
            f"{TRAINING_STATE_FILE}): resume from another checkpoint, or start a new run"
        )
    data = json.loads(marker.read_text(encoding="utf-8"))
    if data.get("engine") != ENGINE:
        raise UserError(
            f"{path} was written by the {data.get('engine')!r} engine: resume it with that "
            "engine (train.engine), or start a new run"
        )
    if data.get("plan_sha256") != plan_sha256:
        raise UserError(
            f"{path} was written by another plan (sha256 {data.get('plan_sha256')}, this run's "
            f"is {plan_sha256}): resume it with the spec that wrote it, or start a new run"
        )
    return int(data["step"])


def load_checkpoint(
    path: Path, state: TrainingState, rank: int, world: int, decisions: Decisions
) -> None:
    """Restore the trainable weights, optimizer, scheduler, loss scale and this process's
    random state from a checkpoint `read_marker` accepted."""
    blob = torch.load(path / TRAINING_STATE_FILE, map_location="cpu", weights_only=False)
    params = dict(state.model.named_parameters())
    with torch.no_grad():
        for name, value in blob["trainable"].items():
            params[name].copy_(value)
    state.optimizer.load_state_dict(blob["optimizer"])
    state.scheduler.load_state_dict(blob["scheduler"])
    state.scaler.load_state_dict(blob["scaler"])
    saved: list[dict[str, Any]] = blob["rng"]
    if len(saved) != world:
        decisions.record(
            "resume.random_state",
            f"process {rank} continues from saved process {rank % len(saved)}",
            f"{path.name} was written by {len(saved)} processes, this run has {world}: "
            "dropout masks differ from an uninterrupted run",
        )
    set_rng_state(saved[rank % len(saved)])
