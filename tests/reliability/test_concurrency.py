"""Load: 20 tiny jobs started back to back (four at a time, `qlc run --local`, one step each)
in one project, and several `qlc build`s of the same project at once against a real daemon.

Afterwards every run directory holds its own job's manifest (job name, seed and spec hash are
its own), the manifest's subjects hash to the files beside it, no two jobs share a directory,
and the build records and contexts parse and match what the compiler makes.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from reliability_support import hash_tree, tiny_project

JOBS = 20
AT_ONCE = 4
QLC = [sys.executable, "-m", "qlc"]


def job_spec(project: Path, index: int) -> Path:
    """specs load-NN.toml: its own job name and seed, one step, no eval or checkpoints."""
    source = (project / "tiny.toml").read_text()
    lines = []
    for line in source.splitlines():
        key = line.split(" = ", 1)[0]
        if key in ("eval_fraction", "eval_steps", "save_steps"):
            continue
        line = {"name": f'name = "load-{index:02d}"', "seed": f"seed = {1000 + index}",
                "max_steps": "max_steps = 1"}.get(key, line)  # fmt: skip
        lines.append(line)
    spec = project / f"load-{index:02d}.toml"
    spec.write_text("\n".join(lines) + "\n")
    (project / f"load-{index:02d}.lock").write_bytes((project / "tiny.lock").read_bytes())
    return spec


def run_local(project: Path, spec: Path) -> tuple[str, int, str, float]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QLC_")}
    env["TOKENIZERS_PARALLELISM"] = "false"
    started = time.monotonic()
    done = subprocess.run([*QLC, "run", spec.name, "--local"], cwd=project, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    return spec.stem, done.returncode, done.stdout + done.stderr, time.monotonic() - started


@pytest.mark.slow
def test_twenty_jobs_back_to_back_keep_their_own_outputs(tmp_path: Path, tally) -> None:
    project = tmp_path / "project"
    tiny_project(project)
    specs = [job_spec(project, i) for i in range(JOBS)]
    started = time.monotonic()
    with ThreadPoolExecutor(AT_ONCE) as pool:
        results = list(pool.map(lambda s: run_local(project, s), specs))
    wall = time.monotonic() - started
    failed = [(job, code, out[-1500:]) for job, code, out, _ in results if code != 0]
    assert not failed, failed
    tally(JOBS)
    seen_dirs = set()
    for spec in specs:
        job = spec.stem
        (run_dir,) = (project / "runs" / job).iterdir()
        assert run_dir not in seen_dirs
        seen_dirs.add(run_dir)
        manifest = json.loads((run_dir / "manifest.json").read_text())
        predicate = manifest["predicate"]
        assert predicate["status"] == "succeeded", (job, predicate.get("error"))
        assert predicate["run"]["seed"] == 1000 + int(job.split("-")[1]), f"{job}: crossed seed"
        assert predicate["spec"]["sha256"] == hashlib.sha256(spec.read_bytes()).hexdigest(), (
            f"{job}: another job's spec"
        )
        files = {f"adapter/{k}": v for k, v in hash_tree(run_dir / "adapter").items()}
        subjects = {s["name"]: s["digest"]["sha256"] for s in manifest["subject"]}
        assert subjects == files, f"{job}: subjects do not hash to its adapter"
        recorded = (run_dir / "manifest.sha256").read_text().split()[0]
        assert recorded == hashlib.sha256((run_dir / "manifest.json").read_bytes()).hexdigest()
    per_job = sorted(seconds for *_, seconds in results)
    print(f"\nload: {JOBS} jobs, {AT_ONCE} at a time: {wall:.1f}s wall, per job median "
          f"{per_job[JOBS // 2]:.1f}s, max {per_job[-1]:.1f}s")  # fmt: skip


@pytest.mark.docker
@pytest.mark.slow
def test_concurrent_builds_leave_consistent_records(
    docker_ready: str, tiny_image: object, tmp_path: Path, tally
) -> None:
    """Five builds at once of two new images: the session's tiny image went first, so they
    share its stack layer from the build cache instead of installing it five times."""
    from qlc.runtime.build import compile_for_build, context_matches
    from qlc.runtime.records import BuildRecord, load_build

    base = docker_ready
    project = tmp_path / "project"
    tiny_project(project)
    variant = job_spec(project, 0)  # another job name, seed and step count: another image
    targets = ["tiny.toml", "tiny.toml", variant.name, variant.name, "tiny.toml"]
    processes = [
        subprocess.Popen([*QLC, "build", target, "--base-image", base], cwd=project, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for target in targets
    ]  # fmt: skip
    outputs = [p.communicate(timeout=1800)[0] for p in processes]
    tally(len(targets))
    assert all(p.returncode == 0 for p in processes), outputs
    records = {}
    for job, spec in (("tiny", project / "tiny.toml"), ("load-00", variant)):
        record = load_build(project / ".qlc" / "builds" / f"{job}.json")
        context = compile_for_build(spec, project).context
        assert record.context_hash == context.content_hash
        assert context_matches(Path(record.context_dir), context)
        labels = json.loads(subprocess.run(
            ["docker", "image", "inspect", record.tag, "--format", "{{json .Config.Labels}}"],
            capture_output=True, text=True, check=True).stdout)  # fmt: skip
        assert labels["qlc.context.sha256"] == context.content_hash
        records[job] = record
    last = BuildRecord.model_validate_json((project / ".qlc" / "last-build.json").read_text())
    assert last.tag in {r.tag for r in records.values()}
    leftovers = [p.name for p in (project / ".qlc").rglob("*") if ".tmp" in p.name]
    assert leftovers == [], f"half-written files left behind: {leftovers}"
