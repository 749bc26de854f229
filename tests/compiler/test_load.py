"""The spec loader: every problem at once, FILE:LINE:COL: key: message, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from qlc.compiler.load import SpecError, load_spec, load_spec_file

ROOT = Path(__file__).resolve().parents[2]
ERRORS = ROOT / "tests" / "golden" / "errors"
CASES = sorted(p.name for p in ERRORS.iterdir() if p.is_dir())
UPDATE = os.environ.get("QLC_UPDATE_GOLDEN") == "1"


def qlc(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "qlc", *args], cwd=cwd, capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize("case", CASES)
def test_error_golden(case: str) -> None:
    """Each bad spec produces exactly its recorded message, exit 2, and no traceback."""
    spec = f"tests/golden/errors/{case}/spec.toml"
    result = qlc("validate", spec)
    expected = ERRORS / case / "expected.txt"
    if UPDATE:
        expected.write_text(result.stderr)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert result.stderr == expected.read_text()
    for line in result.stderr.splitlines():
        assert line.startswith(f"{spec}:"), line


def test_every_level_has_an_unknown_key_case() -> None:
    levels = {"top", "job", "model", "data", "quantization", "lora", "train", "runtime"}
    assert {f"unknown-{level}" for level in levels} <= set(CASES)


def test_unknown_key_names_line_and_suggestion() -> None:
    message = (ERRORS / "unknown-train" / "expected.txt").read_text()
    assert ':18:1: train.lr_schedular: unknown key; did you mean "lr_scheduler"?' in message


@pytest.mark.parametrize("key", ["[", "a[b]", "]["])
def test_unknown_key_with_brackets_is_named(key: str) -> None:
    # Found by the fuzz test: a key with '[' was taken for a pydantic tag and dropped, and
    # naming the unknown key then raised IndexError.
    source = f'"{key}" = 1\n'.encode() + (ROOT / "specs" / "guanaco.toml").read_bytes()
    with pytest.raises(SpecError) as caught:
        load_spec(source, "bracket.toml")
    assert f'bracket.toml:1:1: "{key}": unknown key' in str(caught.value)


def test_several_problems_reported_at_once() -> None:
    lines = (ERRORS / "several-at-once" / "expected.txt").read_text().splitlines()
    assert [line.split(": ")[1] for line in lines] == [
        "lora.r",
        "runtime.gpus",
        "runtime.secrets[0]",
    ]


def test_ten_megabyte_file(tmp_path: Path) -> None:
    spec = tmp_path / "huge.toml"
    spec.write_bytes(b"# padding\n" * 1_000_000)
    result = qlc("validate", str(spec))
    assert result.returncode == 2
    assert result.stderr == f"{spec}:1:1: spec is 10.0 MB; specs are at most 1 MiB\n"


def test_deeply_nested_tables(tmp_path: Path) -> None:
    spec = tmp_path / "deep.toml"
    spec.write_text("[" + ".".join(f"t{i}" for i in range(5000)) + "]\nx = 1\n")
    result = qlc("validate", str(spec))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"{spec}:1:1: t0: unknown key" in result.stderr


def test_deeply_nested_arrays() -> None:
    with pytest.raises(SpecError) as raised:
        load_spec(b"a = " + b"[" * 50_000 + b"]" * 50_000, "deep.toml")
    assert str(raised.value) == "deep.toml:1:1: TOML nested too deeply"


def test_missing_file_is_a_user_error(tmp_path: Path) -> None:
    result = qlc("validate", str(tmp_path / "absent.toml"))
    assert result.returncode == 2
    assert (
        result.stderr
        == f"{tmp_path / 'absent.toml'}:1:1: cannot read the spec: no such file or directory\n"
    )


@pytest.mark.parametrize("spec", sorted(p.name for p in (ROOT / "specs").glob("*.toml")))
def test_shipped_specs_validate(spec: str) -> None:
    load_spec_file(ROOT / "specs" / spec)
    assert qlc("validate", f"specs/{spec}").returncode == 0


def test_validate_all_shipped_specs_at_once() -> None:
    specs = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "specs").glob("*.toml"))
    result = qlc("validate", *specs)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [f"{s}: ok" for s in specs]


def test_warnings_do_not_fail(tmp_path: Path) -> None:
    source = (ERRORS.parent / "errors" / "out-of-range" / "spec.toml").read_text()
    spec = tmp_path / "warn.toml"
    spec.write_text(source.replace("r = 0", "r = 1").replace('revision = "main"\n', ""))
    result = qlc("validate", str(spec))
    assert result.returncode == 0, result.stderr
    assert f"warning: {spec}:5:1: model.id: no 'revision'" in result.stderr
    assert "lora.alpha: LoRA scale alpha/r = 32 is unusual" in result.stderr
