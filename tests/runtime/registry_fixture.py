"""A real local registry for docker-marked tests: Debian's `docker-registry` on loopback.

Use it from any test module:

    from registry_fixture import local_registry  # noqa: F401  (the fixture)

    @pytest.mark.docker
    def test_x(local_registry: str) -> None:   # "127.0.0.1:PORT"
        ...

The registry stores into a temporary folder and is stopped when the session ends. The Docker
daemon treats 127.0.0.0/8 registries as insecure (plain HTTP) by default, so nothing needs
configuring. It is installed where Docker is: .ci/docker.sh (which `docker_ready` runs)
installs the docker-registry package when the command is missing.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

CONFIG = """version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: {root}
  delete:
    enabled: true
http:
  addr: 127.0.0.1:{port}
"""


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_until_answering(address: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"docker-registry exited ({process.returncode}): "
                               f"{log.read_text(errors='replace')[-2000:]}")  # fmt: skip
        try:
            with urllib.request.urlopen(f"http://{address}/v2/", timeout=2) as answer:
                if answer.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.2)
    raise RuntimeError(f"docker-registry did not answer on {address} within 30 s")


def start_registry(workdir: Path) -> tuple[str, subprocess.Popen[bytes]]:
    """Start docker-registry on a free loopback port; return (address, process)."""
    binary = shutil.which("docker-registry") or "/usr/bin/docker-registry"
    if not Path(binary).is_file():
        pytest.fail("docker-registry is missing after .ci/docker.sh: see its output above")
    port = free_loopback_port()
    (workdir / "storage").mkdir(parents=True, exist_ok=True)
    config = workdir / "config.yml"
    config.write_text(CONFIG.format(root=workdir / "storage", port=port), encoding="utf-8")
    log = workdir / "registry.log"
    with open(log, "wb") as log_file:
        process = subprocess.Popen(
            [binary, "serve", str(config)], stdout=log_file, stderr=subprocess.STDOUT
        )
    address = f"127.0.0.1:{port}"
    try:
        wait_until_answering(address, process, log)
    except BaseException:
        stop_registry(process)
        raise
    return address, process


def stop_registry(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


@pytest.fixture(scope="session")
def local_registry(docker_ready: str) -> Iterator[str]:
    """HOST:PORT of a running local registry (session-wide); docker_ready installs it."""
    with tempfile.TemporaryDirectory(prefix="qlc-registry-") as workdir:
        address, process = start_registry(Path(workdir))
        try:
            yield address
        finally:
            stop_registry(process)
