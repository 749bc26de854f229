"""Session fixtures every test folder shares: the Docker daemon and base image, the one image of
the locked training stack the suite builds, and the removal of what the suite built.

The suite builds FROM a session tag of the base image (`qlc-base:qlc-test-<id>`, the same image
as qlc-base:bookworm under a name of its own). qlc records the base it built FROM in every image
(label qlc.base-image), so the images this session built are exactly those labelled with its
tag: nothing else is ever removed. The stack layer (pip install of the lock, ~5.8 GB) is built
once, by `tiny_image`; every other image a test builds (another job name, a changed setting)
differs only after that step, so the daemon's build cache reuses it: one stack per session.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from suite_support import REPO, copy_tiny_project

from qlc.runtime.build import BASE_LABEL

BASE_IMAGE = os.environ.get("QLC_BASE_IMAGE", "qlc-base:bookworm")


def docker_api() -> Any:
    from qlc.runtime.docker_engine import docker_sdk

    return docker_sdk().APIClient(version="auto", timeout=900)  # removing the stack takes minutes


def session_tag(base: str) -> str:
    repository = base.rsplit(":", 1)[0] if ":" in base.rsplit("/", 1)[-1] else base
    return f"{repository}:qlc-test-{uuid.uuid4().hex[:12]}"


def ancestors(api: Any, image_id: str) -> list[str]:
    """The image's parent chain (local builds record it), nearest first."""
    chain = []
    parent = api.inspect_image(image_id).get("Parent") or ""
    while parent:
        chain.append(parent)
        parent = api.inspect_image(parent).get("Parent") or ""
    return chain


def remove_session_images(api: Any, tag: str, present_at_start: set[str]) -> list[str]:
    """Remove the images built FROM `tag`, then the untagged leftovers of this session's
    builds that hang under them (an interrupted build's steps), then the tag itself. Docker
    keeps every parent another image still needs (the base, a cache layer someone else uses)."""
    import docker.errors

    removed: list[str] = []
    try:
        built = [image["Id"] for image in api.images(filters={"label": f"{BASE_LABEL}={tag}"})]
        chain = {parent for image in built for parent in ancestors(api, image)}
        chain -= set(ancestors(api, tag)) | {api.inspect_image(tag)["Id"]}
        for image in built:
            with contextlib.suppress(docker.errors.NotFound):
                api.remove_image(image, force=True)  # its other names too (a pushed tag)
                removed.append(image)
        for image in api.images(filters={"dangling": True}):
            if image["Id"] in present_at_start or not chain & set(ancestors(api, image["Id"])):
                continue
            with contextlib.suppress(docker.errors.APIError):  # one in use stays
                api.remove_image(image["Id"])
                removed.append(image["Id"])
    finally:
        api.remove_image(tag, noprune=True)  # the name only: the base image stays
    return removed


@pytest.fixture(scope="session")
def docker_ready() -> Iterator[str]:
    """A daemon that answers and the offline base image, via the CI script (idempotent), under
    this session's own tag; what the session built FROM it is removed when the session ends."""
    script = REPO / ".ci" / "docker.sh"
    done = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        pytest.fail(f".ci/docker.sh failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    api = docker_api()
    present = {image["Id"] for image in api.images(all=True)}
    tag = session_tag(BASE_IMAGE)
    repository, name = tag.rsplit(":", 1)
    api.tag(BASE_IMAGE, repository, name)
    try:
        yield tag
    finally:
        removed = remove_session_images(api, tag, present)
        print(f"\nsession images removed: {len(removed)} (built FROM {tag})")


@pytest.fixture(scope="session")
def tiny_image(docker_ready: str, tmp_path_factory: pytest.TempPathFactory) -> object:
    """The tiny spec's image, built once per session: the one install of the locked stack
    (minutes) that every other image the tests build reuses from the build cache."""
    from qlc.runtime.build import build

    project = tmp_path_factory.mktemp("tiny-image")
    spec = copy_tiny_project(project)
    return build(spec, docker_ready, project_dir=project)
