"""How a training process stops: a problem the user can fix, a signal, or a launch."""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix (spec, data, environment): printed without a traceback,
    exit 2 (contract.EXIT_USER_ERROR), never retried by a batch service."""


class Interrupted(BaseException):
    """SIGTERM or SIGINT stopped the run (after a checkpoint, when the engine could save one).
    `checkpoint` names the checkpoint written on the way out, if any."""

    def __init__(self, signal_name: str, checkpoint: str | None = None) -> None:
        super().__init__(signal_name)
        self.signal_name = signal_name
        self.checkpoint = checkpoint


class Launched(BaseException):
    """torchrun ran the training processes (rank 0 wrote the records); exit with its code."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code
