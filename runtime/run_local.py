"""run --local: the same compiled script as a subprocess of this Python environment.

For machines without Docker (a GPU host, a batch node that already is the container). The
installed packages are checked against the spec's lock first and every difference named.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from rich.console import Console

from qlc.runtime.manifest import HostView
from qlc.runtime.run import (
    RunInputs,
    RunResult,
    _now,
    conclude,
    determinism_env,
    new_run_dir,
    redactor,
    secret_values,
)
from qlc.runtime.supervise import STOP_TIMEOUT_S, Outcome, stream_lines


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


def run_local(
    inputs: RunInputs,
    project: Path,
    *,
    smoke: bool = False,
    run_dir: Path | None = None,
    console: Console | None = None,
    environ: Mapping[str, str] | None = None,
) -> RunResult:
    from qlc.runtime.build import compile_for_build, write_context_dir

    console = console or Console(stderr=True, highlight=False, soft_wrap=True)
    environ = dict(os.environ if environ is None else environ)
    context = compile_for_build(inputs.spec_path, project, require_lock=False).context
    if "requirements.lock" in context.files:
        differ = lock_differences(context.files["requirements.lock"].decode())
        if differ:
            console.print(
                f"warning: {len(differ)} installed packages differ from the lock:\n  "
                + "\n  ".join(differ),
                markup=False,
            )
        else:
            console.print("installed packages match the lock", markup=False)
    folder = write_context_dir(context, project)
    run_dir = run_dir or new_run_dir(inputs.output_root)
    run_dir.mkdir(parents=True, exist_ok=True)
    env = {
        **environ,
        **inputs.spec.runtime.env,
        "QLC_PLAN": str(folder / "plan.json"),
        "QLC_OUTPUT_DIR": str(run_dir),
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("QLC_SMOKE", None)
    if smoke:
        env["QLC_SMOKE"] = "1"
    env.update(determinism_env(inputs.spec))
    if inputs.model_dir is not None:
        env["QLC_MODEL_PATH"] = str(inputs.model_dir)
    if inputs.data_file is not None:
        env["QLC_DATA_PATH"] = str(inputs.data_file)
    redact = redactor(secret_values(inputs.spec, environ))
    log_path = run_dir / "run.log"
    console.print(f"run {inputs.job} (local, {sys.executable}) -> {run_dir}", markup=False)
    started, clock = _now(), time.monotonic()
    outcome = _supervise_process(
        [sys.executable, str(folder / "train.py")], env, log_path, redact, console, inputs.job
    )
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
        gpus_requested=inputs.spec.runtime.gpus,
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
