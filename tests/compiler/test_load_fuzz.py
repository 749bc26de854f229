"""Property tests: no input, however mangled, makes the loader raise anything but SpecError."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qlc.compiler.load import SpecError, load_spec

ROOT = Path(__file__).resolve().parents[2]
GUANACO = (ROOT / "specs" / "guanaco.toml").read_text()
LINES = GUANACO.splitlines()
DIAGNOSTIC = re.compile(r"^fuzz\.toml:\d+:\d+: (?:[A-Za-z0-9_.\[\]-]+: )?\S.*$")

toml_values = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(lambda f: repr(f).replace("inf", "inf")),
    st.booleans().map(lambda b: str(b).lower()),
    st.text(max_size=20).map(lambda s: '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'),
    st.just("[]"),
    st.just("{}"),
    st.just('["a", 1]'),
    st.just("1979-05-27T07:32:00Z"),
    st.text(max_size=10),
)


def json_key(text: str) -> str:
    """A TOML quoted key holding any text (JSON string escapes are valid TOML basic strings)."""
    return json.dumps(text).replace("\\/", "/")


@st.composite
def mutated_specs(draw: st.DrawFn) -> str:
    lines = list(LINES)
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        index = draw(st.integers(min_value=0, max_value=len(lines) - 1))
        action = draw(st.sampled_from(["drop", "dup", "value", "key", "chars", "header", "quoted"]))
        line = lines[index]
        if action == "drop":
            del lines[index]
        elif action == "dup":
            lines.insert(index, line)
        elif action == "value" and "=" in line:
            lines[index] = line.split("=", 1)[0] + "= " + draw(toml_values)
        elif action == "key" and "=" in line:
            key = draw(st.from_regex(r"[a-z_]{1,12}", fullmatch=True))
            lines[index] = key + " =" + line.split("=", 1)[1]
        elif action == "quoted":
            lines.insert(index, json_key(draw(st.text(max_size=8))) + " = 1")
        elif action == "header":
            lines.insert(index, "[" + draw(st.from_regex(r"[a-z_.]{1,20}", fullmatch=True)) + "]")
        else:
            lines[index] = line + draw(st.text(max_size=5))
        if not lines:
            break
    return "\n".join(lines) + "\n"


def check(source: bytes) -> None:
    try:
        load_spec(source, "fuzz.toml")
    except SpecError as error:
        assert error.diagnostics, "a SpecError always carries diagnostics"
        for line in str(error).splitlines():
            assert DIAGNOSTIC.match(line), line


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_specs())
def test_mutated_guanaco_spec_never_tracebacks(source: str) -> None:
    check(source.encode("utf-8", "surrogatepass"))


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_traceback(source: bytes) -> None:
    check(source)


def test_cli_exit_codes_are_zero_or_two(tmp_path: Path) -> None:
    """Through the real CLI: a sample of mutations exits 0 or 2, never with a traceback."""
    samples = [
        GUANACO,
        GUANACO.replace("r = 64", "r = 64.5"),
        GUANACO.replace("[lora]", "[lora.extra]"),
        GUANACO.replace("batch_size = 4", "batch_size = 4\nbatch_size = 5"),
        GUANACO + "\n\x07",
        GUANACO.replace('"nf4"', "nf4"),
    ]
    for number, text in enumerate(samples):
        spec = tmp_path / f"s{number}.toml"
        spec.write_text(text)
        result = subprocess.run(
            [sys.executable, "-m", "qlc", "validate", str(spec)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode in (0, 2), result.stderr
        assert "Traceback" not in result.stderr
