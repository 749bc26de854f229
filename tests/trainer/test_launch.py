"""Processes and devices: how many training processes one `python train.py` starts (torchrun),
which GPUs a run sees, and what the process reads from its environment (RunEnv)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from qlc import contract
from qlc.compiler.plan import Plan
from qlc.trainer.errors import UserError
from qlc.trainer.launch import launch_argv, visible_devices_for
from qlc.trainer.runenv import RunEnv

SCRIPT = "/qlc/train.py"
LAUNCHER = [sys.executable, "-m", "torch.distributed.run"]


def with_gpus(plan: Plan, gpus: int) -> Plan:
    return plan.model_copy(update={"runtime": plan.runtime.model_copy(update={"gpus": gpus})})


def test_several_gpus_launch_one_process_each(tiny_plan: Plan) -> None:
    argv = launch_argv(with_gpus(tiny_plan, 2), {}, 2, SCRIPT)
    assert argv == [*LAUNCHER, "--nproc-per-node=2", "--standalone", SCRIPT]


def test_one_gpu_or_cpu_runs_in_this_process(tiny_plan: Plan) -> None:
    assert launch_argv(with_gpus(tiny_plan, 1), {}, 8, SCRIPT) is None
    assert launch_argv(with_gpus(tiny_plan, 0), {}, 0, SCRIPT) is None


@pytest.mark.parametrize(
    ("gpus", "environ", "visible", "shown"),
    [
        (1, {}, 2, "0"),  # one process on a 2-GPU host: not nn.DataParallel over both
        (2, {}, 8, "0,1"),  # torchrun's processes inherit it
        (1, {"CUDA_VISIBLE_DEVICES": "3,5"}, 2, "3"),  # the first of those the host gave it
        (2, {contract.ENV_NPROC: "1"}, 2, "0"),
        (1, {}, 1, None),
        (2, {}, 2, None),
        (0, {}, 4, None),  # CPU spec
        (1, {"LOCAL_RANK": "0"}, 8, None),  # a launcher's process keeps its view
        (1, {"WORLD_SIZE": "4"}, 8, None),
    ],
)
def test_a_run_sees_only_the_gpus_it_asked_for(
    tiny_plan: Plan, gpus: int, environ: dict[str, str], visible: int, shown: str | None
) -> None:
    assert visible_devices_for(with_gpus(tiny_plan, gpus), environ, visible) == shown


@pytest.mark.parametrize("started_by", ["WORLD_SIZE", "LOCAL_RANK"])
def test_a_launched_process_does_not_launch_again(tiny_plan: Plan, started_by: str) -> None:
    assert launch_argv(with_gpus(tiny_plan, 4), {started_by: "0"}, 4, SCRIPT) is None


def test_fewer_gpus_than_the_spec_asks_is_an_error(tiny_plan: Plan) -> None:
    with pytest.raises(UserError, match=r"runtime\.gpus = 2 asks for 2 GPU\(s\) but 1 are"):
        launch_argv(with_gpus(tiny_plan, 2), {}, 1, SCRIPT)


def test_qlc_nproc_runs_gloo_processes_on_a_cpu_spec(tiny_plan: Plan) -> None:
    argv = launch_argv(tiny_plan, {contract.ENV_NPROC: "2"}, 0, SCRIPT)
    assert argv == [*LAUNCHER, "--nproc-per-node=2", "--standalone", SCRIPT]
    assert launch_argv(with_gpus(tiny_plan, 4), {contract.ENV_NPROC: "1"}, 4, SCRIPT) is None


def test_qlc_nproc_on_a_gpu_spec_needs_that_many_gpus(tiny_plan: Plan) -> None:
    plan = with_gpus(tiny_plan, 1)
    with pytest.raises(UserError, match=r"QLC_NPROC = 3 asks for 3 GPU\(s\) but 2"):
        launch_argv(plan, {contract.ENV_NPROC: "3"}, 2, SCRIPT)
    for wrong in ("two", "0", "-1"):
        with pytest.raises(UserError, match=rf"QLC_NPROC = '{wrong}': set a whole number"):
            launch_argv(plan, {contract.ENV_NPROC: wrong}, 2, SCRIPT)


def test_several_nodes_rendezvous_at_node_0(tiny_plan: Plan) -> None:
    environ = {"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "10.0.0.5", "MASTER_PORT": "2950"}
    argv = launch_argv(with_gpus(tiny_plan, 4), environ, 4, SCRIPT)
    assert argv == [
        *LAUNCHER,
        "--nproc-per-node=4",
        "--nnodes=2",
        "--node-rank=1",
        "--master-addr=10.0.0.5",
        "--master-port=2950",
        SCRIPT,
    ]
    one_gpu_each = launch_argv(with_gpus(tiny_plan, 1), {**environ, "MASTER_PORT": ""}, 1, SCRIPT)
    assert one_gpu_each is not None and "--master-port=29500" in one_gpu_each
    single = launch_argv(with_gpus(tiny_plan, 2), {"NNODES": "1"}, 2, SCRIPT)
    assert single is not None and "--standalone" in single


def test_several_nodes_without_an_address_is_an_error(tiny_plan: Plan) -> None:
    plan = with_gpus(tiny_plan, 2)
    with pytest.raises(UserError, match=r"MASTER_ADDR not set"):
        launch_argv(plan, {"NNODES": "2", "NODE_RANK": "0"}, 2, SCRIPT)
    with pytest.raises(UserError, match=r"NNODES = 'x': set the number of nodes"):
        launch_argv(plan, {"NNODES": "x"}, 2, SCRIPT)


def test_the_environment_is_read_once_with_the_contract_names(tmp_path: Path) -> None:
    environ: dict[str, Any] = {
        contract.ENV_OUTPUT_DIR: str(tmp_path),
        contract.ENV_MODEL_PATH: "/inputs/model",
        contract.ENV_DATA_PATH: "",
        contract.ENV_SMOKE: "1",
        contract.ENV_RUN_ID: "run-1",
        contract.ENV_PROFILE_STEPS: "x",
        "RANK": "1",
        "LOCAL_RANK": "1",
        "WORLD_SIZE": "2",
    }
    env = RunEnv.read(environ)
    assert env.output_dir == tmp_path and env.model_path == "/inputs/model"
    assert env.data_path is None and env.smoke and env.run_id == "run-1"
    assert (env.rank, env.local_rank, env.world_size) == (1, 1, 2)
    assert env.launched and not env.writes and env.profile_steps == 0
    alone = RunEnv.read({})
    assert alone.output_dir == Path("out") and alone.writes and not alone.launched
    assert alone.world_size == 1 and not alone.smoke
