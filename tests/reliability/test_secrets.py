"""Secrets and isolation with a real daemon: `qlc build` + `qlc run --smoke` of a tiny spec that
names HF_TOKEN as a secret, with a canary token in the environment of both commands.

While the container runs its configuration is read from the daemon (user, capabilities,
privileges, network, mounts). Afterwards the canary is searched in the build context and
records, the run directory (manifest, report, logs, metrics), qlc's own output, the image's
configuration and every file of every image layer except the Python packages that pip
installed from the hash-checked lock (their bytes are fixed by the lock, which is scanned).
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from reliability_support import tiny_project

pytestmark = [pytest.mark.docker, pytest.mark.slow]
JOB = "tiny-secret"
CANARY = f"qlc-secret-canary-{secrets.token_hex(12)}"


def docker(*args: str) -> str:
    done = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def secret_run(
    docker_ready: str, tiny_image: object, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    """Built FROM the session's base after the session's tiny image: the stack layer is
    reused from the build cache, and the image is removed with the session's."""
    project = tmp_path_factory.mktemp("secret") / "project"
    tiny_project(project, {"name": f'"{JOB}"', "python": '"3.11"\nsecrets = ["HF_TOKEN"]'})
    env = {**os.environ, "HF_TOKEN": CANARY, "PYTHONUNBUFFERED": "1"}
    qlc = [sys.executable, "-m", "qlc"]
    built = subprocess.run([*qlc, "build", "tiny.toml", "--base-image", docker_ready], cwd=project,
                           env=env, capture_output=True, text=True, timeout=1800)  # fmt: skip
    assert built.returncode == 0, built.stdout + built.stderr
    run = subprocess.Popen([*qlc, "run", "--smoke"], cwd=project, env=env, text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    inspected: dict[str, Any] | None = None
    deadline = time.monotonic() + 600
    while run.poll() is None and time.monotonic() < deadline:
        ids = docker("ps", "-q", "--filter", f"label=qlc.job={JOB}").split()
        if ids and inspected is None:
            found = subprocess.run(["docker", "inspect", ids[0]], capture_output=True, text=True)
            if found.returncode == 0:
                inspected = json.loads(found.stdout)[0]
        time.sleep(0.3)
    stdout, stderr = run.communicate(timeout=60)
    assert run.returncode == 0, stdout + stderr
    (run_dir,) = (project / "runs" / JOB).iterdir()
    record = json.loads((project / ".qlc" / "last-build.json").read_text())
    return {"project": project, "run_dir": run_dir, "inspect": inspected, "record": record,
            "output": built.stdout + built.stderr + stdout + stderr}  # fmt: skip


def test_container_runs_isolated(secret_run: dict[str, Any], tally) -> None:
    tally()
    container = secret_run["inspect"]
    assert container is not None, "the container was never seen running"
    config, host = container["Config"], container["HostConfig"]
    user = config["User"].split(":")[0]
    assert user not in ("", "0", "root"), f"runs as {config['User']!r}"
    assert host["CapDrop"] == ["ALL"] and not host["CapAdd"]
    assert host["Privileged"] is False
    assert "no-new-privileges" in host["SecurityOpt"]
    assert host["NetworkMode"] == "none", "an offline run has a network"
    mounts = {m["Destination"]: m["RW"] for m in container["Mounts"]}
    assert mounts.pop("/out") is True
    assert mounts and all(target.startswith("/inputs/") for target in mounts)
    assert not any(mounts.values()), f"writable inputs: {mounts}"
    assert not host.get("Binds") or all(b.endswith(":ro") or ":/out" in b for b in host["Binds"])


def test_manifest_records_a_non_root_user_observed_inside(secret_run: dict[str, Any], tally
                                                          ) -> None:  # fmt: skip
    tally()
    manifest = json.loads((secret_run["run_dir"] / "manifest.json").read_text())
    assert manifest["predicate"]["status"] == "succeeded"
    assert manifest["predicate"]["environment"]["user"]["uid"] != 0


def test_no_container_is_left_holding_the_secret(secret_run: dict[str, Any], tally) -> None:
    tally()
    assert docker("ps", "-aq", "--filter", f"label=qlc.job={JOB}").split() == []


def _files_with_canary(root: Path, skip: tuple[str, ...] = ()) -> list[str]:
    needle = CANARY.encode()
    hits = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip]
        for name in filenames:
            path = Path(dirpath, name)
            if path.is_symlink() or not path.is_file():
                continue
            try:
                if needle in path.read_bytes():
                    hits.append(str(path))
            except OSError:
                continue
    return hits


def test_secret_is_in_no_file_qlc_wrote(secret_run: dict[str, Any], tally) -> None:
    tally()
    hits = _files_with_canary(secret_run["project"])
    assert hits == [], f"the token leaked into {hits}"
    assert CANARY not in secret_run["output"], "qlc printed the token"
    assert (secret_run["run_dir"] / "run.log").stat().st_size > 0


def test_secret_is_in_no_image_layer(secret_run: dict[str, Any], tally) -> None:
    tally()
    image = json.loads(docker("image", "inspect", secret_run["record"]["image_id"]))[0]
    assert CANARY not in json.dumps(image), "the token is in the image configuration"
    history = docker("history", "--no-trunc", "--format", "{{.CreatedBy}}", image["Id"])
    assert CANARY not in history
    driver = image["GraphDriver"]
    if driver["Name"] != "overlay2" or os.geteuid() != 0:
        pytest.skip(f"layer files are readable here only with overlay2 as root ({driver['Name']})")
    layers = [*driver["Data"].get("LowerDir", "").split(":"), driver["Data"]["UpperDir"]]
    assert any(Path(layer, "qlc", "train.py").is_file() for layer in layers if layer), (
        "the layer folders do not hold the image's files: nothing was scanned"
    )
    hits = []
    for layer in filter(None, layers):
        hits += _files_with_canary(Path(layer), skip=("site-packages",))
    assert hits == [], f"the token is in image layers: {hits}"
