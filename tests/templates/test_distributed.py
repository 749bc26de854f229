"""Several training processes from one `python train.py`: the launch decision, and real
2-process runs of specs/tiny.toml on CPU (gloo) through the script's own torchrun launch.

The 2-process runs are the CI stand-in for several GPUs: one adapter and one manifest (rank 0
writes), the same examples per optimizer step as one process when the spec sets
train.examples_per_step, and resume after SIGTERM with two processes.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from conftest import (
    SPECS,
    assert_ok,
    compile_to,
    edit_plan,
    manifest,
    progress,
    run_train,
    sha256,
    start_train,
)

SCRIPT = "/qlc/train.py"
LAUNCHER = [sys.executable, "-m", "torch.distributed.run"]
ADAPTER = Path("adapter") / "adapter_model.safetensors"


def spec_with(script: ModuleType, gpus: int, engine: str = "reference") -> dict[str, Any]:
    plan = json.loads((Path(script.__file__).parent / "plan.json").read_text())
    spec = plan["spec"]
    spec["runtime"]["gpus"], spec["train"]["engine"] = gpus, engine
    return spec


# --------------------------------------------------------------------------- launch decision


def test_several_gpus_launch_one_process_each(script: ModuleType) -> None:
    argv = script.launch_argv(spec_with(script, 2), {}, 2, SCRIPT)
    assert argv == [*LAUNCHER, "--nproc-per-node=2", "--standalone", SCRIPT]


def test_one_gpu_or_cpu_runs_in_this_process(script: ModuleType) -> None:
    assert script.launch_argv(spec_with(script, 1), {}, 8, SCRIPT) is None
    assert script.launch_argv(spec_with(script, 0), {}, 0, SCRIPT) is None


@pytest.mark.parametrize(
    ("gpus", "environ", "visible", "shown"),
    [
        (1, {}, 2, "0"),  # one process on a 2-GPU host: not nn.DataParallel over both
        (2, {}, 8, "0,1"),  # torchrun's processes inherit it
        (1, {"CUDA_VISIBLE_DEVICES": "3,5"}, 2, "3"),  # the first of those the host gave it
        (2, {"QLC_NPROC": "1"}, 2, "0"),
        (1, {}, 1, None),
        (2, {}, 2, None),
        (0, {}, 4, None),  # CPU spec
        (1, {"LOCAL_RANK": "0"}, 8, None),  # a launcher's process keeps its view
        (1, {"WORLD_SIZE": "4"}, 8, None),
    ],
)
def test_a_run_sees_only_the_gpus_it_asked_for(
    script: ModuleType, gpus: int, environ: dict[str, str], visible: int, shown: str | None
) -> None:
    assert script.visible_devices_for(spec_with(script, gpus), environ, visible) == shown


@pytest.mark.parametrize("started_by", ["WORLD_SIZE", "LOCAL_RANK"])
def test_a_launched_process_does_not_launch_again(script: ModuleType, started_by: str) -> None:
    assert script.launch_argv(spec_with(script, 4), {started_by: "0"}, 4, SCRIPT) is None


def test_fewer_gpus_than_the_spec_asks_is_an_error(script: ModuleType) -> None:
    with pytest.raises(script.UserError, match=r"runtime\.gpus = 2 asks for 2 GPU\(s\) but 1"):
        script.launch_argv(spec_with(script, 2), {}, 1, SCRIPT)


def test_qlc_nproc_runs_gloo_processes_on_a_cpu_spec(script: ModuleType) -> None:
    argv = script.launch_argv(spec_with(script, 0), {"QLC_NPROC": "2"}, 0, SCRIPT)
    assert argv == [*LAUNCHER, "--nproc-per-node=2", "--standalone", SCRIPT]
    assert script.launch_argv(spec_with(script, 4), {"QLC_NPROC": "1"}, 4, SCRIPT) is None


def test_qlc_nproc_on_a_gpu_spec_needs_that_many_gpus(script: ModuleType) -> None:
    with pytest.raises(script.UserError, match=r"QLC_NPROC = 3 asks for 3 GPU\(s\) but 2"):
        script.launch_argv(spec_with(script, 1), {"QLC_NPROC": "3"}, 2, SCRIPT)
    with pytest.raises(script.UserError, match=r"QLC_NPROC = 'two'"):
        script.launch_argv(spec_with(script, 1), {"QLC_NPROC": "two"}, 2, SCRIPT)


def test_several_nodes_rendezvous_at_node_0(script: ModuleType) -> None:
    environ = {"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "10.0.0.5", "MASTER_PORT": "2950"}
    argv = script.launch_argv(spec_with(script, 4), environ, 4, SCRIPT)
    assert argv == [
        *LAUNCHER,
        "--nproc-per-node=4",
        "--nnodes=2",
        "--node-rank=1",
        "--master-addr=10.0.0.5",
        "--master-port=2950",
        SCRIPT,
    ]
    single = script.launch_argv(spec_with(script, 2), {"NNODES": "1"}, 2, SCRIPT)
    assert single is not None and "--standalone" in single


def test_several_nodes_without_an_address_is_an_error(script: ModuleType) -> None:
    with pytest.raises(script.UserError, match=r"MASTER_ADDR not set"):
        script.launch_argv(spec_with(script, 2), {"NNODES": "2", "NODE_RANK": "0"}, 2, SCRIPT)


def test_the_fast_engine_is_data_parallel_not_sharded(script: ModuleType) -> None:
    assert script.launch_argv(spec_with(script, 2, "fast"), {}, 2, SCRIPT) is not None
    sharded = spec_with(script, 2, "fast")
    sharded["runtime"]["distributed"] = "fsdp"
    with pytest.raises(script.UserError, match=r'distributed = "fsdp": the fast engine keeps'):
        script.launch_argv(sharded, {}, 2, SCRIPT)


def test_missing_gpus_stop_the_run_with_a_failed_manifest(tmp_path: Path) -> None:
    context = compile_to("tiny.toml", tmp_path / "ctx")
    edit_plan(context, runtime={"gpus": 2})
    result = run_train(context, tmp_path / "out", CUDA_VISIBLE_DEVICES="")
    assert result.returncode == 2, result.stderr[-3000:]
    assert "error: runtime.gpus = 2 asks for 2 GPU(s) but 0 are visible" in result.stderr
    assert "Traceback" not in result.stderr and "launching" not in result.stdout
    made = manifest(tmp_path / "out")["predicate"]
    assert made["status"] == "failed" and "0 are visible" in made["error"]


# --------------------------------------------------------------------------- real 2-process runs


@pytest.mark.slow
def test_a_user_error_in_the_processes_exits_2(tiny_context: Path, tmp_path: Path) -> None:
    data = tmp_path / "bad.jsonl"
    data.write_text((json.dumps({"body": "no text field here"}) + "\n") * 8)
    out = tmp_path / "out"
    result = run_train(tiny_context, out, QLC_NPROC="2", QLC_DATA_PATH=str(data))
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-3000:]
    assert "error: row 0: no field 'text'" in result.stderr
    made = manifest(out)["predicate"]
    assert made["status"] == "failed" and made["run"]["world_size"] == 2
    assert "no field 'text'" in made["error"] and not (out / ".qlc-user-error").exists()


def per_step_source() -> bytes:
    """specs/tiny.toml training one epoch at 8 examples per optimizer step (derived accum)."""
    text = (SPECS / "tiny.toml").read_text()
    assert "max_steps = 12\n" in text
    return text.replace("max_steps = 12\n", "epochs = 1\nexamples_per_step = 8\n").encode()


@pytest.fixture(scope="module")
def per_step_context(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return compile_to("tiny.toml", tmp_path_factory.mktemp("ctx"), per_step_source())


@pytest.fixture(scope="module")
def one_process(per_step_context: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("one-process")
    assert_ok(run_train(per_step_context, out))
    return out


@pytest.fixture(scope="module")
def two_processes(
    per_step_context: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, str, str]:
    """Two gloo processes stopped by SIGTERM after checkpoint-4, then resumed with two:
    the run directory, the stopped run's output and the resumed run's stdout."""
    out = tmp_path_factory.mktemp("two-processes")
    marker = out / "checkpoints" / "checkpoint-4" / "qlc-complete.json"
    process = start_train(per_step_context, out, QLC_NPROC="2")
    deadline = time.time() + 300
    while not marker.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    stopped, _ = process.communicate(timeout=120)
    assert marker.exists(), stopped[-3000:]
    assert process.returncode == 128 + signal.SIGTERM, stopped[-3000:]
    interrupted = manifest(out)
    assert interrupted["predicate"]["status"] == "interrupted", stopped[-3000:]
    assert interrupted["subject"] == [] and not (out / ADAPTER).exists()
    resumed = run_train(per_step_context, out, QLC_NPROC="2")
    assert_ok(resumed)
    return out, stopped, resumed.stdout


@pytest.mark.slow
def test_two_processes_write_one_adapter_and_one_manifest(
    two_processes: tuple[Path, str, str],
) -> None:
    out, stopped, _ = two_processes
    assert "launching: -m torch.distributed.run --nproc-per-node=2 --standalone" in stopped
    statement = manifest(out)
    predicate = statement["predicate"]
    assert predicate["status"] == "succeeded" and predicate["error"] is None
    assert predicate["run"]["world_size"] == 2
    assert predicate["environment"]["rank_devices"] == ["cpu", "cpu"]
    subjects = {s["name"]: s["digest"]["sha256"] for s in statement["subject"]}
    assert subjects["adapter/adapter_model.safetensors"] == sha256(out / ADAPTER)
    assert all(sha256(out / name) == digest for name, digest in subjects.items())
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("manifest")) == [
        "manifest.json"
    ]
    assert len(list(out.rglob("adapter_model.safetensors"))) == 1 + len(
        list((out / "checkpoints").glob("checkpoint-*"))
    )
    checkpoint = out / "checkpoints" / "checkpoint-4"
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= {p.name for p in checkpoint.iterdir()}


@pytest.mark.slow
def test_two_processes_resume_from_the_checkpoint_rank_0_chose(
    two_processes: tuple[Path, str, str],
) -> None:
    out, _, stdout = two_processes
    predicate = manifest(out)["predicate"]
    assert Path(predicate["run"]["resumed_from"]).name == "checkpoint-4"
    lines = progress(stdout)  # printed by rank 0 only: one line a step
    assert [line["step"] for line in lines] == [5, 6, 7]
    assert all(line["loss"] > 0 for line in lines)
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["event"] == "train"] == list(range(1, 8))
    assert [r["checkpoint"] for r in records if r["event"] == "resume"] == ["checkpoint-4"]


@pytest.mark.slow
def test_examples_per_step_match_one_process(
    one_process: Path, two_processes: tuple[Path, str, str]
) -> None:
    one, two = manifest(one_process)["predicate"], manifest(two_processes[0])["predicate"]
    plan = json.loads((one_process / "plan.json").read_text())["spec"]["train"]
    assert plan["examples_per_step"] == 8 and plan["grad_accum"] == 2  # 8 = 4 x 2 x 1
    assert one["run"]["world_size"] == 1 and one["run"]["examples_per_step"] == 8
    assert two["run"]["examples_per_step"] == 8  # 4 x 1 accumulation x 2 processes
    # one epoch of 56 examples at 8 a step: 7 optimizer steps over the same tokens either way
    assert one["metrics"]["steps"] == two["metrics"]["steps"] == 7
    assert one["metrics"]["tokens_trained"] == two["metrics"]["tokens_trained"] > 0


@pytest.mark.parametrize(
    ("engine", "memory", "use_cpu", "on_host"),
    [
        ("fast", "lean", False, True),  # streamed from host memory: loaded there
        ("fast", "lean", True, False),  # CPU training: loaded on CPU as always
        ("fast", "standard", False, False),
        ("reference", "lean", False, False),
    ],
)
def test_only_the_streamed_lean_setting_loads_into_host_memory(
    script: ModuleType, engine: str, memory: str, use_cpu: bool, on_host: bool
) -> None:
    spec = spec_with(script, 1, engine)
    spec["train"]["memory"] = memory
    assert script.streams_base(spec, use_cpu) is on_host
    with script.quantized_on_gpu_kept_on_host(False):  # off: bitsandbytes untouched
        import bitsandbytes.functional as bnbf

        assert bnbf.quantize_4bit.__module__ == "bitsandbytes.functional"


# --------------------------------------------------------------------------- the fast engine


@pytest.fixture(scope="module")
def fast_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """specs/tiny.toml at 8 examples per step on the fast engine, without dropout (whose
    masks depend on which process draws them): one process, then two gloo processes."""
    source = per_step_source().replace(b"dropout = 0.05", b"dropout = 0.0")
    source = source.replace(b"[train]\n", b'[train]\nengine = "fast"\n')
    context = compile_to("tiny.toml", tmp_path_factory.mktemp("fast-ctx"), source)
    one, two = tmp_path_factory.mktemp("fast-one"), tmp_path_factory.mktemp("fast-two")
    assert_ok(run_train(context, one))
    result = run_train(context, two, QLC_NPROC="2")
    assert_ok(result)
    assert "--nproc-per-node=2" in result.stdout
    return one, two


@pytest.mark.slow
def test_fast_engine_on_two_processes_trains_the_one_process_steps(
    fast_runs: tuple[Path, Path],
) -> None:
    """Each process trains half of every step's micro-batches and the gradients are summed:
    the same steps, losses and adapter as one process accumulating them all."""
    from safetensors.torch import load_file

    one, two = (manifest(out)["predicate"] for out in fast_runs)
    assert one["run"]["engine"] == two["run"]["engine"] == "fast"
    assert two["status"] == "succeeded" and two["run"]["world_size"] == 2
    assert one["metrics"]["steps"] == two["metrics"]["steps"] == 7
    assert one["metrics"]["tokens_trained"] == two["metrics"]["tokens_trained"] > 0
    losses = [
        [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
         if r.get("event", "train") == "train" and r.get("loss") is not None]
        for out in fast_runs
    ]  # fmt: skip
    assert len(losses[0]) == 7 and losses[1] == pytest.approx(losses[0], rel=1e-4)
    checkpoints = list((fast_runs[1] / "checkpoints").glob("checkpoint-*"))
    assert [c.name for c in checkpoints] == ["checkpoint-4"]  # written once, by rank 0
    assert len(list(fast_runs[1].rglob("adapter_model.safetensors"))) == 1 + len(checkpoints)
    a, b = (load_file(str(out / ADAPTER)) for out in fast_runs)
    assert a.keys() == b.keys()
    for name in a:
        error = float((a[name] - b[name]).norm() / a[name].norm().clamp_min(1e-12))
        assert error < 1e-4, f"{name}: {error:.2e}"
