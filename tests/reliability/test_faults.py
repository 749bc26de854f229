"""Faults during a run: SIGKILL mid-run and mid-checkpoint-write, an exit-code failure, Ctrl-C,
a full disk while checkpoints and the adapter are written.

Each case runs the real `python -m qlc run tiny.toml --local` (the compiled train.py under the
runtime's supervision) on a tiny spec of 6 steps with a checkpoint every 2. The outside world
goes wrong through tests/reliability/faults_site/sitecustomize.py (on PYTHONPATH, inert
unless QLCTEST_FAULT is set) or from here (signals, a small tmpfs). After each: checkpoints that
were complete keep their hashes, the manifest tells the truth (not "succeeded", no adapter
subjects), nothing prints a traceback, and `qlc run --resume RUN_DIR` continues from the last
complete checkpoint to a manifest whose subjects are the adapter files' sha256.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from reliability_support import REPO, hash_tree, read_manifest, tiny_project

pytestmark = pytest.mark.slow

FAULTS_SITE = Path(__file__).resolve().parent / "faults_site"
EDITS = {"max_steps": "6", "save_steps": "2", "save_total_limit": "10", "logging_steps": "1"}
MARKER = "qlc-complete.json"


@pytest.fixture
def project(tmp_path: Path) -> Path:
    root = tmp_path / "project"
    tiny_project(root, EDITS, drop=("eval_fraction", "eval_steps"))
    return root


def qlc_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QLC_")}
    env.update(PYTHONPATH=str(FAULTS_SITE), TOKENIZERS_PARALLELISM="false", **extra)
    return env


def start(project: Path, *args: str, **extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "qlc", "run", "tiny.toml", "--local", *args],
        cwd=project, env=qlc_env(**extra), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip


QLC_CODE = tuple(f'File "{REPO / part}' for part in ("qlc/", "runtime/", "compiler/"))


def qlc_frames(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.strip().startswith(QLC_CODE)]


def finish(process: subprocess.Popen[str], timeout: float = 300, strict: bool = True
           ) -> tuple[int, str]:  # fmt: skip
    """Wait for qlc; its own code must never traceback (the training log it relays may: an
    injected crash inside the trainer is a bug report, and the run log keeps it)."""
    output, _ = process.communicate(timeout=timeout)
    if strict:
        assert not qlc_frames(output), output[-4000:]
    return process.returncode, output


def qlc_run(project: Path, *args: str, strict: bool = True, **extra: str) -> tuple[int, str]:
    return finish(start(project, *args, **extra), strict=strict)


def the_run_dir(project: Path) -> Path:
    runs = sorted((project / "runs" / "tiny").glob("*/manifest.json"))
    assert len(runs) == 1, runs
    return runs[0].parent


def wait_for(condition: Callable[[], bool], process: subprocess.Popen[str], what: str) -> None:
    deadline = time.monotonic() + 240
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"qlc ended before {what}: {process.stdout.read()[-3000:]}")  # type: ignore[union-attr]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def complete(run_dir: Path) -> dict[str, dict[str, str]]:
    """Hashes of every complete checkpoint (the trainer wrote its marker)."""
    return {
        p.name: hash_tree(p)
        for p in sorted((run_dir / "checkpoints").glob("checkpoint-*"))
        if (p / MARKER).is_file()
    }


def has_checkpoint(project: Path, step: int) -> Callable[[], bool]:
    def check() -> bool:
        return any((project / "runs" / "tiny").glob(f"*/checkpoints/checkpoint-{step}/{MARKER}"))

    return check


def training_pid(parent: int) -> int:
    """The train.py process the runtime started (a child of the qlc process)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == parent and b"train.py" in cmdline:
            return int(stat.parent.name)
    raise AssertionError(f"no train.py child of {parent}")


def assert_truthful_failure(run_dir: Path, intact: dict[str, dict[str, str]]) -> dict:
    manifest = read_manifest(run_dir)
    predicate = manifest["predicate"]
    assert predicate["status"] in ("failed", "interrupted"), predicate["status"]
    assert manifest["subject"] == [], "a run that did not finish claims an adapter"
    assert predicate["error"], "the manifest does not say what went wrong"
    now = complete(run_dir)
    for name, hashes in intact.items():
        assert now.get(name) == hashes, f"{name} changed after the fault"
    return manifest


def assert_resumes(project: Path, run_dir: Path, expected_from: str, steps: int | None = 6
                   ) -> None:  # fmt: skip
    code, output = qlc_run(project, "--resume", str(run_dir))
    assert code == 0, output[-3000:]
    manifest = read_manifest(run_dir)
    assert manifest["predicate"]["status"] == "succeeded"
    assert Path(manifest["predicate"]["run"]["resumed_from"]).name == expected_from
    subjects = {s["name"]: s["digest"]["sha256"] for s in manifest["subject"]}
    files = {f"adapter/{k}": v for k, v in hash_tree(run_dir / "adapter").items()}
    assert subjects and subjects == files
    if steps is not None:
        logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
        assert max(e["step"] for e in logged if e.get("event") == "train") == steps


def test_sigkill_mid_run_then_resume(project: Path, tally) -> None:
    tally()
    process = start(project, QLCTEST_FAULT_STEP_DELAY="0.6")
    wait_for(has_checkpoint(project, 2), process, "checkpoint-2")
    time.sleep(0.8)  # into step 3 or 4
    before = complete(the_run_dir(project))
    os.kill(training_pid(process.pid), signal.SIGKILL)
    code, output = finish(process)
    assert code == 1, output[-3000:]
    run_dir = the_run_dir(project)
    assert_truthful_failure(run_dir, before)
    assert_resumes(project, run_dir, max(complete(run_dir), key=lambda n: int(n.split("-")[1])))


def test_sigkill_mid_checkpoint_write_then_resume(project: Path, tally) -> None:
    tally()
    code, output = qlc_run(project, QLCTEST_FAULT="kill-in-save:4")
    assert code == 1, output[-3000:]
    run_dir = the_run_dir(project)
    partial = run_dir / "checkpoints" / "checkpoint-4"
    assert partial.is_dir() and not (partial / MARKER).exists(), "the kill came too late"
    assert list(complete(run_dir)) == ["checkpoint-2"]
    assert_truthful_failure(run_dir, {})
    assert_resumes(project, run_dir, "checkpoint-2")


def test_exit_code_failure_keeps_checkpoints_and_says_why(project: Path, tally) -> None:
    tally()
    code, output = qlc_run(project, QLCTEST_FAULT="raise-at:3")
    assert code == 1, output[-3000:]
    run_dir = the_run_dir(project)
    manifest = assert_truthful_failure(run_dir, {})
    assert "injected failure at step 3" in manifest["predicate"]["error"]
    assert list(complete(run_dir)) == ["checkpoint-2"]
    assert_resumes(project, run_dir, "checkpoint-2")


def test_ctrl_c_interrupts_cleanly(project: Path, tally) -> None:
    tally()
    process = start(project, QLCTEST_FAULT_STEP_DELAY="0.6")
    wait_for(has_checkpoint(project, 2), process, "checkpoint-2")
    before = complete(the_run_dir(project))
    process.send_signal(signal.SIGINT)  # what Ctrl-C sends to qlc in the foreground
    code, output = finish(process)
    assert code != 0, output[-3000:]
    run_dir = the_run_dir(project)
    manifest = assert_truthful_failure(run_dir, before)
    assert manifest["predicate"]["status"] == "interrupted"


# ---------------------------------------------------------------------------------------------
# A full disk: the project's runs/ folder is a 4 MiB tmpfs.


@pytest.fixture
def small_disk(project: Path):  # type: ignore[no-untyped-def]
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    runs = project / "runs"
    runs.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(runs)],
                             capture_output=True, text=True)  # fmt: skip
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    yield runs
    subprocess.run(["umount", "-l", str(runs)], check=False)


def free_space(run_dir: Path) -> None:
    (run_dir / "zz-filler").unlink(missing_ok=True)


def test_disk_full_while_checkpointing_keeps_checkpoints_and_resumes(
    project: Path, small_disk: Path, tally
) -> None:
    tally()
    code, output = qlc_run(project, strict=False, QLCTEST_FAULT="fill-at:3")
    assert code != 0, output[-3000:]
    assert "No space left on device" in output
    run_dir = the_run_dir(project)
    before = complete(run_dir)
    assert "checkpoint-2" in before
    manifest = read_manifest(run_dir)
    assert manifest["predicate"]["status"] != "succeeded" and manifest["subject"] == []
    free_space(run_dir)
    assert_resumes(project, run_dir, max(before, key=lambda n: int(n.split("-")[1])))


def test_disk_full_is_reported_without_traceback_and_the_manifest_is_final(
    project: Path, small_disk: Path, tally
) -> None:
    tally()
    code, output = qlc_run(project, strict=False, QLCTEST_FAULT="fill-at:3")
    assert code == 1 and not qlc_frames(output), output[-3000:]
    assert "No space left on device" in output
    status = read_manifest(the_run_dir(project))["predicate"]["status"]
    assert status == "failed", f"the manifest says {status!r} after the run ended"


def test_kill_while_writing_the_adapter_claims_no_adapter(project: Path, tally) -> None:
    tally()
    code, output = qlc_run(project, QLCTEST_FAULT="kill-in-adapter")
    assert code == 1, output[-3000:]
    run_dir = the_run_dir(project)
    half = run_dir / ".adapter.partial" / "adapter_model.safetensors"
    assert half.read_bytes() == b"half an adapter"
    assert not (run_dir / "adapter").exists(), "a half-written adapter was published"
    assert_truthful_failure(run_dir, {})
    # the extra step a resume from the final checkpoint takes is its own defect (below)
    assert_resumes(project, run_dir, "checkpoint-6", steps=None)


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project holding one succeeded run (copied by each test that changes it)."""
    root = tmp_path_factory.mktemp("finished") / "project"
    tiny_project(root, EDITS, drop=("eval_fraction", "eval_steps"))
    code, output = qlc_run(root)
    assert code == 0, output[-3000:]
    return root


def copy_of(finished: Path, tmp_path: Path) -> tuple[Path, Path, dict[str, str]]:
    project = tmp_path / "project"
    shutil.copytree(finished, project, symlinks=True)
    run_dir = the_run_dir(project)
    adapter = {s["name"]: s["digest"]["sha256"] for s in read_manifest(run_dir)["subject"]}
    return project, run_dir, adapter


def test_resuming_a_finished_run_is_refused_and_changes_nothing(
    finished: Path, tmp_path: Path, tally
) -> None:
    """A finished run is never rewritten: --resume on it stops before any training (even one
    that would die writing the adapter), and every file of the run is as it was."""
    tally()
    project, run_dir, _ = copy_of(finished, tmp_path)
    before = hash_tree(run_dir)
    code, output = qlc_run(project, "--resume", str(run_dir), QLCTEST_FAULT="kill-in-adapter")
    assert code == 2, output[-3000:]
    assert "holds a finished run (status succeeded): it is never rewritten" in output
    assert "fix: leave out --resume to start a new run" in output
    assert hash_tree(run_dir) == before, "the finished run was changed"


# ---------------------------------------------------------------------------------------------
# With a real daemon: the container OOM-killed (a memory limit set on it from outside, as a host
# or orchestrator would), and Ctrl-C during `qlc build`.


@pytest.fixture(scope="module")
def base_image(docker_ready: str, tiny_image: object) -> str:
    """The session's base; the session's tiny image is built first, so the images built here
    reuse its stack layer from the build cache (and go with the session's)."""
    return docker_ready


@pytest.fixture(scope="module")
def built(base_image: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    project = tmp_path_factory.mktemp("oom") / "project"
    tiny_project(project, {**EDITS, "name": '"tiny-faults"'}, drop=("eval_fraction", "eval_steps"))
    done = subprocess.run([sys.executable, "-m", "qlc", "build", "tiny.toml", "--base-image",
                           base_image], cwd=project, env=qlc_env(), capture_output=True,
                          text=True, timeout=1800)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return project


def _container(job: str) -> str | None:
    found = subprocess.run(["docker", "ps", "-q", "--filter", f"label=qlc.job={job}"],
                           capture_output=True, text=True)  # fmt: skip
    return found.stdout.split()[0] if found.stdout.split() else None


@pytest.mark.docker
def test_oom_killed_container_is_reported_and_recorded(built: Path, tally) -> None:
    tally()
    process = subprocess.Popen([sys.executable, "-m", "qlc", "run", "--smoke"], cwd=built,
                               env=qlc_env(), text=True, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT)  # fmt: skip
    limited = None
    deadline = time.monotonic() + 300
    while limited is None and process.poll() is None and time.monotonic() < deadline:
        container = _container("tiny-faults")
        if container is not None:
            # Far below what Python + torch need in anonymous memory, so the kernel must kill
            # it whenever the limit lands; a limit near the working set can thrash instead.
            limit = ["--memory", "48m", "--memory-swap", "48m"]
            limited = subprocess.run(["docker", "update", *limit, container],
                                     capture_output=True, text=True)  # fmt: skip
        time.sleep(0.05)
    code, output = finish(process)
    assert limited is not None and limited.returncode == 0, (limited, output[-2000:])
    assert code == 1 and "lack of memory (OOM)" in output, output[-3000:]
    runs = sorted((built / "runs" / "tiny-faults").iterdir())
    manifest = read_manifest(runs[-1])
    assert manifest["predicate"]["status"] == "failed" and manifest["subject"] == []
    assert manifest["predicate"]["host"]["oom_killed"] is True
    assert _container("tiny-faults") is None, "the killed container was not removed"


@pytest.mark.docker
def test_ctrl_c_during_build_leaves_no_half_written_record(
    built: Path, base_image: str, tally
) -> None:
    from qlc.runtime.records import last_build

    tally()
    spec = built / "tiny.toml"
    spec.write_text(spec.read_text().replace("seed = 42", "seed = 7"))  # a new image to build
    process = subprocess.Popen([sys.executable, "-m", "qlc", "build", "tiny.toml", "--base-image",
                                base_image], cwd=built, env=qlc_env(), text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    time.sleep(1.0)
    process.send_signal(signal.SIGINT)
    code, output = finish(process)
    assert code != 0 or "cache hit" in output or "built" in output, output[-2000:]
    last_build(built)  # parses: old or new, never half of one
    leftovers = [p.name for p in (built / ".qlc").rglob("*") if ".tmp" in p.name]
    assert leftovers == [], leftovers


@pytest.mark.docker
def test_container_killed_from_outside_keeps_checkpoints_and_says_so(
    built: Path, base_image: str, tally
) -> None:
    """`docker kill` mid-run (what a node drain or a daemon going down does to the process)."""
    tally()
    spec = built / "tiny.toml"
    spec.write_text(spec.read_text().replace("max_steps = 6", "max_steps = 40"))
    done = subprocess.run([sys.executable, "-m", "qlc", "build", "tiny.toml", "--base-image",
                           base_image], cwd=built, env=qlc_env(), capture_output=True,
                          text=True, timeout=1800)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    before_runs = set((built / "runs" / "tiny-faults").glob("*"))
    process = subprocess.Popen(
        [sys.executable, "-m", "qlc", "run"], cwd=built, env=qlc_env(), text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip

    def second_checkpoint() -> bool:
        new = set((built / "runs" / "tiny-faults").glob("*")) - before_runs
        return any(p.joinpath("checkpoints", "checkpoint-4", MARKER).is_file() for p in new)

    wait_for(second_checkpoint, process, "checkpoint-4 in the container")
    (run_dir,) = set((built / "runs" / "tiny-faults").glob("*")) - before_runs
    intact = complete(run_dir)
    container = _container("tiny-faults")
    assert container is not None
    subprocess.run(["docker", "kill", container], check=True, capture_output=True)
    code, output = finish(process)
    assert code == 1, output[-3000:]
    manifest = assert_truthful_failure(run_dir, intact)
    assert manifest["predicate"]["host"]["exit_code"] == 137
    assert _container("tiny-faults") is None
