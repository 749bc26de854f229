"""Supervising a training process: stream its log (to run.log and the progress display),
stop it cleanly on Ctrl-C, and say how it ended. Used by `qlc run` (a container through the
engine seam) and `qlc run --local` (a subprocess)."""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from rich.console import Console

from qlc.runtime.docker_engine import ContainerRequest, Engine, EngineError
from qlc.runtime.progress import RunProgress

STOP_TIMEOUT_S = 30


@dataclass
class Outcome:
    exit_code: int | None
    ended: str
    oom_killed: bool = False
    detail: str = ""
    tail: list[str] = field(default_factory=list)


def supervise_container(
    engine: Engine,
    request: ContainerRequest,
    log_path: Path,
    redact: Callable[[str], str],
    console: Console,
    title: str,
) -> Outcome:
    container_id = engine.create(request)
    try:
        try:
            engine.start(container_id)
        except EngineError as error:
            return Outcome(None, "not-started", detail=_start_hint(str(error), request.gpus))
        tail, ended = stream_lines(
            engine.logs(container_id),
            log_path,
            redact,
            console,
            title,
            on_interrupt=lambda: _stop(engine, container_id, console),
        )
        code = engine.wait(container_id)
        state = engine.state(container_id)
        if ended != "interrupted":
            ended = "oom-killed" if state.oom_killed else "exited"
        return Outcome(code, ended, state.oom_killed, state.error, tail)
    except EngineError as error:
        return Outcome(None, "lost", detail=f"lost the container: {error}")
    except Exception as error:  # the daemon went away mid-run (connection reset, timeout)
        return Outcome(None, "lost", detail=f"lost contact with the Docker daemon: {error}")
    finally:
        try:
            engine.remove(container_id)
        except Exception as error:  # report, but keep the run's outcome
            console.print(
                f"warning: could not remove container {container_id[:12]}: {error}", markup=False
            )


def stream_lines(
    lines: Iterator[str],
    log_path: Path,
    redact: Callable[[str], str],
    console: Console,
    title: str,
    on_interrupt: Callable[[], None],
) -> tuple[list[str], str]:
    """Copy log lines to the run log and the display; Ctrl-C stops the run cleanly."""
    tail: list[str] = []
    ended = "exited"
    with RunLog(log_path, console) as log, RunProgress(console, title) as bar:
        while True:
            try:
                for raw in lines:
                    line = redact(raw)
                    log.write(line)
                    tail = [*tail[-39:], line]
                    bar.feed(line)
                return tail, ended
            except KeyboardInterrupt:
                ended = "interrupted"
                on_interrupt()


class RunLog:
    """run.log that never stops the supervision: when it cannot be written (a full disk),
    say so once on stderr and go on without it, so the run is still followed, stopped on
    Ctrl-C and its container removed."""

    def __init__(self, path: Path, console: Console) -> None:
        self.path, self.console = path, console
        self.handle: TextIO | None = None
        try:
            self.handle = open_log(path)
        except OSError as error:
            self._give_up(error)

    def write(self, line: str) -> None:
        if self.handle is None:
            return
        try:
            self.handle.write(line + "\n")
            self.handle.flush()
        except OSError as error:
            self._give_up(error)

    def close(self) -> None:
        if self.handle is not None:
            try:
                self.handle.close()
            except OSError as error:
                self._give_up(error)

    def _give_up(self, error: OSError) -> None:
        handle, self.handle = self.handle, None
        if handle is not None:
            with contextlib.suppress(OSError):
                handle.close()
        self.console.print(
            f"warning: cannot write {self.path}: {error.strerror or error}; the run goes "
            "on, its further log lines are not kept",
            markup=False,
        )

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_log(path: Path) -> TextIO:
    """Append to the run log without following a link the run may have left in its place."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as error:
        if error.errno != errno.ELOOP:
            raise
        path.unlink()
        fd = os.open(path, flags, 0o644)
    return os.fdopen(fd, "a", encoding="utf-8")


def _stop(engine: Engine, container_id: str, console: Console) -> None:
    console.print(
        f"interrupted: stopping the container (up to {STOP_TIMEOUT_S}s; the run "
        "records itself as interrupted; Ctrl-C again kills it)",
        markup=False,
    )
    try:
        engine.stop(container_id, STOP_TIMEOUT_S)
    except KeyboardInterrupt:
        engine.kill(container_id)


def _start_hint(error: str, gpus: int) -> str:
    if gpus and ("device driver" in error or "gpu" in error.lower()):
        return (
            f"{error}\nfix: this daemon cannot pass GPUs through: install the NVIDIA "
            "Container Toolkit, or run the smoke mode (`qlc run --smoke`), or set "
            "runtime.gpus = 0"
        )
    return error
