"""Output paths: every place the CLI writes (compile -o, merge -o, export -o for each target,
the lock beside a spec) meets a place that holds a person's own files, and places it cannot
write at all (under a file, inside /proc, a name too long, a read-only folder).

The contract: nothing the person had is deleted, replaced or added to; the command exits 2 with
one message that names the path and what to do, never a traceback.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from reliability_support import hash_tree, invoke, scratch_cwd, tiny_project

IMAGE = "registry.example/qlc/tiny@sha256:" + "0" * 64
EXPORTS = {  # target -> (the spec whose output_dir it can mount, its other arguments, its files)
    "kubernetes": ("hub.toml", ["--volume", "qlc-runs"], ["job.yaml"]),
    "aws-batch": (
        "hub.toml",
        ["--volume", "fs-0123456789abcdef0", "--efs-access-point", "fsap-0123456789abcdef0"],
        ["job-definition.json"],
    ),
    "gcp-batch": ("gs.toml", ["--project", "qlc-test-project"], ["job.json"]),
    "skypilot": ("gs.toml", [], ["task.yaml"]),
}


def compile_to(target: str) -> list[str]:
    return ["compile", "tiny.toml", "-o", target]


def merge_to(target: str) -> list[str]:
    return ["merge", "runs/none", "-o", target]  # the output is checked before the run


def export_to(kind: str) -> Callable[[str], list[str]]:
    spec, extra = EXPORTS[kind][:2]
    return lambda target: ["export", spec, "--target", kind, "--image", IMAGE, *extra, "-o", target]


def pull_to(target: str) -> list[str]:
    return ["pull", "oci:127.0.0.1:1/qlc/tiny@sha256:" + "0" * 64, "-o", target]  # no registry


# Each writer: how to point it at a folder, and the names it writes there (what a person's
# files are named in the cases below, so a careless writer would replace them).
WRITERS: dict[str, tuple[Callable[[str], list[str]], list[str]]] = {
    "compile -o": (
        compile_to,
        ["Dockerfile", "train.py", "spec.toml", "plan.json", "requirements.lock"],
    ),
    "merge -o": (merge_to, ["config.json", "model.safetensors", "merge.json"]),
    "pull -o": (pull_to, ["manifest.json", "adapter/adapter_model.safetensors"]),
    "init -o": (lambda target: ["init", "-o", target], []),  # a file: any existing path stops it
    **{f"export --target {k} -o": (export_to(k), files) for k, (*_, files) in EXPORTS.items()},
}


def test_the_table_names_every_command_that_takes_an_output_option(tally) -> None:
    """A new command with -o must be added above (and so be checked)."""
    import typer

    from qlc import cli

    tally()
    group = typer.main.get_command(cli.app)
    with_output = {
        name
        for name, command in group.commands.items()  # type: ignore[attr-defined]
        if any("-o" in p.opts for p in command.params)
    }
    assert with_output == {label.split()[0] for label in WRITERS}


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """The tiny spec; hub.toml: the same reading the hub (an exported job cannot read local
    inputs); gs.toml: that with its runs in a bucket (for targets that cannot mount a volume)."""
    root = tmp_path / "project"
    spec = tiny_project(root)
    hub = spec.read_text().replace('path = "tiny/model"', 'id = "org/tiny-model"')
    hub = hub.replace('path = "tiny/data.jsonl"', 'id = "org/tiny-data"')
    (root / "hub.toml").write_text(hub)
    text = hub.replace("seed = 42\n", 'seed = 42\noutput_dir = "gs://qlc-test/runs"\n')
    (root / "gs.toml").write_text(text)
    for name in ("hub", "gs"):
        shutil.copy(root / "tiny.lock", root / f"{name}.lock")
    return root


def persons_folder(folder: Path, names: list[str], marker: bool) -> dict[str, str]:
    """A folder of a person's own files, some named like the writer's; its hashes."""
    folder.mkdir(parents=True)
    for name in [*names, "notes.txt", "data/keep.jsonl"]:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(f"the person's own {name}\n")
    if marker:  # looks like a context qlc wrote, but holds files qlc did not write
        (folder / ".qlc-context").write_text("sha256:" + "0" * 64 + "\n")
    return hash_tree(folder)


def listing(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")}


def assert_refused(code: int, stderr: str, shown: str) -> None:
    assert code == 2, (code, stderr)
    assert "Traceback" not in stderr, stderr
    assert shown in stderr, f"the message does not name {shown}: {stderr}"
    assert len(stderr.strip().splitlines()) == 1, stderr


@pytest.mark.parametrize("marker", [False, True], ids=["plain", "with-a-marker"])
@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_a_folder_of_the_persons_files_is_left_alone(
    writer: str, marker: bool, project: Path, tally
) -> None:
    tally()
    argv, names = WRITERS[writer]
    before = persons_folder(project / "mine", names, marker)
    around = listing(project)
    with scratch_cwd(project):
        code, _, stderr = invoke(argv("mine"))
    assert_refused(code, stderr, "mine")
    assert hash_tree(project / "mine") == before, "a file of the person's changed"
    assert listing(project) == around, "something was added or left behind"


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_a_link_to_the_persons_folder_is_left_alone(writer: str, project: Path, tally) -> None:
    tally()
    argv, names = WRITERS[writer]
    before = persons_folder(project / "mine", names, marker=False)
    (project / "link").symlink_to(project / "mine")
    with scratch_cwd(project):
        code, _, stderr = invoke(argv("link"))
    assert_refused(code, stderr, "link")
    assert hash_tree(project / "mine") == before


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_a_file_where_the_folder_goes_is_left_alone(writer: str, project: Path, tally) -> None:
    tally()
    argv, _ = WRITERS[writer]
    (project / "notes").write_text("the person's notes\n")
    with scratch_cwd(project):
        code, _, stderr = invoke(argv("notes"))
    assert_refused(code, stderr, "notes")
    assert (project / "notes").read_text() == "the person's notes\n"


def test_compile_replaces_its_own_context_and_nothing_else(project: Path, tally) -> None:
    """The one replacement allowed: a folder qlc wrote (marker + its files only)."""
    tally()
    with scratch_cwd(project):
        assert invoke(compile_to("ctx"))[0] == 0
        (project / "ctx" / "train.py").write_text("edited\n")
        code, _, stderr = invoke(compile_to("ctx"))
    assert code == 0, stderr
    assert (project / "ctx" / "train.py").read_text() != "edited\n"
    assert {p.name for p in project.iterdir() if p.name.startswith(".qlc-")} == set()


# ---------------------------------------------------------------------------------------------
# The lock beside a spec: `qlc lock` replaces a lock qlc wrote, nothing else, and says so before
# it spends minutes resolving.


@pytest.mark.parametrize("kind", ["foreign-file", "folder", "link-to-foreign-file"])
def test_lock_leaves_a_file_it_did_not_write(kind: str, project: Path, tally) -> None:
    tally()
    lock = project / "tiny.lock"
    lock.unlink()
    other = project / "requirements-mine.txt"
    other.write_text("numpy==2.0\n")
    if kind == "foreign-file":
        lock.write_text("numpy==2.0\n")
    elif kind == "folder":
        persons_folder(lock, ["requirements.txt"], marker=False)
    else:
        lock.symlink_to(other)
    before = hash_tree(project)
    with scratch_cwd(project):
        code, _, stderr = invoke(["lock", "tiny.toml"])
    assert_refused(code, stderr, "tiny.lock")
    assert hash_tree(project) == before


# ---------------------------------------------------------------------------------------------
# Places nothing can be written.


def make_read_only(folder: Path) -> Callable[[], None]:
    """Make `folder` unwritable for this process: mode 555, or as root (which ignores modes)
    the immutable attribute; skip the test where neither holds. Returns the undo."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return lambda: folder.chmod(0o755)
    if shutil.which("chattr") is None:
        pytest.skip("running as root without chattr: no read-only folder to test with")
    subprocess.run(["chattr", "+i", str(folder)], capture_output=True, check=False)
    return lambda: subprocess.run(["chattr", "-i", str(folder)], capture_output=True, check=False)


def assert_unwritable(folder: Path) -> None:
    try:
        (folder / "probe").mkdir()
    except OSError:
        return
    pytest.skip(f"this file system lets {folder} be written whatever its mode or attributes")


@pytest.fixture
def read_only_dir(tmp_path: Path) -> Iterator[Path]:
    folder = tmp_path / "read-only"
    folder.mkdir()
    undo = make_read_only(folder)
    try:
        assert_unwritable(folder)
        yield folder
    finally:
        undo()


def unwritable(project: Path, read_only: Path) -> dict[str, str]:
    (project / "plain-file").write_text("x\n")
    return {
        "under a file": "plain-file/sub",
        "inside /proc": "/proc/qlc-test-output",
        "name too long": "n" * 300,
        "read-only folder": str(read_only / "out"),
    }


@pytest.mark.parametrize(
    "where", ["under a file", "inside /proc", "name too long", "read-only folder"]
)
@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_unwritable_output_is_a_user_error_naming_the_path(
    writer: str, where: str, project: Path, read_only_dir: Path, tally
) -> None:
    tally()
    argv, _ = WRITERS[writer]
    target = unwritable(project, read_only_dir)[where]
    with scratch_cwd(project):
        code, _, stderr = invoke(argv(target))
    assert_refused(code, stderr, target[:40])
    assert "choose another path with -o" in stderr, stderr
    assert not os.path.lexists("/proc/qlc-test-output")


def test_lock_in_a_read_only_folder_is_refused_before_resolving(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tally
) -> None:
    from qlc.runtime import lock

    tally()
    spec = tiny_project(tmp_path / "p")
    (spec.parent / "tiny.lock").unlink()
    resolved = []
    monkeypatch.setattr(lock.UvResolver, "compile", lambda *args: resolved.append(args) or "")
    undo = make_read_only(spec.parent)
    try:
        assert_unwritable(spec.parent)
        with scratch_cwd(spec.parent):
            code, _, stderr = invoke(["lock", "tiny.toml"])
    finally:
        undo()
    assert_refused(code, stderr, "tiny.lock")
    assert resolved == [], "the stack was resolved before the lock's folder was checked"


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_each_writer_takes_a_new_folder(writer: str, project: Path, tally) -> None:
    """The cases above fail for the place, not for the command: into a new folder compile and
    export write their files, init its spec, merge gets past its output (to the missing run)
    and pull to the registry."""
    tally()
    argv, names = WRITERS[writer]
    with scratch_cwd(project):
        code, _, stderr = invoke(argv("new/folder"))
    if writer.startswith("merge"):
        assert code == 2 and "runs/none" in stderr and "-o" not in stderr, stderr
        assert not (project / "new" / "folder").exists()
        assert [p.name for p in (project / "new").iterdir()] == [], "a staging folder was left"
    elif writer.startswith("pull"):  # past its output, to the registry that is not there
        assert code != 0 and "127.0.0.1:1" in stderr and "-o" not in stderr, stderr
        assert [p.name for p in (project / "new").iterdir()] == [], "a staging folder was left"
    elif writer.startswith("init"):  # a spec file
        assert code == 0, stderr
        assert (project / "new" / "folder").is_file()
    else:
        assert code == 0, stderr
        assert set(names[:1]) <= {p.name for p in (project / "new" / "folder").iterdir()}
