"""The fast engine on two gloo processes (the CI stand-in for two GPUs): every process builds
the one-process schedule, trains every other micro-batch of each step, and one all-reduce sums
the adapter gradients, so two processes train the one-process steps; a stop request that
reaches one process stops both after the same step, with one checkpoint, and the resumed run
ends bit-identical to the uninterrupted one.

The test runs this file under torch.distributed.run (the recipe's launch code is not part of
the engine); its `__main__` block calls qlc.trainer.fast.train directly in each process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from fast_support import adapter, load_model, make_examples, make_plan, run_fast, train_losses

from qlc.compiler.plan import Plan
from qlc.contract import CHECKPOINTS_DIR
from qlc.trainer.errors import Interrupted
from qlc.trainer.types import StopFlag

torch = pytest.importorskip("torch")

EXAMPLES = make_examples(40, seed=6)  # 5 steps of 8 examples


def plan_for(world: int) -> Plan:
    """8 examples per optimizer step whatever the world size, no dropout (its masks depend on
    which process draws them)."""
    plan = make_plan(epochs=1.0, batch_size=2, examples_per_step=8, save_steps=2)
    schedule = plan.train.schedule.for_world(world)
    return plan.model_copy(update={"train": plan.train.model_copy(update={"schedule": schedule})})


class StopAtCheck(StopFlag):
    """A stop request that arrives at this process's n-th look (one look per step)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.looks, self.n = 0, n

    @property
    def requested(self) -> bool:
        self.looks += 1
        if self.looks >= self.n:
            self.signal_name = "SIGTERM"
        return self.signal_name is not None


def launch(tiny_dir: str, out: str) -> None:
    """Each process: an uninterrupted run; a run that process 1 alone is asked to stop after
    its second step; the stopped run resumed from the checkpoint it named."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank, plan, root = dist.get_rank(), plan_for(dist.get_world_size()), Path(out)
    model = load_model(Path(tiny_dir), plan)
    result, records, _ = run_fast(model, plan, EXAMPLES, root / "straight", log_enabled=rank == 0)
    straight = {"losses": train_losses(records), "steps": result.steps,
                "tokens": result.tokens_trained, "adapter": adapter(model)}  # fmt: skip
    stop = StopAtCheck(2) if rank == 1 else StopFlag()
    try:
        run_fast(load_model(Path(tiny_dir), plan), plan, EXAMPLES, root / "stopped",
                 stop=stop, log_enabled=rank == 0)  # fmt: skip
        raise AssertionError("the stopped run did not stop")
    except Interrupted as stopped:
        checkpoint = stopped.checkpoint
    assert checkpoint is not None
    resumed = load_model(Path(tiny_dir), plan)
    run_fast(resumed, plan, EXAMPLES, root / "resumed",
             resume_from=root / "stopped" / CHECKPOINTS_DIR / checkpoint,
             log_enabled=rank == 0)  # fmt: skip
    same = all(torch.equal(v, straight["adapter"][n]) for n, v in adapter(resumed).items())
    report = {**straight, "checkpoint": checkpoint, "resumed_equal": same}
    torch.save(report, root / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Any]]:
    out = tmp_path_factory.mktemp("two")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--standalone",
         __file__, str(tiny_dir), str(out)],
        capture_output=True, text=True, timeout=600, env=env, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return out, [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


@pytest.mark.slow
def test_two_processes_train_the_one_process_steps(
    two: tuple[Path, list[Any]], tiny_dir: Path, tmp_path: Path
) -> None:
    out, reports = two
    model = load_model(tiny_dir, plan_for(1))
    result, records, _ = run_fast(model, plan_for(1), EXAMPLES, tmp_path)
    one = train_losses(records)
    assert len(one) == result.steps == reports[0]["steps"] == reports[1]["steps"] == 5
    assert result.tokens_trained == reports[0]["tokens"] > 0
    assert reports[0]["losses"] == pytest.approx(one, rel=1e-5)
    for name, value in adapter(model).items():
        for report in reports:  # every process holds the same adapter
            error = float((report["adapter"][name] - value).norm() / value.norm())
            assert error < 1e-5, f"{name}: {error:.2e}"
    lines = (out / "straight" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 3, 4, 5]  # written by rank 0 only
    checkpoints = sorted(p.name for p in (out / "straight" / CHECKPOINTS_DIR).iterdir())
    assert checkpoints == ["checkpoint-2", "checkpoint-4"]


@pytest.mark.slow
def test_a_stop_request_to_one_process_stops_both_and_resumes_bit_identical(
    two: tuple[Path, list[Any]],
) -> None:
    """Process 1 is asked to stop after step 2; the processes agree one step later, both stop
    after step 3, rank 0 saves checkpoint-3 with both processes' random states."""
    out, reports = two
    assert [r["checkpoint"] for r in reports] == ["checkpoint-3", "checkpoint-3"]
    state = torch.load(out / "stopped" / CHECKPOINTS_DIR / "checkpoint-3" / "training_state.pt",
                       weights_only=False)  # fmt: skip
    assert len(state["rng"]) == 2
    assert [r["resumed_equal"] for r in reports] == [True, True]


if __name__ == "__main__":
    launch(sys.argv[1], sys.argv[2])
