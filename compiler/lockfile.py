"""The qlc lock format: a hash-locked pip requirements file with a qlc header.

    # qlc-lock-input: sha256:<hex>
    # qlc-lock-resolved-for: python 3.12, x86_64-manylinux_2_28, https://pypi.org/simple, ...
    accelerate==1.15.0 \
        --hash=sha256:...
        # via -r -

The body is what `uv pip compile --generate-hashes` writes; pip installs it with
`--require-hashes --no-deps`. The input hash covers exactly what the resolution depends on
(Python version, platform, index and the top-level requirements), so a lock is stale exactly
when one of those changes. Pure: parsing and hashing only.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass

from qlc.compiler.plan import Stack

INDEX_URL = "https://pypi.org/simple"
PLATFORM = "x86_64-manylinux_2_28"
INPUT_HEADER = "# qlc-lock-input: "
FOR_HEADER = "# qlc-lock-resolved-for: "
BODY_HEADER = "# qlc-lock-body: "
LOCK_FORMAT = 1
MAX_LOCK_BYTES = 8 << 20  # a lock of the CUDA stack is about 100 KB

_NAME = r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?"
_VERSION = r"[A-Za-z0-9][A-Za-z0-9.+!_-]*"
_HASH = re.compile(r"--hash=sha256:([0-9a-f]{64})")
_PIN = re.compile(rf"^({_NAME})==({_VERSION})$")
_INPUT_HASH = re.compile(r"^sha256:[0-9a-f]{64}$")


class LockError(ValueError):
    """A lock file that cannot be used; `line` is 1-based (0 when it concerns the whole file)."""

    def __init__(self, message: str, line: int = 0) -> None:
        super().__init__(message)
        self.line = line


@dataclass(frozen=True)
class Requirement:
    name: str
    version: str
    hashes: tuple[str, ...]
    line: int

    @property
    def pin(self) -> str:
        return f"{self.name}=={self.version}"


@dataclass(frozen=True)
class Lock:
    input_hash: str
    resolved_for: str
    requirements: tuple[Requirement, ...]
    sha256: str

    def version_of(self, name: str) -> str | None:
        wanted = _normal(name)
        return next((r.version for r in self.requirements if _normal(r.name) == wanted), None)


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def lock_inputs(stack: Stack, python: str, platform: str) -> dict[str, object]:
    """Everything a lock's resolution depends on, as plain data."""
    return {
        "format": LOCK_FORMAT,
        "python": python,
        "platform": platform,
        "index": INDEX_URL,
        "requirements": stack.requirements(),
    }


def describe_inputs(stack: Stack, python: str, platform: str) -> str:
    """One human line naming the lock inputs (written in the header, shown when stale)."""
    return ", ".join([f"python {python}", platform, INDEX_URL, *stack.requirements()])


def lock_input_hash(stack: Stack, python: str, platform: str) -> str:
    """sha256 over the canonical JSON of lock_inputs: 'sha256:<hex>'."""
    canonical = json.dumps(lock_inputs(stack, python, platform), sort_keys=True,
                           separators=(",", ":"))  # fmt: skip
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


def lock_header(stack: Stack, python: str, platform: str) -> str:
    """The two header lines qlc puts above the resolver's output."""
    return (
        f"{INPUT_HEADER}{lock_input_hash(stack, python, platform)}\n"
        f"{FOR_HEADER}{describe_inputs(stack, python, platform)}\n"
    )


def lock_text(stack: Stack, python: str, platform: str, body: str) -> str:
    """A whole lock: the header, the sha256 of the resolver's output, then that output.

    The body digest lets `check_lock` refuse a lock cut at a line boundary, which otherwise
    still parses (a shorter list of valid pins)."""
    digest = hashlib.sha256(body.encode("utf-8")).hexdigest()
    return f"{lock_header(stack, python, platform)}{BODY_HEADER}sha256:{digest}\n{body}"


def _check_body(text: str, required: bool) -> None:
    """Verify the body's recorded sha256 (lock_text writes it); compile requires it."""
    start = 0
    for line in text.splitlines(keepends=True):
        start += len(line)
        if line.startswith(BODY_HEADER):
            recorded = line[len(BODY_HEADER) :].strip()
            actual = "sha256:" + hashlib.sha256(text[start:].encode("utf-8")).hexdigest()
            if recorded != actual:
                raise LockError(
                    "the lock's body does not match its recorded sha256 (truncated or edited "
                    "by hand?); run `qlc lock SPEC`",
                    max(1, len(text.splitlines())),
                )
            return
        if line.strip() and not line.startswith("#"):
            break
    if not required:
        return
    raise LockError(
        f"no '{BODY_HEADER.strip()}' line: the lock was not written by `qlc lock` (or its "
        "header was cut); run `qlc lock` on its spec",
        1,
    )


def _logical_lines(text: str) -> list[tuple[int, str]]:
    """Join backslash continuations; drop comments and blank lines. Keeps first line numbers."""
    joined: list[tuple[int, str]] = []
    pending: tuple[int, str] | None = None
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if line.startswith("#") or (not line and pending is None):
            continue
        line = re.sub(r"\s+#.*$", "", line)
        start, sofar = pending if pending else (number, "")
        if line.endswith("\\"):
            pending = (start, sofar + line[:-1] + " ")
            continue
        pending = None
        if (sofar + line).strip():
            joined.append((start, (sofar + line).strip()))
    if pending is not None:
        joined.append((pending[0], pending[1].strip()))
    return joined


def _requirement(number: int, line: str) -> Requirement:
    words = line.split()
    pin = _PIN.match(words[0])
    if pin is None or words[0].startswith("-"):
        raise LockError(
            f"line {number}: expected `name==version --hash=sha256:...`, got {words[0]!r} "
            "(a qlc lock pins every package exactly; regenerate it with `qlc lock SPEC`)",
            number,
        )
    hashes = []
    for word in words[1:]:
        found = _HASH.fullmatch(word)
        if found is None:
            raise LockError(
                f"line {number}: {pin.group(1)}: unexpected {word!r}; only --hash=sha256:<64 hex> "
                "may follow a pin",
                number,
            )
        hashes.append(found.group(1))
    if not hashes:
        raise LockError(f"line {number}: {pin.group(0)} has no --hash=sha256: entry", number)
    return Requirement(pin.group(1), pin.group(2), tuple(hashes), number)


def _header_value(text: str, prefix: str) -> str | None:
    for line in text.splitlines():
        if line.startswith(prefix):
            return line[len(prefix) :].strip()
        if line.strip() and not line.startswith("#"):
            return None
    return None


def parse_lock(text: str) -> Lock:
    """Parse and validate lock text. Raises LockError with the offending line number."""
    input_hash = _header_value(text, INPUT_HEADER)
    if input_hash is None:
        raise LockError(f"missing header `{INPUT_HEADER}sha256:...`: not a qlc lock; "
                        "run `qlc lock SPEC`", 1)  # fmt: skip
    if not _INPUT_HASH.match(input_hash):
        raise LockError(f"malformed lock input hash {input_hash!r}; run `qlc lock SPEC`", 1)
    _check_body(text, required=False)
    requirements: list[Requirement] = []
    seen: dict[str, int] = {}
    for number, line in _logical_lines(text):
        requirement = _requirement(number, line)
        key = _normal(requirement.name)
        if key in seen:
            raise LockError(f"line {number}: {requirement.name} is pinned twice "
                            f"(first on line {seen[key]})", number)  # fmt: skip
        seen[key] = number
        requirements.append(requirement)
    if not requirements:
        raise LockError("the lock pins no packages; run `qlc lock SPEC`", 1)
    return Lock(
        input_hash=input_hash,
        resolved_for=_header_value(text, FOR_HEADER) or "(not recorded)",
        requirements=tuple(requirements),
        sha256=hashlib.sha256(text.encode("utf-8")).hexdigest(),
    )


def check_lock(
    lock_bytes: bytes,
    expected_input_hash: str,
    *,
    expected_for: str = "",
    spec_name: str = "SPEC",
    required: Sequence[str] = (),
) -> Lock:
    """Parse a lock and check it was resolved for what the plan needs now.

    `required` lists `name==version` pins (the plan's top-level requirements) that the lock
    must hold exactly: a truncated or hand-trimmed lock keeps its header hash, so the header
    alone cannot tell that packages went missing.
    """
    try:
        text = lock_bytes.decode("utf-8")
    except UnicodeDecodeError as err:
        raise LockError(f"the lock is not UTF-8 text ({err.reason}); run `qlc lock {spec_name}`",
                        1) from None  # fmt: skip
    lock = parse_lock(text)
    _check_body(text, required=True)
    if lock.input_hash != expected_input_hash:
        now = expected_for or expected_input_hash
        raise LockError(
            f"stale: resolved for {lock.resolved_for} ({lock.input_hash}), the spec now needs "
            f"{now}; run `qlc lock {spec_name}`",
            1,
        )
    _check_required(lock, required, text, spec_name)
    sha256 = hashlib.sha256(lock_bytes).hexdigest()
    return Lock(lock.input_hash, lock.resolved_for, lock.requirements, sha256)


def _check_required(lock: Lock, required: Sequence[str], text: str, spec_name: str) -> None:
    for pin in required:
        name, _, version = pin.partition("==")
        found = lock.version_of(name)
        if found != version:
            what = "does not pin" if found is None else f"pins {name}=={found}, not"
            raise LockError(
                f"the lock {what} {pin} (truncated or edited by hand?); run `qlc lock {spec_name}`",
                max(1, len(text.splitlines())),
            )
