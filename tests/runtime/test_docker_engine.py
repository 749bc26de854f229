from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from registry_fixture import local_registry  # noqa: F401  (pytest fixture)

from qlc.runtime.docker_engine import (
    BuildError,
    ContainerRequest,
    DaemonUnreachable,
    DockerEngine,
    Mount,
    PullError,
    _follow_build,
    context_tar,
    device_requests,
    host_config_kwargs,
    split_lines,
)

REPO = Path(__file__).resolve().parents[2]


def test_no_device_request_for_cpu() -> None:
    assert device_requests(0) == []


@pytest.mark.parametrize("gpus", [1, 2, -1])
def test_gpu_device_request_counts(gpus: int) -> None:
    (request,) = device_requests(gpus)
    assert request["Count"] == gpus
    assert request["Capabilities"] == [["gpu"]]


def test_host_config_isolates_the_container() -> None:
    request = ContainerRequest(
        image="img",
        environment={},
        gpus=4,
        shm_size="16g",
        mounts=(Mount("/data", "/inputs/data/x.jsonl"), Mount("/run", "/out", read_only=False)),
    )
    kwargs = host_config_kwargs(request)
    assert kwargs["device_requests"][0]["Count"] == 4
    assert kwargs["cap_drop"] == ["ALL"]
    assert kwargs["security_opt"] == ["no-new-privileges"]
    assert kwargs["network_mode"] == "none"
    assert kwargs["shm_size"] == "16g"
    assert [(m["Target"], m["ReadOnly"]) for m in kwargs["mounts"]] == [
        ("/inputs/data/x.jsonl", True),
        ("/out", False),
    ]


def test_split_lines_across_chunk_and_utf8_boundaries() -> None:
    text = 'step 1 ✓\nQLC_PROGRESS {"step": 2}\nlast'
    data = text.encode()
    chunks = [data[i : i + 3] for i in range(0, len(data), 3)]
    assert list(split_lines(iter(chunks))) == text.split("\n")


def test_follow_build_returns_the_image_id_and_streams_lines() -> None:
    seen: list[str] = []
    stream = [
        {"stream": "Step 1/2 : FROM x\n"},
        {"aux": {"ID": "sha256:abc"}},
        {"stream": "Successfully built abc\n"},
    ]
    assert _follow_build(iter(stream), seen.append) == "sha256:abc"
    assert seen == ["Step 1/2 : FROM x", "Successfully built abc"]


def test_follow_build_raises_with_the_log_tail() -> None:
    stream = [
        {"stream": "ERROR: No matching distribution found for nope\n"},
        {"error": "x", "errorDetail": {"message": "returned a non-zero code: 1"}},
    ]
    with pytest.raises(BuildError) as caught:
        _follow_build(iter(stream), lambda line: None)
    assert caught.value.message == "returned a non-zero code: 1"
    assert caught.value.log_tail == ["ERROR: No matching distribution found for nope"]


def test_context_tar_is_deterministic_and_holds_exactly_the_files() -> None:
    import io
    import tarfile

    files = {"train.py": b"print(1)\n", "Dockerfile": b"FROM x\n", ".dockerignore": b"*\n"}
    first = context_tar(files)
    assert first == context_tar(dict(reversed(list(files.items()))))
    with tarfile.open(fileobj=io.BytesIO(first)) as archive:
        members = archive.getmembers()
        assert [m.name for m in members] == sorted(files)
        assert {(m.mtime, m.uid, m.gid, m.mode) for m in members} == {(0, 0, 0, 0o644)}
        for member in members:
            handle = archive.extractfile(member)
            assert handle is not None and handle.read() == files[member.name]


def test_missing_daemon_names_the_endpoint_and_the_fix(tmp_path: Path) -> None:
    endpoint = f"unix://{tmp_path}/no-docker.sock"
    with pytest.raises(DaemonUnreachable) as caught:
        DockerEngine(endpoint).ping()
    message = str(caught.value)
    assert endpoint in message
    assert "start it with" in message and "dockerd" in message


def test_repository_docker_folder_does_not_shadow_the_sdk() -> None:
    """docker/ holds image parts, not a package: from the repo root `import docker` is the SDK."""
    code = (
        "import docker; from qlc.runtime.docker_engine import docker_sdk; "
        "print(hasattr(docker, 'APIClient'), hasattr(docker_sdk(), 'APIClient'))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert done.stdout.split() == ["True", "True"]


@pytest.mark.docker
def test_gpu_request_reaches_the_daemon(docker_ready: str) -> None:
    """No GPU here: the create request the daemon stored is inspected instead."""
    engine = DockerEngine()
    request = ContainerRequest(
        image=docker_ready, environment={"A": "1"}, gpus=2, user="10001:10001", command=("true",)
    )
    container = engine.create(request)
    try:
        host = engine.inspect_container(container)["HostConfig"]
    finally:
        engine.remove(container)
    (device,) = host["DeviceRequests"]
    assert device["Count"] == 2 and device["Capabilities"] == [["gpu"]]
    assert host["CapDrop"] == ["ALL"] and host["SecurityOpt"] == ["no-new-privileges"]
    assert host["NetworkMode"] == "none"


@pytest.mark.docker
def test_container_lifecycle_exit_code_and_logs(docker_ready: str) -> None:
    engine = DockerEngine()
    request = ContainerRequest(
        image=docker_ready,
        environment={},
        user="10001:10001",
        command=("sh", "-c", "id -u; echo two; exit 3"),
    )
    container = engine.create(request)
    try:
        engine.start(container)
        lines = list(engine.logs(container))
        code = engine.wait(container)
        state = engine.state(container)
    finally:
        engine.remove(container)
    assert lines == ["10001", "two"]
    assert code == 3 and state.exit_code == 3 and not state.oom_killed


@pytest.mark.docker
def test_pull_from_an_unreachable_registry_is_a_pull_error(docker_ready: str) -> None:
    """Nothing listens on the port: the daemon's refusal comes back as a PullError naming
    the reference, never an SDK traceback."""
    import socket

    with socket.socket() as probe:  # a loopback port that was free a moment ago
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    reference = f"127.0.0.1:{port}/qlc/absent@sha256:{'0' * 64}"
    with pytest.raises(PullError, match=rf"^cannot pull {re.escape(reference)}: "):
        DockerEngine().pull(reference)


@pytest.mark.docker
def test_pull_of_a_digest_the_registry_lacks_is_a_pull_error(
    docker_ready: str,
    local_registry: str,  # noqa: F811
) -> None:
    reference = f"{local_registry}/qlc/absent@sha256:{'0' * 64}"
    with pytest.raises(PullError, match=rf"^cannot pull {re.escape(reference)}: .*unknown"):
        DockerEngine().pull(reference)
