"""Echoed input: a message that repeats what a person wrote (a key, a value, an option, a path)
shows at most its start, an ellipsis and its length, however long it was.

Every spec position a key or a string can take gets 900 KB, and every text-valued argument and
option of every command gets 100 KB; the output must hold no long run of it, no traceback,
and exit 0, 1 or 2.
"""

from __future__ import annotations

import typing
from pathlib import Path

import pytest
import typer
from injection_fields import free_string_fields, spec_with, toml_string
from reliability_support import TINY_SPEC, invoke, scratch_cwd, tiny_project

from qlc import cli

SPEC_VALUE = "Z" * 900_000
OPTION_VALUE = "Z" * 100_000
LONGEST_ECHO = 1_000  # characters of the value a message may repeat
IMAGE = "registry.example/qlc/tiny@sha256:" + "0" * 64


def assert_clipped(code: int, stdout: str, stderr: str) -> None:
    output = stdout + stderr
    assert "Traceback" not in output, output[-3000:]
    assert code in (0, 1, 2), (code, output[-3000:])
    assert "Z" * LONGEST_ECHO not in output, f"the value was echoed whole ({len(output):,} chars)"


# ---------------------------------------------------------------------------------------------
# The spec: keys and values.


def spec_texts() -> dict[str, str]:
    tiny = TINY_SPEC.read_text()
    key = SPEC_VALUE
    spaced = " ".join("Z" * 50 for _ in range(len(SPEC_VALUE) // 51))
    return {
        "key at the top": f"{key} = 1\n{tiny}",
        "key in a section": tiny.replace("[job]\n", f"[job]\n{key} = 1\n", 1),
        "key in a table of strings": f'{tiny}\n[runtime.env]\nQLC_{key} = "1"\n',
        "quoted key with spaces": tiny.replace("[job]\n", f"[job]\n{toml_string(spaced)} = 1\n"),
        "section name": f"{tiny}\n[{key}]\nx = 1\n",
        "target_modules string": tiny.replace(
            'target_modules = "all-linear"', f"target_modules = {toml_string(spaced)}"
        ),
        "target_modules item": tiny.replace(
            'target_modules = "all-linear"', f"target_modules = [{toml_string(key)}]"
        ),
    }


@pytest.mark.parametrize("case", sorted(spec_texts()))
def test_a_huge_key_or_value_is_clipped_in_the_diagnostic(case: str, tmp_path: Path, tally) -> None:
    tally()
    spec = tmp_path / "t.toml"
    spec.write_text(spec_texts()[case])
    code, stdout, stderr = invoke(["validate", str(spec)])
    assert code == 2, stderr[:2000]
    assert_clipped(code, stdout, stderr)
    assert "characters)" in stderr, stderr[:2000]  # the length is given


@pytest.mark.parametrize("field", free_string_fields(), ids=lambda f: f"{f.key}-{f.shape}")
def test_every_string_field_with_900_kb_is_clipped(field, tmp_path: Path, tally) -> None:  # type: ignore[no-untyped-def]
    tally()
    spec = tmp_path / "t.toml"
    spec.write_bytes(spec_with(field, SPEC_VALUE))
    assert_clipped(*invoke(["validate", str(spec)]))


# ---------------------------------------------------------------------------------------------
# The command line: every argument and option that takes text.

BASE: dict[str, dict[str, str]] = {  # a command line that gets as far as it can without them
    "validate": {"specs": "tiny.toml"},
    "explain": {"spec": "tiny.toml"},
    "compile": {"spec": "tiny.toml", "output": "ctx"},
    "lock": {"spec": "tiny.toml"},
    "generate": {"run": "runs/none", "prompt": "hi"},
    "merge": {"run": "runs/none", "output": "merged"},
    "build": {"spec": "tiny.toml"},
    "run": {"target": "tiny.toml"},
    "reproduce": {"manifest": "runs/none/manifest.json"},
    "push": {"target": "tiny.toml", "registry": "127.0.0.1:1/qlc"},
    "data": {"spec": "tiny.toml"},
    "init": {"output": "new.toml"},
    "publish": {"run": "runs/none", "to": "oci:127.0.0.1:1/qlc/tiny"},
    "pull": {"reference": "127.0.0.1:1/qlc/tiny@sha256:" + "0" * 64, "output": "pulled"},
    "export": {
        "spec": "tiny.toml",
        "target": "kubernetes",
        "image": IMAGE,
        "volume": "runs",
        "output": "exp",
    },
}
SKIPPED = {  # (command, parameter): why the value is not tried here
    ("build", "base_image"): "the value reaches the Docker daemon as a build argument",
    ("run", "base_image"): "the value reaches the Docker daemon as a build argument",
}


def text_parameters() -> list[tuple[str, str]]:
    """(command, parameter) for every parameter that is not a flag, from the commands' types."""
    found = []
    for command in cli.app.registered_commands:
        assert command.callback is not None
        name = command.name or command.callback.__name__
        for parameter, hint in typing.get_type_hints(command.callback).items():
            if parameter != "return" and hint is not bool:
                found.append((name, parameter))
    return found


def argv_with(command: str, parameter: str, value: str) -> list[str]:
    click_command = typer.main.get_command(cli.app).commands[command]  # type: ignore[attr-defined]
    values = {**BASE.get(command, {}), parameter: value}
    argv = [command]
    for param in click_command.params:
        if param.name not in values:
            continue
        if param.param_type_name == "argument":
            argv.append(values[param.name])
        else:
            argv += [param.opts[-1], values[param.name]]
    return argv


def test_every_command_with_text_parameters_has_a_base_line(tally) -> None:
    tally()
    assert {command for command, _ in text_parameters()} <= set(BASE)


@pytest.mark.parametrize("command, parameter", text_parameters())
def test_a_huge_argument_or_option_is_clipped(
    command: str, parameter: str, tmp_path: Path, tally
) -> None:
    if (command, parameter) in SKIPPED:
        pytest.skip(SKIPPED[(command, parameter)])
    tally()
    project = tmp_path / "project"
    tiny_project(project)
    with scratch_cwd(project):
        assert_clipped(*invoke(argv_with(command, parameter, OPTION_VALUE)))


@pytest.mark.parametrize(
    "argv",
    [[OPTION_VALUE], ["validate", f"--{OPTION_VALUE}"], ["explain", "tiny.toml", OPTION_VALUE]],
    ids=["unknown command", "unknown option", "extra argument"],
)
def test_a_usage_error_is_clipped(argv: list[str], tmp_path: Path, tally) -> None:
    """typer's own messages repeat the unknown command or option; qlc's group clips them."""
    tally()
    with scratch_cwd(tmp_path):
        code, stdout, stderr = invoke(argv)
    assert code == 2
    assert_clipped(code, stdout, stderr)
