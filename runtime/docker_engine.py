"""The Docker seam: a small Protocol over the daemon, and the real docker-SDK implementation.

Everything else in the runtime talks to `Engine`, so unit tests stand in a fake and the
integration tests use a real daemon. Requests are plain dataclasses; `host_config_kwargs`
turns one into what the SDK sends, so the GPU request can be checked without a GPU.
"""

from __future__ import annotations

import contextlib
import io
import os
import tarfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Protocol

DEFAULT_ENDPOINT = "unix:///var/run/docker.sock"
START_HINT = (
    "start it with `sudo dockerd &` (or `sudo systemctl start docker`; in this repository "
    "`.ci/docker.sh` installs and starts it), or point DOCKER_HOST at a running daemon"
)


class EngineError(Exception):
    """A failure talking to the container engine, worded for people."""


class DaemonUnreachable(EngineError):
    def __init__(self, endpoint: str, cause: str) -> None:
        super().__init__(f"Docker daemon not reachable at {endpoint}: {START_HINT} ({cause})")
        self.endpoint = endpoint


class PullError(EngineError):
    """A pull the registry or daemon refused (unreachable, unknown digest, denied)."""


class BuildError(EngineError):
    """The daemon reported an error while building; `log_tail` holds the last log lines."""

    def __init__(self, message: str, log_tail: list[str]) -> None:
        super().__init__(message)
        self.message = message
        self.log_tail = log_tail


@dataclass(frozen=True)
class Mount:
    source: str
    target: str
    read_only: bool = True


@dataclass(frozen=True)
class ContainerRequest:
    image: str
    environment: Mapping[str, str]
    mounts: tuple[Mount, ...] = ()
    gpus: int = 0  # 0: none, -1: all, n: that many
    shm_size: str = "64m"
    network: str = "none"
    user: str | None = None
    command: tuple[str, ...] | None = None
    working_dir: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    name: str | None = None
    aliases: tuple[str, ...] = ()  # names it answers to on a user-defined network
    cap_drop: tuple[str, ...] = ("ALL",)
    security_opt: tuple[str, ...] = ("no-new-privileges",)
    tmpfs: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ImageInfo:
    id: str
    tags: tuple[str, ...]
    labels: Mapping[str, str]
    repo_digests: tuple[str, ...]
    user: str


@dataclass(frozen=True)
class ContainerState:
    status: str
    exit_code: int | None
    oom_killed: bool
    error: str
    started_at: str | None
    finished_at: str | None


class Engine(Protocol):
    endpoint: str

    def ping(self) -> None: ...
    def find_image(self, ref: str) -> ImageInfo | None: ...
    def pull(self, reference: str) -> ImageInfo: ...
    def tag(self, image: str, repository: str, tag: str) -> None: ...
    def build(
        self,
        files: Mapping[str, bytes],
        tag: str,
        buildargs: Mapping[str, str],
        labels: Mapping[str, str],
        on_line: Callable[[str], None],
    ) -> str: ...
    def create(self, request: ContainerRequest) -> str: ...
    def start(self, container_id: str) -> None: ...
    def logs(self, container_id: str) -> Iterator[str]: ...
    def wait(self, container_id: str) -> int: ...
    def stop(self, container_id: str, timeout_s: int) -> None: ...
    def kill(self, container_id: str, signal: str = "SIGKILL") -> None: ...
    def state(self, container_id: str) -> ContainerState: ...
    def remove(self, container_id: str) -> None: ...
    def create_network(self, name: str, labels: Mapping[str, str]) -> str: ...
    def remove_network(self, network_id: str) -> None: ...


def device_requests(gpus: int) -> list[dict[str, Any]]:
    """The GPU request for the daemon: none for CPU, count -1 for all GPUs."""
    if gpus == 0:
        return []
    return [
        {"Driver": "", "Count": gpus, "DeviceIDs": None, "Capabilities": [["gpu"]], "Options": {}}
    ]


def host_config_kwargs(request: ContainerRequest) -> dict[str, Any]:
    """Keyword arguments for the SDK's create_host_config: mounts, GPUs, isolation."""
    mounts = [
        {"Target": m.target, "Source": m.source, "Type": "bind", "ReadOnly": m.read_only}
        for m in request.mounts
    ]
    return {
        "mounts": mounts,
        "device_requests": device_requests(request.gpus),
        "shm_size": request.shm_size,
        "network_mode": request.network,
        "cap_drop": list(request.cap_drop),
        "security_opt": list(request.security_opt),
        "tmpfs": dict(request.tmpfs),
        "auto_remove": False,
    }


def docker_sdk() -> ModuleType:
    """The docker SDK, imported lazily (qlc validate/compile never need it)."""
    try:
        import docker
    except ImportError:
        raise EngineError(
            "the docker Python SDK is not installed: pip install 'docker>=7.1'"
        ) from None
    return docker


class DockerEngine:
    """The real engine: the docker SDK's low-level client against DOCKER_HOST or the socket."""

    def __init__(self, base_url: str | None = None, timeout_s: int = 60) -> None:
        self.endpoint = base_url or os.environ.get("DOCKER_HOST") or DEFAULT_ENDPOINT
        sdk = docker_sdk()
        self._errors = sdk.errors
        try:
            self._api = sdk.APIClient(base_url=self.endpoint, timeout=timeout_s, version="auto")
        except Exception as error:  # the SDK raises DockerException on version negotiation
            raise DaemonUnreachable(self.endpoint, _short(error)) from None

    def ping(self) -> None:
        try:
            self._api.ping()
        except Exception as error:
            raise DaemonUnreachable(self.endpoint, _short(error)) from None

    def find_image(self, ref: str) -> ImageInfo | None:
        if not ref.strip():
            return None
        try:
            data = self._api.inspect_image(ref)
        except self._errors.ImageNotFound:
            return None
        except self._errors.APIError as error:
            if error.status_code == 404:
                return None
            raise EngineError(f"cannot inspect image {ref!r}: {_short(error)}") from None
        except self._errors.DockerException as error:  # e.g. NullResource, bad reference
            raise EngineError(f"cannot inspect image {ref!r}: {_short(error)}") from None
        return image_info(data)

    def pull(self, reference: str) -> ImageInfo:
        """Pull REPO@sha256:... (Docker's credential config authenticates); return the image."""
        try:
            for event in self._api.pull(reference, stream=True, decode=True):
                if "error" in event:
                    detail = event.get("errorDetail", {}).get("message") or event["error"]
                    raise PullError(f"cannot pull {reference}: {_short(Exception(detail))}")
            data = self._api.inspect_image(reference)
        except self._errors.APIError as error:  # the daemon's words, without the SDK's URL
            cause = error.explanation or str(error)
            raise PullError(f"cannot pull {reference}: {_short(Exception(cause))}") from None
        except self._errors.DockerException as error:
            raise PullError(f"cannot pull {reference}: {_short(error)}") from None
        except OSError as error:  # the connection to the daemon broke mid-stream
            raise PullError(f"cannot pull {reference}: {_short(error)}") from None
        return image_info(data)

    def tag(self, image: str, repository: str, tag: str) -> None:
        try:
            self._api.tag(image, repository, tag=tag)
        except self._errors.DockerException as error:
            raise EngineError(
                f"cannot tag {image} as {repository}:{tag}: {_short(error)}"
            ) from None

    def build(
        self,
        files: Mapping[str, bytes],
        tag: str,
        buildargs: Mapping[str, str],
        labels: Mapping[str, str],
        on_line: Callable[[str], None],
    ) -> str:
        """Build from the given bytes (sent as one in-memory tar), never from a folder that
        could change between a check and the daemon reading it."""
        stream = self._api.build(
            fileobj=io.BytesIO(context_tar(files)),
            custom_context=True,
            encoding=None,
            tag=tag,
            buildargs=dict(buildargs),
            labels=dict(labels),
            rm=True,
            forcerm=True,
            decode=True,
            pull=False,
            timeout=None,
        )
        return _follow_build(stream, on_line)

    def create(self, request: ContainerRequest) -> str:
        host_config = self._api.create_host_config(**host_config_kwargs(request))
        try:
            created = self._api.create_container(
                image=request.image,
                command=list(request.command) if request.command else None,
                user=request.user,
                environment=dict(request.environment),
                working_dir=request.working_dir,
                labels=dict(request.labels),
                name=request.name,
                host_config=host_config,
                network_disabled=request.network == "none",
                networking_config=self._networking(request),
            )
        except self._errors.APIError as error:
            raise EngineError(
                f"cannot create a container from {request.image}: {_short(error)}"
            ) from None
        return str(created["Id"])

    def _networking(self, request: ContainerRequest) -> dict[str, Any] | None:
        """The names a container answers to on its user-defined network (none elsewhere)."""
        if not request.aliases:
            return None
        endpoint = self._api.create_endpoint_config(aliases=list(request.aliases))
        config: dict[str, Any] = self._api.create_networking_config({request.network: endpoint})
        return config

    def start(self, container_id: str) -> None:
        try:
            self._api.start(container_id)
        except self._errors.APIError as error:
            raise EngineError(f"the container did not start: {_short(error)}") from None

    def logs(self, container_id: str) -> Iterator[str]:
        chunks = self._api.logs(container_id, stdout=True, stderr=True, stream=True, follow=True)
        yield from split_lines(chunks)

    def wait(self, container_id: str) -> int:
        return int(self._api.wait(container_id, timeout=None)["StatusCode"])

    def stop(self, container_id: str, timeout_s: int) -> None:
        self._api.stop(container_id, timeout=timeout_s)

    def kill(self, container_id: str, signal: str = "SIGKILL") -> None:
        self._api.kill(container_id, signal=signal)

    def state(self, container_id: str) -> ContainerState:
        state = self._api.inspect_container(container_id)["State"]
        return ContainerState(
            status=state.get("Status", ""),
            exit_code=state.get("ExitCode"),
            oom_killed=bool(state.get("OOMKilled")),
            error=state.get("Error") or "",
            started_at=state.get("StartedAt"),
            finished_at=state.get("FinishedAt"),
        )

    def remove(self, container_id: str) -> None:
        with contextlib.suppress(self._errors.NotFound):
            self._api.remove_container(container_id, force=True, v=True)

    def create_network(self, name: str, labels: Mapping[str, str]) -> str:
        """A user-defined bridge network (its containers find each other by name)."""
        try:
            created = self._api.create_network(name, driver="bridge", labels=dict(labels))
        except self._errors.APIError as error:
            raise EngineError(f"cannot create network {name!r}: {_short(error)}") from None
        return str(created["Id"])

    def remove_network(self, network_id: str) -> None:
        with contextlib.suppress(self._errors.NotFound):
            self._api.remove_network(network_id)

    def inspect_container(self, container_id: str) -> dict[str, Any]:
        return dict(self._api.inspect_container(container_id))


def image_info(data: Mapping[str, Any]) -> ImageInfo:
    """The parts of `docker image inspect` the runtime reads."""
    config = data.get("Config") or {}
    return ImageInfo(
        id=data["Id"],
        tags=tuple(data.get("RepoTags") or ()),
        labels=dict(config.get("Labels") or {}),
        repo_digests=tuple(data.get("RepoDigests") or ()),
        user=config.get("User") or "",
    )


def context_tar(files: Mapping[str, bytes]) -> bytes:
    """An uncompressed tar of the files, byte-identical for identical files: sorted names,
    fixed mtime, owner and mode."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for name in sorted(files):
            data = files[name]
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _follow_build(stream: Iterator[dict[str, Any]], on_line: Callable[[str], None]) -> str:
    """Feed every log line to on_line; return the image id or raise BuildError."""
    image_id = ""
    tail: list[str] = []
    for chunk in stream:
        if "error" in chunk:
            message = str(chunk.get("errorDetail", {}).get("message") or chunk["error"]).strip()
            on_line(message)
            raise BuildError(message, tail[-40:])
        aux = chunk.get("aux")
        if isinstance(aux, dict) and aux.get("ID"):
            image_id = str(aux["ID"])
        text = chunk.get("stream") or chunk.get("status") or ""
        for line in str(text).splitlines():
            if line.strip():
                tail.append(line)
                del tail[:-200]
                on_line(line)
    if not image_id:
        raise BuildError("the daemon finished the build without reporting an image id", tail)
    return image_id


def split_lines(chunks: Iterator[bytes]) -> Iterator[str]:
    """Bytes chunks -> text lines (chunks split lines anywhere, even inside UTF-8)."""
    pending = b""
    for chunk in chunks:
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            yield line.decode("utf-8", "replace").rstrip("\r")
    if pending:
        yield pending.decode("utf-8", "replace").rstrip("\r")


def _short(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text if len(text) <= 300 else text[:297] + "..."
