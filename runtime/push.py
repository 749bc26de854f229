"""Push a built image to a registry and learn the digest it is stored under.

`push(image_tag, registry)` tags the local image as REGISTRY:<tag>, pushes it through the
Docker daemon (which authenticates with the standard Docker credential configuration,
~/.docker/config.json and its credential helpers; qlc never reads, prints or stores
credentials), and returns the pushed reference `REGISTRY@sha256:...` read from the push
stream and confirmed by the registry's own answer (distribution inspect). `push_build` also
records it in the job's build record, so `qlc export` and later runs use the digest.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from qlc.runtime import records

REGISTRY_REPO = re.compile(
    r"^(?P<host>[a-z0-9]([a-z0-9.-]*[a-z0-9])?(:\d{1,5})?)"
    r"(?P<path>(/[a-z0-9]+([._-][a-z0-9]+)*)+)$"
)
DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")


class PushError(Exception):
    """A push that failed or was refused, worded for people."""


class Pusher(Protocol):
    """The registry seam: what push needs from a container engine."""

    def tag(self, image: str, repository: str, tag: str) -> None: ...
    def push(self, repository: str, tag: str) -> Iterator[dict[str, Any]]: ...
    def registry_digest(self, reference: str) -> str: ...


@dataclass(frozen=True)
class PushResult:
    pushed_tag: str  # REGISTRY:<tag>, the name the image was pushed as
    reference: str  # REGISTRY@sha256:..., what job files and manifests pin
    digest: str  # sha256:...


class DockerPusher:
    """The docker SDK against DOCKER_HOST or the local socket."""

    def __init__(self, base_url: str | None = None, timeout_s: int = 600) -> None:
        from qlc.runtime.docker_engine import DockerEngine, docker_sdk

        endpoint = DockerEngine(base_url).endpoint
        sdk = docker_sdk()
        self._errors = sdk.errors
        self._api = sdk.APIClient(base_url=endpoint, timeout=timeout_s, version="auto")

    def tag(self, image: str, repository: str, tag: str) -> None:
        try:
            self._api.tag(image, repository, tag=tag)
        except self._errors.ImageNotFound:
            raise PushError(
                f"no local image {image}: build it first with `qlc build SPEC`"
            ) from None
        except self._errors.APIError as error:
            raise PushError(
                f"cannot tag {image} as {repository}:{tag}: {error.explanation}"
            ) from None

    def push(self, repository: str, tag: str) -> Iterator[dict[str, Any]]:
        # auth_config=None: the SDK and daemon use the standard Docker credential config.
        try:
            yield from self._api.push(repository, tag=tag, stream=True, decode=True)
        except self._errors.DockerException as error:
            raise PushError(f"push of {repository}:{tag} failed: {error}") from None

    def registry_digest(self, reference: str) -> str:
        try:
            data = self._api.inspect_distribution(reference)
        except self._errors.APIError as error:
            raise PushError(
                f"the registry does not show {reference}: {error.explanation}"
            ) from None
        return str(data["Descriptor"]["digest"])


def check_registry(registry: str) -> str:
    """HOST[:PORT]/REPO..., without a scheme, tag or digest."""
    cleaned = registry.strip().rstrip("/")
    if "://" in cleaned:
        raise PushError(f"--registry {registry!r}: give HOST/REPO without a scheme")
    if "@" in cleaned or ":" in cleaned.rsplit("/", 1)[-1]:
        raise PushError(f"--registry {registry!r}: give HOST/REPO without a tag or digest")
    if REGISTRY_REPO.fullmatch(cleaned) is None:
        raise PushError(
            f"--registry {registry!r} is not HOST[:PORT]/REPO (lowercase letters, digits, "
            "'.', '_', '-'), e.g. ghcr.io/acme/qlc or 127.0.0.1:5000/qlc/tiny"
        )
    return cleaned


def push(image_tag: str, registry: str, pusher: Pusher | None = None) -> PushResult:
    """Push local `image_tag` (repo:tag) to `registry` (HOST/REPO); return where it landed."""
    repository = check_registry(registry)
    tag = image_tag.rsplit(":", 1)[1] if ":" in image_tag.rsplit("/", 1)[-1] else "latest"
    engine = pusher if pusher is not None else DockerPusher()
    engine.tag(image_tag, repository, tag)
    streamed = digest_from_stream(engine.push(repository, tag), f"{repository}:{tag}")
    confirmed = engine.registry_digest(f"{repository}:{tag}")
    if confirmed != streamed:
        raise PushError(
            f"the push reported {streamed} but the registry holds {confirmed} for "
            f"{repository}:{tag}: another push raced this one; push again"
        )
    return PushResult(f"{repository}:{tag}", f"{repository}@{streamed}", streamed)


def digest_from_stream(events: Iterator[dict[str, Any]], target: str) -> str:
    """The digest the daemon reports at the end of a push; the first error fails it."""
    digest = None
    for event in events:
        if "error" in event:
            detail = str(event.get("error") or event.get("errorDetail", {}).get("message"))
            raise PushError(f"push of {target} failed: {detail}{login_hint(detail, target)}")
        aux = event.get("aux")
        if isinstance(aux, dict) and DIGEST.fullmatch(str(aux.get("Digest", ""))):
            digest = str(aux["Digest"])
    if digest is None:
        raise PushError(f"push of {target} ended without reporting a digest")
    return digest


def login_hint(detail: str, target: str) -> str:
    words = ("unauthorized", "denied", "authentication required", "no basic auth")
    if any(word in detail.lower() for word in words):
        host = target.split("/", 1)[0]
        return f" (log in with `docker login {host}`; qlc uses Docker's credential config)"
    return ""


def push_build(
    project_dir: Path, job: str, registry: str, pusher: Pusher | None = None
) -> tuple[records.BuildRecord, PushResult]:
    """Push the latest build of `job` and record the registry digest in its build record."""
    record = records.job_build(project_dir, job)
    if record is None:
        raise PushError(f"no build of job {job!r} in {project_dir}: run `qlc build SPEC` first")
    result = push(record.tag, registry, pusher)
    # registry_digest holds the full REGISTRY@sha256:... reference: what runs pass as
    # QLC_IMAGE_DIGEST and what `qlc export` pins; pushed_ref the tag it was pushed as.
    updated = records.record_push(project_dir, job, result.pushed_tag, result.reference)
    return updated, result
