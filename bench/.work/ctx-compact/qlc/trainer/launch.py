"""Processes and devices: how many training processes this node runs (torchrun starts this
script once per process when there are several), which GPUs a run sees, the process group.

The plan says how many GPUs a node has (runtime.gpus); the launch path may ask for more CPU
processes (QLC_NPROC, gloo) and a batch service for more nodes (NNODES): the world size they
give is applied to the plan's schedule by its own rule (Schedule.for_world) and recorded.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Mapping
from typing import Any

from qlc import contract
from qlc.compiler.plan import Plan
from qlc.trainer.errors import UserError
from qlc.trainer.runenv import RunEnv

DEFAULT_MASTER_PORT = "29500"


def explicit_nproc(environ: Mapping[str, str]) -> int | None:
    """$QLC_NPROC when it is a whole number of processes (1 or more), else None."""
    explicit = environ.get(contract.ENV_NPROC, "").strip()
    return int(explicit) if explicit.isdigit() and int(explicit) > 0 else None


def gpus_asked(plan: Plan, environ: Mapping[str, str]) -> int:
    """GPUs this node's run asks for: one per process of $QLC_NPROC, else runtime.gpus."""
    gpus = plan.runtime.gpus
    return (explicit_nproc(environ) or gpus) if gpus > 0 else 0


def processes_wanted(plan: Plan, environ: Mapping[str, str], visible_gpus: int) -> int:
    """Training processes on this node: $QLC_NPROC when set, else runtime.gpus; never fewer
    GPUs than asked for (a CPU plan with QLC_NPROC runs that many gloo processes)."""
    gpus = plan.runtime.gpus
    explicit = environ.get(contract.ENV_NPROC, "").strip()
    if explicit and explicit_nproc(environ) is None:
        raise UserError(
            f"{contract.ENV_NPROC} = {explicit!r}: set a whole number of processes (1 or more)"
        )
    nproc = int(explicit) if explicit else max(gpus, 1)
    wanted = gpus_asked(plan, environ)
    if wanted > visible_gpus:
        source = f"{contract.ENV_NPROC} = {nproc}" if explicit else f"runtime.gpus = {gpus}"
        raise UserError(
            f"{source} asks for {wanted} GPU(s) but {visible_gpus} are visible: pass the GPUs "
            "through (qlc run passes runtime.gpus of them; docker --gpus), lower runtime.gpus, "
            "or try the spec on CPU with `qlc run SPEC --smoke`"
        )
    return nproc


def rendezvous_args(environ: Mapping[str, str]) -> list[str]:
    """One node: --standalone. Several (NNODES > 1): this node's rank and node 0's address."""
    nodes = (environ.get("NNODES") or "1").strip()
    if not nodes.isdigit() or int(nodes) < 1:
        raise UserError(f"NNODES = {nodes!r}: set the number of nodes (1 or more)")
    if int(nodes) == 1:
        return ["--standalone"]
    missing = [name for name in ("NODE_RANK", "MASTER_ADDR") if not environ.get(name)]
    if missing:
        raise UserError(
            f"NNODES = {nodes} but {' and '.join(missing)} not set: every node needs NODE_RANK "
            "(its index, 0 on the first) and MASTER_ADDR (the first node's address)"
        )
    return [
        f"--nnodes={nodes}",
        f"--node-rank={environ['NODE_RANK']}",
        f"--master-addr={environ['MASTER_ADDR']}",
        f"--master-port={environ.get('MASTER_PORT') or DEFAULT_MASTER_PORT}",
    ]


def launch_argv(
    plan: Plan, environ: Mapping[str, str], visible_gpus: int, script: str
) -> list[str] | None:
    """The torch.distributed.run (torchrun) command starting `script` once per process, or
    None: one process trains, or a launcher already started this one."""
    if "WORLD_SIZE" in environ or "LOCAL_RANK" in environ:
        return None
    nproc = processes_wanted(plan, environ, visible_gpus)
    if nproc < 2 and (environ.get("NNODES") or "1").strip() == "1":
        return None
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}"]
    return launcher + rendezvous_args(environ) + [script]


def stop_with_parent() -> None:
    """In torchrun's process, before it starts: SIGTERM when this script's process dies (even
    by SIGKILL), so torchrun stops the training processes instead of leaving them running."""
    if sys.platform == "linux":
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def supervise_launch(argv: list[str], environ: Mapping[str, str]) -> int:
    """Run torchrun as a child in its own session: SIGTERM/SIGINT reach it once, from here
    (it stops the processes, rank 0 records the run); exit 128+signal then."""
    received: list[int] = []
    children: list[subprocess.Popen[bytes]] = []

    def forward(signum: int, frame: Any) -> None:
        if not received:
            received.append(signum)
            for child in children:
                child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    print("launching: " + " ".join(argv[1:]), flush=True)
    children.append(
        subprocess.Popen(
            argv, env=dict(environ), start_new_session=True, preexec_fn=stop_with_parent
        )
    )
    if received:  # arrived while it started
        children[0].send_signal(received[0])
    code = children[0].wait()
    if received and code != contract.EXIT_PREEMPTED:
        return 128 + received[0]
    return code


def visible_devices_for(plan: Plan, environ: Mapping[str, str], visible: int) -> str | None:
    """CUDA_VISIBLE_DEVICES showing this run only the GPUs it asked for, or None: it sees no
    more than that, trains on CPU, or a launcher started it. Without it one process on a bigger
    host would train through nn.DataParallel on every GPU, and the manifest would list GPUs the
    run never used."""
    gpus = gpus_asked(plan, environ)
    if "WORLD_SIZE" in environ or "LOCAL_RANK" in environ or gpus < 1 or visible <= gpus:
        return None
    listed = [d.strip() for d in environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    chosen = listed[:gpus] if len(listed) >= gpus else [str(i) for i in range(gpus)]
    return ",".join(chosen)


def narrow_visible_gpus(plan: Plan) -> str | None:
    """Before anything starts CUDA (torch counts devices through NVML until then)."""
    import torch

    narrowed = visible_devices_for(plan, os.environ, torch.cuda.device_count())
    if narrowed is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = narrowed
    return narrowed


def uses_cpu(plan: Plan, env: RunEnv) -> bool:
    """Whether this process trains on CPU; UserError when the GPUs asked for are missing."""
    import torch

    gpus = plan.runtime.gpus
    if gpus == 0:
        return True
    visible = torch.cuda.device_count()
    if visible < gpus or env.local_rank >= visible:
        raise UserError(
            f"runtime.gpus = {gpus} but {visible} GPU(s) are visible to process "
            f"{env.local_rank} of this node: pass the GPUs through, lower runtime.gpus, or try "
            "the spec on CPU with `qlc run SPEC --smoke`"
        )
    return False


def init_distributed(env: RunEnv, use_cpu: bool) -> bool:
    """The process group of a launched run (NCCL on GPUs, gloo on CPU); whether this call made
    it (a group the caller already had is the caller's to end)."""
    import torch
    import torch.distributed as dist

    if env.world_size < 2 or dist.is_initialized():
        return False
    if not use_cpu:
        torch.cuda.set_device(env.local_rank)
    dist.init_process_group(backend="gloo" if use_cpu else "nccl")
    return True


def rank_devices(env: RunEnv, use_cpu: bool) -> list[str]:
    """The device every process trains on, in rank order: a GPU's name, or "cpu"."""
    import torch
    import torch.distributed as dist

    mine = "cpu" if use_cpu else torch.cuda.get_device_name(env.local_rank)
    if env.world_size < 2:
        return [mine]
    every: list[Any] = [None] * env.world_size
    dist.all_gather_object(every, mine)
    return [str(name) for name in every]


def broadcast(value: Any, env: RunEnv) -> Any:
    """Rank 0's `value` on every process."""
    if env.world_size < 2:
        return value
    import torch.distributed as dist

    box: list[Any] = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(env: RunEnv) -> None:
    if env.world_size > 1:
        import torch.distributed as dist

        dist.barrier()


def finish_distributed() -> None:
    dist = sys.modules.get("torch.distributed")  # None when the run ended before torch loaded
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
