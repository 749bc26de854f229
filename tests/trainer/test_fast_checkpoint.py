"""Checkpoints of the fast engine: complete (adapter, training state, the marker last), kept to
save_total_limit, and resumable to the bit: a run resumed from a checkpoint, or stopped by a
signal and resumed, ends with exactly the adapter of an uninterrupted run (CPU, float32, and
float16 adapter compute with loss scaling)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from fast_support import adapter, load_model, make_examples, make_plan, run_fast, train_losses
from fast_support import with_engine as engine_with

from qlc.compiler.plan import Plan
from qlc.contract import CHECKPOINTS_DIR, COMPLETE_MARKER
from qlc.trainer.errors import Interrupted, UserError
from qlc.trainer.fast.checkpoint import TRAINING_STATE_FILE
from qlc.trainer.types import StopFlag

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.slow

SHA = "a" * 64  # fast_support.run_fast's plan_sha256
EXAMPLES = make_examples(18, seed=5)


def plan_of(precision: str) -> Plan:
    """6 steps of 6 examples, dropout on (its random state must be restored too)."""
    plan = make_plan(max_steps=6, save_steps=3, lora={"dropout": 0.1})
    if precision == "float16-scaled":
        plan = engine_with(plan, precision={"adapter_compute": "float16", "loss_scaling": True})
    return plan


@pytest.fixture(scope="module", params=["float32", "float16-scaled"])
def straight(
    request: pytest.FixtureRequest, tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Plan, Path, list[float], dict[str, Any]]:
    """An uninterrupted run: its plan, run directory, losses and final adapter."""
    plan = plan_of(request.param)
    out = tmp_path_factory.mktemp("straight")
    model = load_model(tiny_dir, plan)
    _, records, _ = run_fast(model, plan, EXAMPLES, out)
    return plan, out, train_losses(records), adapter(model)


def assert_same_adapter(model: Any, expected: dict[str, Any]) -> None:
    got = adapter(model)
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(got[name], value), f"{name} differs"


def test_resume_from_a_checkpoint_ends_bit_identical(
    straight: tuple[Plan, Path, list[float], dict[str, Any]], tiny_dir: Path, tmp_path: Path
) -> None:
    plan, out, losses, expected = straight
    checkpoint = out / CHECKPOINTS_DIR / "checkpoint-3"
    model = load_model(tiny_dir, plan)
    result, records, _ = run_fast(model, plan, EXAMPLES, tmp_path, resume_from=checkpoint)
    assert result.steps == 6
    assert [r["step"] for r in records if r.get("event") == "train"] == [4, 5, 6]
    assert train_losses(records) == losses[3:]
    assert_same_adapter(model, expected)


def test_a_stopped_run_saves_a_checkpoint_and_resumes_bit_identical(
    straight: tuple[Plan, Path, list[float], dict[str, Any]], tiny_dir: Path, tmp_path: Path
) -> None:
    """The stop request arrives while step 2 trains (set when step 1 is logged): the run
    finishes step 2, saves checkpoint-2 and raises Interrupted naming it."""
    plan, _, losses, expected = straight
    stop = StopFlag()
    model = load_model(tiny_dir, plan)
    with pytest.raises(Interrupted) as stopped:
        run_fast(model, plan, EXAMPLES, tmp_path, stop=stop, log_hook=_stop_at(stop, 1))
    assert (stopped.value.signal_name, stopped.value.checkpoint) == ("SIGTERM", "checkpoint-2")
    checkpoint = tmp_path / CHECKPOINTS_DIR / "checkpoint-2"
    marker = json.loads((checkpoint / COMPLETE_MARKER).read_text())
    assert marker == {"step": 2, "engine": "fast", "plan_sha256": SHA}
    resumed = load_model(tiny_dir, plan)
    _, records, _ = run_fast(resumed, plan, EXAMPLES, tmp_path / "resumed",
                             resume_from=checkpoint)  # fmt: skip
    assert train_losses(records) == losses[2:]
    assert_same_adapter(resumed, expected)


def _stop_at(stop: StopFlag, step: int) -> Any:
    def listen(record: dict[str, Any]) -> None:
        if record.get("event") == "train" and record["step"] == step:
            stop.signal_name = "SIGTERM"

    return listen


def test_checkpoints_are_complete_and_kept_to_the_limit(tiny_dir: Path, tmp_path: Path) -> None:
    plan = make_plan(max_steps=4, save_steps=1, save_total_limit=2)
    model = load_model(tiny_dir, plan)
    run_fast(model, plan, EXAMPLES[:12], tmp_path)
    root = tmp_path / CHECKPOINTS_DIR
    assert sorted(p.name for p in root.iterdir()) == ["checkpoint-2", "checkpoint-3"]
    for checkpoint in root.iterdir():
        names = {p.name for p in checkpoint.iterdir()}
        assert {"adapter_model.safetensors", "adapter_config.json", TRAINING_STATE_FILE,
                COMPLETE_MARKER} <= names  # fmt: skip
        assert "README.md" not in names  # not peft's placeholder model card
        state = torch.load(checkpoint / TRAINING_STATE_FILE, weights_only=False)
        assert set(state) == {"trainable", "optimizer", "scheduler", "scaler", "rng"}
        assert len(state["rng"]) == 1  # one process


def test_loss_scale_is_saved_and_restored(tiny_dir: Path, tmp_path: Path) -> None:
    plan = engine_with(make_plan(max_steps=3, save_steps=2),
                       precision={"adapter_compute": "float16", "loss_scaling": True})  # fmt: skip
    run_fast(load_model(tiny_dir, plan), plan, EXAMPLES[:12], tmp_path)
    checkpoint = tmp_path / CHECKPOINTS_DIR / "checkpoint-2"
    saved = torch.load(checkpoint / TRAINING_STATE_FILE, weights_only=False)["scaler"]
    assert saved["scale"] == 2.0**16 and saved["_growth_tracker"] == 2  # two clean steps

    from qlc.trainer.fast.checkpoint import TrainingState, load_checkpoint
    from qlc.trainer.fast.precision import LossScaler
    from qlc.trainer.types import Decisions

    model = load_model(tiny_dir, plan)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": params}, {"params": []}])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    scaler = LossScaler(True, torch.device("cpu"))
    state = TrainingState(model, optimizer, scheduler, scaler)
    load_checkpoint(checkpoint, state, rank=0, world=1, decisions=Decisions())
    assert scaler.state_dict()["_growth_tracker"] == 2


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"engine": "reference"}, "written by the 'reference' engine"),
        ({"plan_sha256": "b" * 64}, "written by another plan"),
        (None, "not a complete fast-engine checkpoint"),
    ],
)
def test_resume_refuses_a_checkpoint_it_cannot_continue(
    straight: tuple[Plan, Path, list[float], dict[str, Any]],
    tiny_dir: Path,
    tmp_path: Path,
    edit: dict[str, Any] | None,
    message: str,
) -> None:
    plan, out, _, _ = straight
    import shutil

    checkpoint = tmp_path / "checkpoint-3"
    shutil.copytree(out / CHECKPOINTS_DIR / "checkpoint-3", checkpoint)
    marker = checkpoint / COMPLETE_MARKER
    if edit is None:
        marker.unlink()
    else:
        marker.write_text(json.dumps({**json.loads(marker.read_text()), **edit}))
    with pytest.raises(UserError, match=message):
        run_fast(load_model(tiny_dir, plan), plan, EXAMPLES, tmp_path / "out",
                 resume_from=checkpoint)  # fmt: skip
