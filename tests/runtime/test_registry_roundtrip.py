"""The hand-off chain on a real daemon and a real local registry (Debian's docker-registry on
loopback): build the tiny spec's image, `qlc push` it, remove it from the daemon so only the
registry has it, `qlc run` (pulled back by digest), the manifest records the digest, `qlc
reproduce` of that manifest pulls that digest, and `qlc run --resume` leaves the finished run as it
is (resuming an unfinished pushed run keeps the digest: tests/runtime/test_pull.py).

The image is the tiny spec under its own job name, so the session's tiny image (other tests
use it) is never removed; it shares the locked stack's layer with that image, so the build
is a cache hit of that layer and the pull fetches the manifest, config and the image's own
layers from the registry. The push uploads the stack once per registry (minutes on 2 cores).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from registry_fixture import local_registry  # noqa: F401  (pytest fixture)
from runtime_fakes import copy_tiny_project

from qlc.runtime.docker_engine import DockerEngine
from qlc.runtime.records import BuildRecord, last_build

pytestmark = [pytest.mark.docker, pytest.mark.slow]
QLC = str(Path(sys.executable).parent / "qlc")
JOB = "tiny-pushed"


def qlc(project: Path, *args: str, timeout: int = 1200) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [QLC, *args], cwd=project, capture_output=True, text=True, timeout=timeout,
        env=dict(os.environ),
    )  # fmt: skip


def predicate_of(run_dir: Path) -> dict[str, Any]:
    return dict(json.loads((run_dir / "manifest.json").read_text())["predicate"])


def forget_image(engine: DockerEngine, image_id: str) -> None:
    """Remove the image and every local name of it (tags, pushed tag, repo digests)."""
    if engine.find_image(image_id) is not None:
        engine._api.remove_image(image_id, force=True)


def test_push_remove_run_from_registry_then_reproduce_pulls_the_digest(
    tiny_image: BuildRecord,
    local_registry: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    project = tmp_path / "handoff"
    spec = copy_tiny_project(project)
    spec.write_text(spec.read_text().replace('name = "tiny"', f'name = "{JOB}"', 1))
    built = qlc(project, "build", "specs/tiny.toml", "--base-image", tiny_image.base_image)
    assert built.returncode == 0, built.stdout + built.stderr
    image_id = last_build(project).image_id
    engine = DockerEngine()
    try:
        repository = f"{local_registry}/qlc/{JOB}"
        pushed = qlc(project, "push", "--registry", repository)
        assert pushed.returncode == 0, pushed.stdout + pushed.stderr
        reference = last_build(project).registry_digest
        assert reference is not None and reference.startswith(f"{repository}@sha256:")
        assert reference in pushed.stdout

        forget_image(engine, image_id)
        assert engine.find_image(image_id) is None  # only the registry has it now

        ran = qlc(project, "run")
        assert ran.returncode == 0, ran.stdout + ran.stderr
        assert f"pulling {reference}" in ran.stderr
        pulled = engine.find_image(image_id)
        assert pulled is not None and reference in pulled.repo_digests
        (run_dir,) = sorted((project / "specs" / "runs" / JOB).glob("*"))
        predicate = predicate_of(run_dir)
        assert predicate["status"] == "succeeded"
        assert predicate["image"]["digest"] == reference
        assert predicate["image"]["id"] == image_id

        again = qlc(project, "reproduce", str(run_dir / "manifest.json"))
        assert again.returncode == 0, again.stdout + again.stderr
        assert f"ok   image: pulled {reference} (image {image_id})" in again.stdout
        assert "ok   adapter: bit-identical" in again.stdout
        rerun_dir = Path(again.stdout.split("rerun: ", 1)[1].splitlines()[0])
        assert predicate_of(rerun_dir)["image"]["digest"] == reference

        before = (run_dir / "manifest.json").read_bytes()
        resumed = qlc(project, "run", "--resume", str(run_dir))
        assert resumed.returncode == 2 and "finished run" in resumed.stderr  # never rewritten
        assert (run_dir / "manifest.json").read_bytes() == before
    finally:
        forget_image(engine, image_id)
