"""Input files: every file the CLI reads because a person named it (a spec, the lock beside it,
a prompts file, a run or its manifest, the model config a spec points at) is given as a FIFO,
/dev/zero, a directory, a missing file and a file that cannot be read.

The contract: the command returns (a FIFO must not block it, /dev/zero must not be read
whole), exits 2 (explain's optional model config: 0, the estimate left out) with one message
that names the file, never a traceback; where the file is read through qlc's reader, the
message says what is wrong with it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from reliability_support import invoke, scratch_cwd, tiny_project

KINDS = ["fifo", "dev-zero", "directory", "missing", "unreadable"]
REASONS = {
    "fifo": ("named pipe",),
    "dev-zero": ("character device",),
    "directory": ("directory",),
    "missing": ("no such file",),
    "unreadable": ("input/output error", "permission denied"),
}
IMAGE = "registry.example/qlc/tiny@sha256:" + "0" * 64
SECONDS = 60  # a command that takes longer is taken to be blocked


def bad_file(path: Path, kind: str) -> Path:
    """Make `path` the given kind of unusable input."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "dev-zero":
        path.symlink_to("/dev/zero")
    elif kind == "directory":
        path.mkdir()
        (path / "inside.txt").write_text("x\n")
    elif kind == "unreadable":
        if os.geteuid() == 0:  # root reads any mode: a regular file whose reads fail (EIO)
            path.symlink_to("/proc/self/mem")
        else:
            path.write_text("x\n")
            path.chmod(0)
    return path


# Where each command reads a file the person named: argv with the file in place, the file's
# suffix, and whether qlc's own reader reads it (so its message says what is wrong).
Case = tuple[Callable[[str], list[str]], str, bool]
CASES: dict[str, Case] = {
    "validate SPEC": (lambda p: ["validate", p], ".toml", True),
    "explain SPEC": (lambda p: ["explain", p], ".toml", True),
    "compile SPEC": (lambda p: ["compile", p, "-o", "ctx"], ".toml", True),
    "lock SPEC": (lambda p: ["lock", p], ".toml", True),
    "build SPEC": (lambda p: ["build", p, "--base-image", "qlc-base:bookworm"], ".toml", True),
    "run SPEC": (lambda p: ["run", p], ".toml", False),
    "run --local SPEC": (lambda p: ["run", p, "--local"], ".toml", False),
    "push SPEC": (lambda p: ["push", p, "--registry", "127.0.0.1:1/qlc"], ".toml", True),
    "export SPEC": (
        lambda p: ["export", p, "--target", "kubernetes", "--image", IMAGE, "-o", "exp"],
        ".toml",
        True,
    ),
    "generate --prompts FILE": (
        lambda p: ["generate", "runs/none", "--prompts", p],
        ".txt",
        True,
    ),
    "generate RUN": (lambda p: ["generate", p, "--prompt", "hi"], ".json", False),
    "merge RUN": (lambda p: ["merge", p, "-o", "merged"], ".json", False),
    "reproduce MANIFEST": (lambda p: ["reproduce", p], ".json", False),
    "data SPEC": (lambda p: ["data", p], ".toml", True),
    "init --data FILE": (lambda p: ["init", "--data", p, "-o", "new.toml"], ".jsonl", False),
    "publish RUN": (
        lambda p: ["publish", p, "--to", "oci:127.0.0.1:1/qlc/tiny", "--dry-run"],
        ".json",
        False,
    ),
}
# Commands with parameters that name no file to read, and where their paths are tested.
NO_INPUT_FILE = {"pull": "a registry reference and a new -o folder (test_output_paths)"}
# Commands that read the lock beside the spec.
LOCK_READERS: dict[str, Callable[[str], list[str]]] = {
    "compile": lambda p: ["compile", p, "-o", "ctx"],
    "build": lambda p: ["build", p, "--base-image", "qlc-base:bookworm"],
    "export": lambda p: ["export", p, "--target", "skypilot", "--image", IMAGE, "-o", "exp"],
}


def test_the_table_names_every_command_that_reads_a_file(tally) -> None:
    """Every command with a path argument or option is in CASES (new ones must be added)."""
    import typer

    from qlc import cli

    tally()
    group = typer.main.get_command(cli.app)
    reading = {name for name, command in group.commands.items() if command.params}  # type: ignore[attr-defined]
    assert reading == {label.split()[0] for label in CASES} | set(NO_INPUT_FILE)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    root = tmp_path / "project"
    tiny_project(root)
    return root


def assert_refused(code: int, output: str, path: Path, reasons: tuple[str, ...] | None) -> None:
    """Exit 2, no traceback, the file named (as given, or where its link leads), the reason."""
    assert code == 2, (code, output)
    assert "Traceback" not in output, output
    names = (path.name, os.path.realpath(path))
    assert any(name in output for name in names), f"the message names neither of {names}: {output}"
    if reasons is not None:
        assert any(reason in output.lower() for reason in reasons), (reasons, output)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_an_unusable_input_file_is_named_never_waited_on(
    case: str, kind: str, project: Path, tally
) -> None:
    tally()
    argv, suffix, ours = CASES[case]
    name = f"{kind}{suffix}"
    bad_file(project / name, kind)
    with scratch_cwd(project):
        code, stdout, stderr = invoke(argv(name), seconds=SECONDS)
    assert_refused(code, stdout + stderr, project / name, REASONS[kind] if ours else None)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reader", sorted(LOCK_READERS))
def test_an_unusable_lock_beside_the_spec_is_named(
    reader: str, kind: str, project: Path, tally
) -> None:
    tally()
    folder = project / f"lock-{kind}"
    tiny_project(folder)
    (folder / "tiny.lock").unlink()
    bad_file(folder / "tiny.lock", kind)
    reasons = ("no lock file",) if kind == "missing" else REASONS[kind]
    with scratch_cwd(project):
        code, stdout, stderr = invoke(LOCK_READERS[reader](f"{folder.name}/tiny.toml"), SECONDS)
    assert_refused(code, stdout + stderr, folder / "tiny.lock", reasons)


@pytest.mark.parametrize("kind", KINDS)
def test_an_unusable_model_config_leaves_the_estimate_out(kind: str, project: Path, tally) -> None:
    """explain reads model.path/config.json for the memory estimate: when it cannot, it says
    why and explains the rest (exit 0), as when there is no config at all."""
    tally()
    config = project / "tiny" / "model" / "config.json"
    config.unlink()
    bad_file(config, kind)
    with scratch_cwd(project):
        code, stdout, stderr = invoke(["explain", "tiny.toml"], seconds=SECONDS)
    assert code == 0 and "Traceback" not in stderr, (code, stderr)
    if kind != "missing":
        assert "config.json: cannot read the model config" in stdout, stdout[-2000:]
        assert any(reason in stdout for reason in REASONS[kind]), stdout[-2000:]
