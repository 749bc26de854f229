"""run --local: the same compiled script as a subprocess of this Python environment.

For machines without Docker (a GPU host, a batch node that already is the container). The
installed packages are compared with the spec's lock first (one line).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console

from qlc import contract
from qlc.runtime.launch import host_input_paths, trainer_env
from qlc.runtime.manifest import HostView
from qlc.runtime.run import (
    RunResult,
    _now,
    claim,
    conclude,
    new_run_dir,
    redactor,
    run_inputs,
    secret_values,
)
from qlc.runtime.supervise import STOP_TIMEOUT_S, Outcome, stream_lines

if TYPE_CHECKING:
    from qlc.compiler.context import BuildContext


def lock_differences(lock_text: str) -> list[str]:
    """Packages whose installed version differs from the lock (or that are missing)."""
    from importlib import metadata

    from qlc.compiler.lockfile import parse_lock

    differences = []
    for requirement in parse_lock(lock_text).requirements:
        try:
            installed = metadata.version(requirement.name)
        except metadata.PackageNotFoundError:
            installed = None
        if installed is None or installed.split("+")[0] != requirement.version:
            differences.append(
                f"{requirement.name}: lock {requirement.version}, installed {installed or 'none'}"
            )
    return differences


def lock_note(context: BuildContext) -> str:
    """One line on how this Python's packages compare with the spec's lock."""
    lock = context.files.get(contract.LOCK_FILE)
    if lock is None:
        return "no lock beside the spec: the run uses this Python's packages as they are"
    differ = lock_differences(lock.decode())
    if not differ:
        return "installed packages match the lock"
    shown = ", ".join(differ[:3]) + (f" and {len(differ) - 3} more" if len(differ) > 3 else "")
    return (
        f"warning: {len(differ)} installed packages differ from the lock ({shown}); the "
        "manifest records the versions that ran"
    )


def run_local(
    spec_path: Path,
    project: Path,
    *,
    smoke: bool = False,
    run_dir: Path | None = None,
    console: Console | None = None,
    environ: Mapping[str, str] | None = None,
    extra_env: Mapping[str, str] | None = None,
) -> RunResult:
    """Compile the spec, then run its context's train.py in this Python with the launch
    path's environment (on top of this process's own: the person running qlc chose it)."""
    from qlc.runtime.build import compile_for_build, write_context_dir

    console = console or Console(stderr=True, highlight=False, soft_wrap=True)
    environ = dict(os.environ if environ is None else environ)
    context = compile_for_build(spec_path, project, require_lock=False).context
    inputs = run_inputs(context.plan, spec_path, project)
    console.print(lock_note(context), markup=False)
    folder = write_context_dir(context, project)
    run_dir = claim(run_dir or new_run_dir(inputs.output_root), inputs)
    local = inputs.local
    env = {
        **{k: v for k, v in environ.items() if not k.startswith(contract.PROTOCOL_PREFIX)},
        **trainer_env(
            inputs.plan,
            output_dir=str(run_dir),
            model_path=str(local.model_dir) if local.model_dir else None,
            data_path=str(local.data_file) if local.data_file else None,
            input_paths=host_input_paths(local),
            smoke=smoke,
            run_id=run_dir.name,
            extra=extra_env,
        ),
        contract.ENV_PLAN: str(folder / contract.PLAN_FILE),
        "PYTHONUNBUFFERED": "1",
    }
    redact = redactor(secret_values(inputs.plan, environ))
    log_path = run_dir / contract.RUN_LOG_FILE
    console.print(f"run {inputs.job} (local, {sys.executable}) -> {run_dir}", markup=False)
    started, clock = _now(), time.monotonic()
    command = [sys.executable, str(folder / contract.SCRIPT_FILE)]
    outcome = _supervise_process(command, env, log_path, redact, console, inputs.job)
    host = HostView(
        mode="local",
        exit_code=outcome.exit_code,
        oom_killed=False,
        ended=outcome.ended,
        image_id=None,
        image_tag=None,
        base_image=None,
        base_image_id=None,
        started_at=started,
        finished_at=_now(),
        duration_s=round(time.monotonic() - clock, 3),
        user=f"{os.getuid()}:{os.getgid()}",
        network=None,
        gpus_requested=inputs.plan.runtime.gpus,
        detail=outcome.detail,
        spec_path=str(inputs.spec_path),
    )
    return conclude(run_dir, host, log_path, outcome, redact)


def _supervise_process(
    command: list[str],
    env: dict[str, str],
    log_path: Path,
    redact: Callable[[str], str],
    console: Console,
    title: str,
) -> Outcome:
    process = subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        bufsize=1,
        start_new_session=True,
    )
    assert process.stdout is not None

    def interrupt() -> None:
        console.print(
            f"interrupted: stopping the training process (up to {STOP_TIMEOUT_S}s)", markup=False
        )
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(STOP_TIMEOUT_S)
        except (subprocess.TimeoutExpired, KeyboardInterrupt):
            process.kill()

    lines = (line.rstrip("\n") for line in process.stdout)
    tail, ended = stream_lines(lines, log_path, redact, console, title, on_interrupt=interrupt)
    code = process.wait()
    return Outcome(code, ended, tail=tail)
