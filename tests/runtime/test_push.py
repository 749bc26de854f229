"""qlc push: the push stream, refusals, the build record, and a real push to a local registry."""

from __future__ import annotations

import hashlib
import io
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from registry_fixture import local_registry  # noqa: F401  (pytest fixture)

from qlc.runtime import records
from qlc.runtime.push import PushError, check_registry, push, push_build

DIGEST = "sha256:" + hashlib.sha256(b"qlc-test-image").hexdigest()


class FakePusher:
    """Stands in for the daemon: records calls, replays a push stream."""

    def __init__(self, events: list[dict[str, Any]], registry_digest: str = DIGEST) -> None:
        self.events = events
        self.digest = registry_digest
        self.calls: list[tuple[str, ...]] = []

    def tag(self, image: str, repository: str, tag: str) -> None:
        self.calls.append(("tag", image, repository, tag))

    def push(self, repository: str, tag: str) -> Iterator[dict[str, Any]]:
        self.calls.append(("push", repository, tag))
        yield from self.events

    def registry_digest(self, reference: str) -> str:
        self.calls.append(("inspect", reference))
        return self.digest


def stream(digest: str = DIGEST) -> list[dict[str, Any]]:
    return [
        {"status": "The push refers to repository [ghcr.io/acme/qlc]"},
        {"status": "Pushed", "progressDetail": {}, "id": "0123abcd"},
        {"status": f"abc: digest: {digest} size: 528"},
        {"progressDetail": {}, "aux": {"Tag": "abc", "Digest": digest, "Size": 528}},
    ]


def test_push_tags_pushes_and_returns_the_digest_reference() -> None:
    fake = FakePusher(stream())
    result = push("qlc/tiny:abc", "ghcr.io/acme/qlc", fake)
    assert result.reference == f"ghcr.io/acme/qlc@{DIGEST}"
    assert result.pushed_tag == "ghcr.io/acme/qlc:abc"
    assert fake.calls == [
        ("tag", "qlc/tiny:abc", "ghcr.io/acme/qlc", "abc"),
        ("push", "ghcr.io/acme/qlc", "abc"),
        ("inspect", "ghcr.io/acme/qlc:abc"),
    ]


def test_push_error_event_fails_with_a_login_hint() -> None:
    fake = FakePusher([{"error": "unauthorized: authentication required",
                        "errorDetail": {"message": "unauthorized"}}])  # fmt: skip
    with pytest.raises(PushError, match=r"docker login ghcr\.io"):
        push("qlc/tiny:abc", "ghcr.io/acme/qlc", fake)


def test_push_without_a_digest_in_the_stream_fails() -> None:
    with pytest.raises(PushError, match="without reporting a digest"):
        push("qlc/tiny:abc", "ghcr.io/acme/qlc", FakePusher(stream()[:2]))


def test_push_refuses_when_the_registry_disagrees() -> None:
    other = "sha256:" + "0" * 64
    with pytest.raises(PushError, match="another push raced"):
        push("qlc/tiny:abc", "ghcr.io/acme/qlc", FakePusher(stream(), registry_digest=other))


@pytest.mark.parametrize(
    ("registry", "message"),
    [
        ("https://ghcr.io/acme/qlc", "without a scheme"),
        ("ghcr.io/acme/qlc:v1", "without a tag or digest"),
        (f"ghcr.io/acme/qlc@{DIGEST}", "without a tag or digest"),
        ("ghcr.io", "is not HOST"),
        ("ghcr.io/Acme/QLC", "is not HOST"),
    ],
)
def test_registry_must_be_host_and_repo(registry: str, message: str) -> None:
    with pytest.raises(PushError, match=message):
        check_registry(registry)
    assert check_registry("127.0.0.1:5000/qlc/tiny/") == "127.0.0.1:5000/qlc/tiny"


def build_record(tag: str, image_id: str) -> records.BuildRecord:
    return records.BuildRecord(
        job="tiny", tag=tag, image_id=image_id, image_key="k" * 12, context_hash="sha256:x",
        context_dir="/tmp/x", spec_path="/tmp/tiny.toml", spec_sha256="0" * 64,
        lock_sha256=None, base_image="qlc-base:bookworm", base_image_overridden=False,
        base_image_id=None, base_image_digests=[], qlc_version="0.1.0",
        built_at="2026-11-26T00:00:00Z", build_seconds=1.0, cache_hit=False, log_path=None,
    )  # fmt: skip


def test_push_build_records_the_digest(tmp_path: Path) -> None:
    records.save_build(tmp_path, build_record("qlc/tiny:abc", "sha256:" + "1" * 64))
    updated, result = push_build(tmp_path, "tiny", "ghcr.io/acme/qlc", FakePusher(stream()))
    assert updated.registry_digest == result.reference == f"ghcr.io/acme/qlc@{DIGEST}"
    assert records.last_build(tmp_path).registry_digest == result.reference
    assert records.job_build(tmp_path, "tiny") == updated


def test_push_build_without_a_build_says_how_to_fix(tmp_path: Path) -> None:
    with pytest.raises(PushError, match="run `qlc build SPEC` first"):
        push_build(tmp_path, "tiny", "ghcr.io/acme/qlc", FakePusher(stream()))


# --- real daemon, real registry --------------------------------------------------------------


def docker_api() -> Any:
    from qlc.runtime.docker_engine import DockerEngine, docker_sdk

    DockerEngine().ping()  # a clear error when no daemon answers
    return docker_sdk().APIClient(version="auto")


def build_tiny_image(api: Any, base: str, tag: str) -> str:
    dockerfile = (
        f"FROM {base}\n"
        f'LABEL qlc.test.push="{tag}"\n'
        'CMD ["/bin/sh", "-c", "echo qlc-pushed-image-ok"]\n'
    )
    for _ in api.build(fileobj=io.BytesIO(dockerfile.encode()), tag=tag, rm=True, decode=True):
        pass
    return str(api.inspect_image(tag)["Id"])


@pytest.mark.docker
def test_qlc_push_to_a_real_registry_then_pull_by_digest_and_run(
    docker_ready: str,
    local_registry: str,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from typer.testing import CliRunner

    from qlc.cli import app

    api = docker_api()
    local_tag = f"qlc-push-test:{uuid.uuid4().hex[:12]}"
    image_id = build_tiny_image(api, docker_ready, local_tag)
    records.save_build(tmp_path, build_record(local_tag, image_id))
    monkeypatch.chdir(tmp_path)
    repository = f"{local_registry}/qlc/push-test"
    done = CliRunner().invoke(app, ["push", "--registry", repository])
    assert done.exit_code == 0, done.output
    reference = records.last_build(tmp_path).registry_digest
    assert reference is not None and reference.startswith(f"{repository}@sha256:")
    assert reference in done.output
    # Forget every local name of the image, so the pull below must come from the registry.
    pushed_tag = records.last_build(tmp_path).pushed_ref
    for name in (local_tag, pushed_tag):
        api.remove_image(name, force=True)
    for _ in api.pull(reference, stream=True, decode=True):
        pass
    pulled = api.inspect_image(reference)
    assert reference in pulled["RepoDigests"] and pulled["Id"] == image_id
    container = api.create_container(reference)
    try:
        api.start(container)
        assert api.wait(container, timeout=60)["StatusCode"] == 0
        assert api.logs(container).decode().strip() == "qlc-pushed-image-ok"
    finally:
        api.remove_container(container, force=True)
        api.remove_image(reference, force=True)


def test_cli_finds_the_build_to_push(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from qlc.cli import UserError, build_to_push

    spec = tmp_path / "tiny.toml"
    spec.write_text(
        '[job]\nname = "tiny"\n[model]\nid = "a/b"\n[data]\nid = "c/d"\nformat = "text"\n',
        encoding="utf-8",
    )
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="is not built"):
        build_to_push(str(spec))
    records.save_build(tmp_path, build_record("qlc/tiny:abc", "sha256:" + "1" * 64))
    assert build_to_push(None) == ("qlc/tiny:abc", "tiny")
    assert build_to_push(str(spec)) == ("qlc/tiny:abc", "tiny")
    assert build_to_push("qlc/tiny:abc") == ("qlc/tiny:abc", "tiny")
    assert build_to_push("other/image:1") == ("other/image:1", None)
