"""The command line's own work: where it writes (-o), what it reads, what it echoes, what
`explain --gpu` exits with. Each test here is a defect found by issue 19's review; the
reliability suite (tests/reliability) checks the classes they belong to."""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SPECS = REPO / "specs"


def qlc(cwd: Path, *args: str, memory: int | None = None) -> subprocess.CompletedProcess[str]:
    """`python -m qlc ARGS` in cwd; `memory` caps its address space (bytes)."""

    def cap() -> None:
        if memory is not None:
            resource.setrlimit(resource.RLIMIT_AS, (memory, memory))

    return subprocess.run(
        [sys.executable, "-m", "qlc", *args], cwd=cwd, capture_output=True, text=True,
        timeout=120, preexec_fn=cap,
    )  # fmt: skip


@pytest.fixture
def project(tmp_path: Path) -> Path:
    for name in ("tiny.toml", "tiny.lock", "guanaco.toml"):
        shutil.copy(SPECS / name, tmp_path / name)
    return tmp_path


# --- compile -o: only qlc's own contexts are replaced ---------------------------------------


def test_compile_keeps_the_persons_own_dockerfile(project: Path) -> None:
    """Was: the person's Dockerfile, train.py and spec.toml deleted, exit 0."""
    mine = project / "mine"
    mine.mkdir()
    for name in ("Dockerfile", "train.py", "spec.toml"):
        (mine / name).write_text(f"my own {name}\n")
    done = qlc(project, "compile", "tiny.toml", "-o", "mine")
    assert done.returncode == 2, done.stderr
    assert "no .qlc-context in it" in done.stderr and "give -o a new or empty directory" in (
        done.stderr
    )
    for name in ("Dockerfile", "train.py", "spec.toml"):
        assert (mine / name).read_text() == f"my own {name}\n"


def test_compile_keeps_a_marked_folder_with_foreign_files(project: Path) -> None:
    assert qlc(project, "compile", "tiny.toml", "-o", "ctx").returncode == 0
    (project / "ctx" / "notes.txt").write_text("mine\n")
    done = qlc(project, "compile", "tiny.toml", "-o", "ctx")
    assert done.returncode == 2 and "holds files qlc did not write (notes.txt)" in done.stderr
    assert (project / "ctx" / "notes.txt").read_text() == "mine\n"


def test_compile_replaces_its_own_context(project: Path) -> None:
    assert qlc(project, "compile", "tiny.toml", "-o", "ctx").returncode == 0
    (project / "ctx" / "train.py").write_text("edited\n")
    done = qlc(project, "compile", "tiny.toml", "-o", "ctx")
    assert done.returncode == 0, done.stderr
    assert (project / "ctx" / "train.py").read_text().startswith('"""')
    assert sorted(p.name for p in project.iterdir() if p.name.startswith(".")) == []


# --- inputs that are not regular files ------------------------------------------------------


def test_a_fifo_spec_is_refused_instead_of_waited_on(project: Path) -> None:
    """Was: blocked for ever opening the FIFO."""
    os.mkfifo(project / "fifo.toml")
    done = qlc(project, "validate", "fifo.toml")
    assert done.returncode == 2
    assert done.stderr == (
        "fifo.toml:1:1: cannot read the spec: it is a named pipe (FIFO), not a regular file\n"
    )


def test_dev_zero_as_a_spec_is_refused_unread(project: Path) -> None:
    """Was: /dev/zero read whole before the 1 MiB limit applied (MemoryError). Under a 1.5 GiB
    address space the old reading fails; refusing it reads nothing."""
    done = qlc(project, "validate", "/dev/zero", memory=3 << 29)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr == (
        "/dev/zero:1:1: cannot read the spec: it is a character device, not a regular file\n"
    )


def test_a_fifo_prompts_file_is_refused_instead_of_waited_on(project: Path) -> None:
    os.mkfifo(project / "prompts.txt")
    done = qlc(project, "generate", "runs/none", "--prompts", "prompts.txt")
    assert done.returncode == 2
    assert "prompts.txt: cannot read the prompts: it is a named pipe" in done.stderr


# --- outputs nothing can be written to ------------------------------------------------------


@pytest.mark.parametrize(
    "target, why",
    [
        ("plain-file/sub", "plain-file is a file, not a directory"),
        ("/proc/qlc-test", "/proc is the kernel's virtual file system"),
        ("n" * 300, "the path is too long"),
    ],
    ids=["under-a-file", "in-proc", "too-long"],
)
def test_compile_to_an_unwritable_place_is_a_user_error(
    project: Path, target: str, why: str
) -> None:
    """Was: FileExistsError / FileNotFoundError / OSError tracebacks."""
    (project / "plain-file").write_text("x\n")
    done = qlc(project, "compile", "tiny.toml", "-o", target)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert why in done.stderr and "choose another path with -o" in done.stderr


def test_merge_under_a_file_is_a_user_error_naming_the_file(project: Path) -> None:
    """Was: exit 1 with a raw errno ("cannot load or write the model: [Errno 17] ...")."""
    (project / "plain-file").write_text("x\n")
    done = qlc(project, "merge", "runs/none", "-o", "plain-file/sub")
    assert done.returncode == 2, done.stderr
    assert done.stderr == (
        "error: -o plain-file/sub: cannot write there: plain-file is a file, not a directory; "
        "choose another path with -o\n"
    )


def test_export_under_a_file_is_a_user_error(project: Path) -> None:
    (project / "plain-file").write_text("x\n")
    image = "registry.example/qlc/tiny@sha256:" + "0" * 64
    hub = (project / "tiny.toml").read_text().replace('path = "tiny/model"', 'id = "org/m"')
    (project / "hub.toml").write_text(hub.replace('path = "tiny/data.jsonl"', 'id = "org/d"'))
    shutil.copy(project / "tiny.lock", project / "hub.lock")
    done = qlc(project, "export", "hub.toml", "--target", "kubernetes", "--image", image,
               "--volume", "runs", "-o", "plain-file/sub")  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "plain-file is a file, not a directory" in done.stderr


# --- echoes ---------------------------------------------------------------------------------


def test_a_900_kb_key_is_clipped(project: Path) -> None:
    spec = project / "tiny.toml"
    spec.write_text(spec.read_text().replace("[job]\n", "[job]\n" + "k" * 900_000 + " = 1\n"))
    done = qlc(project, "validate", "tiny.toml")
    assert done.returncode == 2
    assert done.stderr == (
        f"tiny.toml:4:1: job.{'k' * 60}… (900,000 characters): unknown key; expected one of: "
        "deterministic, name, output_dir, seed\n"
    )


def test_a_100_kb_gpu_name_is_clipped(project: Path) -> None:
    done = qlc(project, "explain", "tiny.toml", "--gpu", "g" * 100_000)
    assert done.returncode == 2
    assert f"unknown GPU '{'g' * 59}… (100,002 characters): use one of H100" in done.stderr
    assert len(done.stderr) < 500


# --- explain --gpu: the exit status says whether it fits ------------------------------------


@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
def test_explain_exits_1_when_the_job_does_not_fit(project: Path, as_json: bool) -> None:
    """Was: "does NOT fit" and exit 0. The seed recipe needs ~10.8 GiB: not an 8 GB card."""
    extra = ["--json"] if as_json else []
    small = qlc(project, "explain", "guanaco.toml", "--gpu", "8GB", *extra)
    large = qlc(project, "explain", "guanaco.toml", "--gpu", "H100", *extra)
    assert (small.returncode, large.returncode) == (1, 0), small.stderr + large.stderr
    if not as_json:
        assert "does NOT fit" in small.stdout and "fits," in large.stdout


def test_explain_help_says_what_the_exit_status_means(project: Path) -> None:
    done = qlc(project, "explain", "--help")
    assert "exit 1 when the" in " ".join(done.stdout.split())
