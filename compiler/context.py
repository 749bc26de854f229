"""compile: spec text (+ its lock) -> BuildContext. Pure: same bytes in, same bytes out."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from qlc import __version__
from qlc.compiler.load import Diagnostic, SpecError, load_spec
from qlc.compiler.locate import key_positions, locate
from qlc.compiler.lockfile import (
    PLATFORM,
    LockError,
    check_lock,
    describe_inputs,
    lock_input_hash,
)
from qlc.compiler.plan import LockRef, Plan
from qlc.compiler.render import render_files
from qlc.compiler.resolve import ResolveError, resolve


@dataclass(frozen=True)
class BuildContext:
    """The files of a Docker build context, in memory, and the plan they were rendered from."""

    plan: Plan
    files: dict[str, bytes]
    warnings: list[str] = field(default_factory=list)

    @property
    def content_hash(self) -> str:
        """sha256 over every file's name and bytes, in name order: the image's identity."""
        digest = hashlib.sha256()
        for name in sorted(self.files):
            data = self.files[name]
            digest.update(f"{name}\0{len(data)}\0".encode())
            digest.update(data)
        return "sha256:" + digest.hexdigest()


def lock_name(spec_name: str) -> str:
    """The lock file that belongs beside a spec: specs/guanaco.toml -> specs/guanaco.lock."""
    stem = spec_name[: -len(".toml")] if spec_name.endswith(".toml") else spec_name
    return stem + ".lock"


def plan_spec(source: bytes, spec_name: str) -> tuple[Plan, list[Diagnostic]]:
    """Load and resolve spec bytes (no lock yet); SpecError, positioned, for what to fix."""
    spec, warnings = load_spec(source, spec_name)
    spec_sha256 = hashlib.sha256(source).hexdigest()
    try:
        plan = resolve(
            spec, spec_name=spec_name, spec_sha256=spec_sha256, qlc_version=__version__, lock=None
        )
    except ResolveError as err:
        raise SpecError([_at(spec_name, source, err.key, str(err))]) from None
    return plan, warnings


def compile_spec(
    source: bytes, spec_name: str, lock: bytes | None = None, require_lock: bool = True
) -> BuildContext:
    """Compile spec bytes into a build context. Raises SpecError for anything the user must fix."""
    plan, warnings = plan_spec(source, spec_name)
    lock_file = lock_name(spec_name)
    if lock is None and require_lock:
        raise SpecError(
            [
                Diagnostic(
                    spec_name,
                    1,
                    1,
                    "",
                    f"no lock file {lock_file}: run `qlc lock {spec_name}` and commit the lock",
                )
            ]
        )
    if lock is not None:
        expected = lock_input_hash(plan.stack, plan.stack.python, PLATFORM)
        wanted = describe_inputs(plan.stack, plan.stack.python, PLATFORM)
        try:
            check_lock(lock, expected, expected_for=wanted, spec_name=spec_name,
                       required=plan.stack.requirements())  # fmt: skip
        except LockError as err:
            raise SpecError(
                [Diagnostic(lock_file, getattr(err, "line", 1) or 1, 1, "", str(err))]
            ) from None
        ref = LockRef(
            path=lock_file.rsplit("/", 1)[-1],
            sha256=hashlib.sha256(lock).hexdigest(),
            input_hash=expected,
        )
        plan = plan.model_copy(update={"lock": ref})
    files = render_files(plan, source, lock)
    return BuildContext(plan=plan, files=files, warnings=[str(w) for w in warnings])


def _at(spec_name: str, source: bytes, key: str, message: str) -> Diagnostic:
    path = tuple(part for part in key.split(".") if part)
    line, column = locate(key_positions(source.decode("utf-8")), path)
    return Diagnostic(spec_name, line, column, key, message)
