"""The shell every node of a multi-node export runs, run for real: two "nodes" on this machine,
each the exported script under sh with the real torchrun (gloo on CPU), rendezvous through
c10d at the first node. A small worker program stands in for the training script (the
trainer is tested on its own); it does what the trainer does at the edges: rank 0 leaves the
user-error flag and exits 2, and every rank catches SIGTERM and exits 143."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import yaml
from export_support import IMAGE, RUN_ID, main_file, make_plan

from qlc.contract import EXIT_USER_ERROR, USER_ERROR_FLAG
from qlc.runtime.export import (
    RDZV_PORT,
    SCRIPT,
    TORCHRUN,
    ExportOptions,
    job_shape,
    node_script,
)

WORKER = """
import os, pathlib, signal, sys, time
import torch.distributed as dist

out = pathlib.Path(os.environ["OUT"])
def on_term(signum, frame):
    (out / f"checkpoint-{os.environ['RANK']}").write_text("saved")
    sys.exit(143)
signal.signal(signal.SIGTERM, on_term)
dist.init_process_group("gloo")
rank, mode = dist.get_rank(), os.environ["MODE"]
(out / f"started-{rank}").write_text(os.environ["TORCHELASTIC_RUN_ID"])
if mode == "user-error" and rank == 0:
    pathlib.Path(os.environ["QLC_USER_ERROR_FILE"]).write_text("data.path: no such file\\n")
    sys.exit(2)
if mode == "term":
    time.sleep(600)
dist.barrier()
dist.destroy_process_group()
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start_nodes(tmp_path: Path, mode: str) -> list[subprocess.Popen[bytes]]:
    shape = job_shape(make_plan("gs://b/runs", gpus=0), IMAGE, ExportOptions(nodes=2), RUN_ID)
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER, encoding="utf-8")
    script = node_script(replace(shape, gpus=0), "localhost")
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    script = script.replace(TORCHRUN, torchrun).replace(SCRIPT, str(worker))
    script = script.replace(f":{RDZV_PORT}", f":{free_port()}")
    env = {**os.environ, "QLC_RUN_ID": RUN_ID, "MODE": mode, "OUT": str(tmp_path),
           "QLC_USER_ERROR_FILE": str(tmp_path / USER_ERROR_FLAG)}  # fmt: skip
    # Each node in its own session, as a container's PID 1 would be: a signal reaches sh only.
    return [
        subprocess.Popen(["/bin/sh", "-c", script], env=env, cwd=tmp_path, start_new_session=True)
        for _ in range(2)
    ]


def wait_all(nodes: list[subprocess.Popen[bytes]], timeout_s: float = 240) -> list[int]:
    try:
        return [node.wait(timeout=timeout_s) for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)


def test_two_nodes_rendezvous_with_the_run_id_and_succeed(tmp_path: Path) -> None:
    assert wait_all(start_nodes(tmp_path, "ok")) == [0, 0]
    ranks = sorted(path.name for path in tmp_path.glob("started-*"))
    assert ranks == ["started-0", "started-1"]
    assert (tmp_path / "started-0").read_text() == RUN_ID  # torchrun's rendezvous id


def test_a_user_error_on_rank_0_exits_2_on_every_node(tmp_path: Path) -> None:
    (tmp_path / USER_ERROR_FLAG).write_text("left by an earlier attempt\n")  # removed at start
    codes = wait_all(start_nodes(tmp_path, "user-error"))
    assert codes == [EXIT_USER_ERROR, EXIT_USER_ERROR]  # torchrun alone exits 1
    assert (tmp_path / USER_ERROR_FLAG).read_text() == "data.path: no such file\n"


def test_sigterm_reaches_the_training_processes_through_torchrun(tmp_path: Path) -> None:
    nodes = start_nodes(tmp_path, "term")
    deadline = time.monotonic() + 180
    while len(list(tmp_path.glob("started-*"))) < 2:
        assert time.monotonic() < deadline, "the nodes did not start"
        assert all(node.poll() is None for node in nodes), "a node ended early"
        time.sleep(0.5)
    for node in nodes:  # what the service does to the container's first process
        os.kill(node.pid, signal.SIGTERM)
    codes = wait_all(nodes, timeout_s=120)
    assert sorted(path.name for path in tmp_path.glob("checkpoint-*")) == [
        "checkpoint-0",
        "checkpoint-1",
    ]
    assert all(code not in (0, EXIT_USER_ERROR) for code in codes), codes


def exported_scripts() -> dict[str, str]:
    """The node script as each target's multi-node golden case carries it."""
    k8s = yaml.safe_load(main_file("kubernetes-multi"))["spec"]["replicatedJobs"][0]
    aws = json.loads(main_file("aws-batch-multi"))["nodeProperties"]["nodeRangeProperties"][0]
    gcp = json.loads(main_file("gcp-batch-multi"))["taskGroups"][0]["taskSpec"]["runnables"][0]
    return {
        "kubernetes": k8s["template"]["spec"]["template"]["spec"]["containers"][0]["command"][2],
        "aws-batch": aws["container"]["command"][2],
        "gcp-batch": gcp["container"]["commands"][1],
        "skypilot": yaml.safe_load(main_file("skypilot-multi"))["run"],
    }


def test_every_exported_node_script_parses_as_posix_shell() -> None:
    for target, script in exported_scripts().items():
        done = subprocess.run(["/bin/sh", "-n", "-c", script], capture_output=True, text=True,
                              check=False)  # fmt: skip
        assert done.returncode == 0, (target, done.stderr)
        assert script.count("/opt/venv/bin/torchrun") == 1, target
