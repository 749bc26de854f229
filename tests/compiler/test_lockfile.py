"""The lock format: header, pins with hashes, staleness."""

from __future__ import annotations

from pathlib import Path

import pytest

from qlc.compiler.lockfile import (
    PLATFORM,
    LockError,
    check_lock,
    describe_inputs,
    lock_input_hash,
    lock_text,
    parse_lock,
)
from qlc.compiler.plan import Stack

SPECS = Path(__file__).resolve().parents[2] / "specs"
STACK = Stack(
    python="3.12", torch="2.13.0", cuda="13.0", transformers="5.24.0", peft="0.21.2",
    trl="1.16.0", bitsandbytes="0.50.2", accelerate="1.15.0", datasets="5.2.0",
)  # fmt: skip
H1, H2 = "a" * 64, "b" * 64
BODY = (
    f"accelerate==1.15.0 \\\n    --hash=sha256:{H1} \\\n    --hash=sha256:{H2}\n"
    "    # via\n    #   peft\n"
    f"torch==2.13.0 \\\n    --hash=sha256:{H1}\n    # via -r -\n"
)


def lock_for(stack: Stack = STACK, body: str = BODY) -> str:
    return lock_text(stack, stack.python, PLATFORM, body)


def test_input_hash_is_stable_and_covers_each_input() -> None:
    base = lock_input_hash(STACK, "3.12", PLATFORM)
    assert base == lock_input_hash(STACK, "3.12", PLATFORM)
    assert base.startswith("sha256:") and len(base) == 71
    others = {
        lock_input_hash(STACK, "3.11", PLATFORM),
        lock_input_hash(STACK, "3.12", "aarch64-manylinux_2_28"),
        lock_input_hash(STACK.model_copy(update={"peft": "0.21.3"}), "3.12", PLATFORM),
    }
    assert base not in others and len(others) == 3


def test_input_hash_ignores_what_resolution_does_not_depend_on() -> None:
    # CUDA is implied by the torch pin; it is not a resolver input.
    other = STACK.model_copy(update={"cuda": "12.8"})
    assert lock_input_hash(other, "3.12", PLATFORM) == lock_input_hash(STACK, "3.12", PLATFORM)


def test_parse_lock_reads_pins_hashes_and_header() -> None:
    lock = parse_lock(lock_for())
    assert [r.pin for r in lock.requirements] == ["accelerate==1.15.0", "torch==2.13.0"]
    assert lock.requirements[0].hashes == (H1, H2)
    assert lock.requirements[1].line == 9  # after three header lines
    assert lock.input_hash == lock_input_hash(STACK, "3.12", PLATFORM)
    assert lock.resolved_for == describe_inputs(STACK, "3.12", PLATFORM)
    assert lock.version_of("Accelerate") == "1.15.0" and lock.version_of("nope") is None


@pytest.mark.parametrize(
    ("body", "line", "fragment"),
    [
        ("torch>=2.13 \\\n    --hash=sha256:" + H1 + "\n", 4, "expected `name==version"),
        ("torch==2.13.0\n", 4, "torch==2.13.0 has no --hash=sha256"),
        ("torch==2.13.0 --hash=md5:abc\n", 4, "unexpected '--hash=md5:abc'"),
        ("torch==2.13.0 --hash=sha256:abc\n", 4, "only --hash=sha256:<64 hex>"),
        ("--extra-index-url https://evil.example\n", 4, "expected `name==version"),
        ("-e .\n", 4, "expected `name==version"),
        (f"a==1 --hash=sha256:{H1}\n\nA==2 --hash=sha256:{H1}\n", 6, "pinned twice"),
        ("# nothing\n", 1, "pins no packages"),
    ],
)
def test_malformed_locks_name_the_line(body: str, line: int, fragment: str) -> None:
    with pytest.raises(LockError) as caught:
        parse_lock(lock_for(body=body))
    assert caught.value.line == line
    assert fragment in str(caught.value)
    assert f"line {line}:" in str(caught.value) or line == 1


def test_lock_without_header_is_rejected() -> None:
    with pytest.raises(LockError, match="missing header `# qlc-lock-input"):
        parse_lock(BODY)
    with pytest.raises(LockError, match="malformed lock input hash"):
        parse_lock("# qlc-lock-input: sha256:xyz\n" + BODY)


def test_check_lock_accepts_fresh_and_rejects_stale() -> None:
    data = lock_for().encode()
    expected = lock_input_hash(STACK, "3.12", PLATFORM)
    assert check_lock(data, expected).requirements[0].name == "accelerate"
    newer = STACK.model_copy(update={"trl": "1.17.0"})
    wanted = describe_inputs(newer, "3.12", PLATFORM)
    with pytest.raises(LockError) as caught:
        check_lock(data, lock_input_hash(newer, "3.12", PLATFORM), expected_for=wanted,
                   spec_name="specs/x.toml")  # fmt: skip
    message = str(caught.value)
    assert message.startswith("stale: resolved for python 3.12")
    assert "trl==1.16.0" in message and "the spec now needs" in message and "trl==1.17.0" in message
    assert message.endswith("run `qlc lock specs/x.toml`")


def test_check_lock_rejects_binary() -> None:
    with pytest.raises(LockError, match="not UTF-8"):
        check_lock(b"\xff\xfe\x00", "sha256:" + H1)


@pytest.mark.parametrize("path", sorted(SPECS.glob("*.lock")), ids=lambda p: p.name)
def test_committed_locks_parse_and_pin_the_stack(path: Path) -> None:
    lock = parse_lock(path.read_text(encoding="utf-8"))
    for requirement in STACK.requirements():
        name, version = requirement.split("==")
        assert lock.version_of(name) == version, f"{path.name}: {name}"
    assert all(r.hashes for r in lock.requirements)


@pytest.mark.parametrize("path", sorted(SPECS.glob("*.lock")), ids=lambda p: p.name)
def test_committed_locks_are_fresh_for_their_specs(path: Path) -> None:
    # A stack change in the compatibility table must come with `qlc lock` for every spec.
    from qlc.compiler.load import load_spec
    from qlc.compiler.resolve import resolve

    spec_path = path.with_suffix(".toml")
    spec, _ = load_spec(spec_path.read_bytes(), spec_path.name)
    plan = resolve(spec, spec_name=spec_path.name, spec_sha256="0" * 64, qlc_version="0",
                   lock=None)  # fmt: skip
    python = plan.stack.python
    check_lock(path.read_bytes(), lock_input_hash(plan.stack, python, PLATFORM),
               expected_for=describe_inputs(plan.stack, python, PLATFORM),
               spec_name=str(spec_path))  # fmt: skip
