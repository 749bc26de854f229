"""Several training processes from one `python train.py` (slow): real 2-process runs of
specs/tiny.toml on CPU through gloo (QLC_NPROC=2), launched by the trainer's own torchrun.

They are the CI stand-in for several GPUs: one adapter and one manifest (rank 0 writes), the
spec's examples per optimizer step kept at the new world size (a recorded decision), a stop by
SIGTERM that saves one checkpoint for both processes, and resume from the one rank 0 chose.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from trainer_support import (
    ADAPTER,
    Stopped,
    compile_to,
    edited_spec,
    manifest,
    metrics,
    progress,
    run_train,
    sha256,
    stop_and_resume,
)

from qlc import contract

pytestmark = pytest.mark.slow
STOP_AFTER = 2
STEPS = 7  # one epoch of 56 examples at 8 a step


@pytest.mark.slow
def test_a_user_error_in_the_processes_exits_2(tiny_context: Path, tmp_path: Path) -> None:
    data = tmp_path / "bad.jsonl"
    data.write_text('{"text": "ok"}\n{"text": oops}\n')
    out = tmp_path / "out"
    result = run_train(tiny_context, out, QLC_NPROC="2", QLC_DATA_PATH=str(data))
    assert result.returncode == contract.EXIT_USER_ERROR, result.stdout[-2000:] + result.stderr
    assert f"error: {data}:2: not a JSON line" in result.stderr
    predicate = manifest(out)["predicate"]
    assert predicate["status"] == "failed" and predicate["run"]["world_size"] == 2
    assert f"{data}:2: not a JSON line" in predicate["error"]
    assert not (out / contract.USER_ERROR_FLAG).exists()


@pytest.fixture(scope="module")
def per_step_context(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """specs/tiny.toml training one epoch at 8 examples per optimizer step (derived accum)."""
    source = edited_spec("tiny.toml", {"max_steps = 12\n": "epochs = 1\nexamples_per_step = 8\n"})
    return compile_to("tiny.toml", tmp_path_factory.mktemp("per-step-ctx"), source)


@pytest.fixture(scope="module")
def two_processes(per_step_context: Path, tmp_path_factory: pytest.TempPathFactory) -> Stopped:
    """Two gloo processes stopped by SIGTERM after step 2, then resumed with two (torchrun
    exits 0 only when every process does)."""
    out = tmp_path_factory.mktemp("two-processes") / "run"
    return stop_and_resume(per_step_context, out, STOP_AFTER, QLC_NPROC="2")


@pytest.mark.slow
def test_two_processes_stop_together_with_one_checkpoint(two_processes: Stopped) -> None:
    run = two_processes
    assert "launching: -m torch.distributed.run --nproc-per-node=2 --standalone" in run.output
    assert run.code == contract.EXIT_PREEMPTED, run.output[-3000:]
    predicate = run.manifest["predicate"]
    assert predicate["status"] == "interrupted" and run.manifest["subject"] == []
    assert predicate["error"] == (
        f"stopped by SIGTERM; checkpoint-{run.step} saved: the run resumes from it"
    )
    assert list(run.checkpoints) == [f"checkpoint-{run.step}"]
    assert {"rng_state_0.pth", "rng_state_1.pth", contract.COMPLETE_MARKER} <= set(
        run.checkpoints[f"checkpoint-{run.step}"]
    )  # both processes wrote their part before rank 0 marked it complete


@pytest.mark.slow
def test_two_processes_write_one_adapter_and_one_manifest(two_processes: Stopped) -> None:
    out = two_processes.out
    statement = manifest(out)
    predicate = statement["predicate"]
    assert predicate["status"] == "succeeded" and predicate["error"] is None
    assert predicate["run"]["world_size"] == 2
    assert predicate["environment"]["rank_devices"] == ["cpu", "cpu"]
    subjects = {s["name"]: s["digest"]["sha256"] for s in statement["subject"]}
    assert subjects["adapter/adapter_model.safetensors"] == sha256(out / ADAPTER)
    assert all(sha256(out / name) == digest for name, digest in subjects.items())
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("manifest")) == [
        contract.MANIFEST_FILE
    ]
    assert len(list(out.rglob("adapter_model.safetensors"))) == 1 + len(
        list((out / contract.CHECKPOINTS_DIR).glob("checkpoint-*"))
    )


@pytest.mark.slow
def test_two_processes_resume_from_the_checkpoint_rank_0_chose(two_processes: Stopped) -> None:
    out, step = two_processes.out, two_processes.step
    assert manifest(out)["predicate"]["run"]["resumed_from"] == f"checkpoint-{step}"
    lines = progress(two_processes.resumed)  # printed by rank 0 only: one line a step
    assert [line["step"] for line in lines] == list(range(step + 1, STEPS + 1))
    assert all(line["loss"] > 0 for line in lines)
    records = metrics(out)
    assert [r["step"] for r in records if r["event"] == "train"] == list(range(1, STEPS + 1))
    assert [r["checkpoint"] for r in records if r["event"] == "resume"] == [f"checkpoint-{step}"]


@pytest.mark.slow
def test_the_examples_per_step_are_kept_at_two_processes(
    two_processes: Stopped, per_step_context: Path
) -> None:
    out = two_processes.out
    plan = json.loads((per_step_context / "plan.json").read_text())["train"]["schedule"]
    assert (plan["examples_per_step"], plan["grad_accum"], plan["world_size"]) == (8, 2, 1)
    predicate = manifest(out)["predicate"]
    run, effective = predicate["run"], predicate["effective"]
    assert (run["examples_per_step"], run["grad_accum"]) == (8, 1)  # 4 x 1 x 2 processes
    assert (effective["examples_per_step"], effective["grad_accum"]) == (8, 1)
    assert effective["world_size"] == 2
    assert predicate["decisions"] == [
        {
            "what": "world size",
            "chosen": 2,
            "why": "2 processes: grad_accum 1, 8 examples per step",
        }
    ]
    report = json.loads((out / contract.DATA_REPORT_FILE).read_text())["train"]
    assert predicate["metrics"]["steps"] == STEPS  # the one-process plan's steps: ceil(56 / 8)
    assert predicate["metrics"]["tokens_trained"] == report["tokens"]  # one epoch, every token
