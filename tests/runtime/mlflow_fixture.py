"""A real MLflow tracking server on loopback, for the tracking tests.

    from mlflow_fixture import mlflow_server  # noqa: F401  (the fixture)

    def test_x(mlflow_server: str) -> None:   # "http://127.0.0.1:PORT"
        ...

`mlflow server` (mlflow-skinny of the track extra, the version qlc pins for the image's
client, with the server's requirements from the dev extra) with a SQLite store and an
artifact folder in a temporary directory, started once per session in a process group of its
own and stopped (the whole group) when the session ends.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from registry_fixture import free_loopback_port

START_TIMEOUT_S = 180  # the server imports a lot: about a minute on a busy 2-core machine


def wait_for_health(uri: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"mlflow server exited ({process.returncode}): "
                               f"{log.read_text(errors='replace')[-2000:]}")  # fmt: skip
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as answer:
                if answer.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.5)
    raise RuntimeError(f"mlflow server did not answer on {uri} within {START_TIMEOUT_S} s")


def stop(process: subprocess.Popen[bytes]) -> None:
    """Stop the server and its workers: the process group it leads (it was started alone in
    it), SIGTERM first."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    pytest.importorskip("mlflow.server", reason="needs the track and dev extras")
    work = tmp_path_factory.mktemp("mlflow")
    port = free_loopback_port()
    uri = f"http://127.0.0.1:{port}"
    command = [
        sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
        "--workers", "1", "--backend-store-uri", f"sqlite:///{work / 'mlflow.db'}",
        "--artifacts-destination", str(work / "artifacts"),
    ]  # fmt: skip
    log = work / "server.log"
    with open(log, "wb") as log_file:
        process = subprocess.Popen(
            command, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        wait_for_health(uri, process, log)
        yield uri
    finally:
        stop(process)
