"""qlc lock: resolver seam, atomic lock writing, registry digests against a local fake."""

from __future__ import annotations

import json
import shutil
import threading
from collections.abc import Iterator, Sequence
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from qlc.compiler.lockfile import PLATFORM, check_lock, lock_input_hash
from qlc.compiler.plan import BaseImage
from qlc.runtime.lock import (
    LockFailure,
    UvResolver,
    check_base_image,
    find_uv,
    lock_spec,
    plan_for,
    registry_path,
    resolve_image_digest,
)

SPECS = Path(__file__).resolve().parents[2] / "specs"
DIGEST = "sha256:" + "c" * 64
HASH = "d" * 64


class FakeResolver:
    def __init__(self, body: str | None = None) -> None:
        self.calls: list[tuple[list[str], str, str]] = []
        self.body = body

    def compile(self, requirements: Sequence[str], python: str, platform: str) -> str:
        self.calls.append((list(requirements), python, platform))
        if self.body is not None:
            return self.body
        return "".join(f"{r} \\\n    --hash=sha256:{HASH}\n" for r in requirements)


@pytest.fixture
def spec_copy(tmp_path: Path) -> Path:
    target = tmp_path / "tiny.toml"
    shutil.copy(SPECS / "tiny.toml", target)
    return target


def test_lock_spec_writes_a_fresh_lock_beside_the_spec(spec_copy: Path) -> None:
    resolver = FakeResolver()
    path = lock_spec(spec_copy, resolver)
    assert path == spec_copy.with_suffix(".lock")
    plan = plan_for(spec_copy)
    assert resolver.calls == [(plan.stack.requirements(), "3.11", PLATFORM)]
    expected = lock_input_hash(plan.stack, plan.stack.python, PLATFORM)
    lock = check_lock(path.read_bytes(), expected)
    assert [r.pin for r in lock.requirements] == plan.stack.requirements()
    assert sorted(p.name for p in spec_copy.parent.iterdir()) == ["tiny.lock", "tiny.toml"]


def test_lock_spec_replaces_a_lock_qlc_wrote(spec_copy: Path) -> None:
    lock_spec(spec_copy, FakeResolver())
    first = spec_copy.with_suffix(".lock").read_bytes()
    lock_spec(spec_copy, FakeResolver(body="six==1.17.0 \\\n    --hash=sha256:" + HASH + "\n"))
    assert spec_copy.with_suffix(".lock").read_bytes() != first


@pytest.mark.parametrize("kind", ["a file of the person's", "a folder", "a FIFO"])
def test_lock_spec_leaves_what_qlc_did_not_write_and_resolves_nothing(
    spec_copy: Path, kind: str
) -> None:
    """Was: a person's own tiny.lock replaced (a folder: a traceback), after minutes of
    resolving."""
    import os

    from qlc.compiler.load import SpecError

    target = spec_copy.with_suffix(".lock")
    if kind == "a folder":
        target.mkdir()
        (target / "inside.txt").write_text("mine\n")
    elif kind == "a FIFO":
        os.mkfifo(target)
    else:
        target.write_text("numpy==2.0\n")
    resolver = FakeResolver()
    with pytest.raises(SpecError, match=r"tiny\.lock:1:1: .*move it away"):
        lock_spec(spec_copy, resolver)
    assert resolver.calls == []
    if kind == "a folder":
        assert (target / "inside.txt").read_text() == "mine\n"
    elif kind != "a FIFO":
        assert target.read_text() == "numpy==2.0\n"


def test_invalid_resolver_output_fails_and_keeps_the_old_lock(spec_copy: Path) -> None:
    old = lock_spec(spec_copy, FakeResolver())
    previous = old.read_bytes()
    with pytest.raises(LockFailure, match=r"not a valid qlc lock.*no --hash"):
        lock_spec(spec_copy, FakeResolver(body="torch==2.13.0\n"))
    assert old.read_bytes() == previous
    assert sorted(p.name for p in spec_copy.parent.iterdir()) == ["tiny.lock", "tiny.toml"]


def test_uv_resolver_command_pins_python_platform_and_index() -> None:
    command = UvResolver(uv="uv").command("3.12", PLATFORM)
    assert command[:4] == ["uv", "pip", "compile", "-"]
    for flag, value in [("--python-version", "3.12"), ("--python-platform", PLATFORM),
                        ("--index-url", "https://pypi.org/simple")]:  # fmt: skip
        assert command[command.index(flag) + 1] == value
    assert "--generate-hashes" in command and "--no-header" in command


def test_uv_resolver_reports_missing_uv_and_failures(tmp_path: Path) -> None:
    with pytest.raises(LockFailure, match="not found: install uv"):
        UvResolver(uv=str(tmp_path / "no-uv")).compile(["torch==2.13.0"], "3.12", PLATFORM)
    failing = tmp_path / "uv"
    failing.write_text("#!/bin/sh\necho 'No solution found' >&2\nexit 1\n")
    failing.chmod(0o755)
    with pytest.raises(LockFailure, match=r"exit 1\):\nNo solution found"):
        UvResolver(uv=str(failing)).compile(["torch==2.13.0"], "3.12", PLATFORM)


class FakeRegistry(BaseHTTPRequestHandler):
    """Docker Hub's shape: 401 + Bearer challenge, a token endpoint, HEAD on manifests."""

    seen: list[dict[str, str]] = []  # noqa: RUF012

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        if not self.path.startswith("/token?"):
            self.send_response(404)
            self.end_headers()
            return
        body = json.dumps({"token": "tok"}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_HEAD(self) -> None:
        FakeRegistry.seen.append({"path": self.path, **dict(self.headers.items())})
        host = f"http://127.0.0.1:{self.server.server_address[1]}"
        if self.headers.get("Authorization") != "Bearer tok":
            self.send_response(401)
            challenge = f'Bearer realm="{host}/token",service="fake",scope="repository:x:pull"'
            self.send_header("WWW-Authenticate", challenge)
        elif self.path == "/v2/library/python/manifests/3.11-slim-bookworm":
            self.send_response(200)
            self.send_header("Docker-Content-Digest", DIGEST)
        else:
            self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()


@pytest.fixture
def registry() -> Iterator[str]:
    server = HTTPServer(("127.0.0.1", 0), FakeRegistry)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    FakeRegistry.seen = []
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_digest_from_registry_with_token_auth(registry: str) -> None:
    assert resolve_image_digest("python", "3.11-slim-bookworm", registry=registry) == DIGEST
    first, second = FakeRegistry.seen
    assert "Authorization" not in first and second["Authorization"] == "Bearer tok"
    assert "application/vnd.oci.image.index.v1+json" in second["Accept"]
    assert "application/vnd.docker.distribution.manifest.list.v2+json" in second["Accept"]


def test_unknown_tag_is_a_clear_failure(registry: str) -> None:
    with pytest.raises(LockFailure, match="HTTP 404 for python:nope"):
        resolve_image_digest("python", "nope", registry=registry)


def image(digest: str) -> BaseImage:
    return BaseImage(repository="python", tag="3.11-slim-bookworm", digest=digest,
                     verified=False, source="test", python="3.11")  # fmt: skip


def test_check_base_image_matches_or_names_the_fix(registry: str) -> None:
    assert check_base_image(image(DIGEST), registry=registry) == DIGEST
    with pytest.raises(LockFailure, match=r"now resolves to .* update tools/regen_compat.py"):
        check_base_image(image("sha256:" + "e" * 64), registry=registry)


def test_unreachable_registry_fails_clearly() -> None:
    server = HTTPServer(("127.0.0.1", 0), FakeRegistry)
    port = server.server_address[1]
    server.server_close()  # nothing listens there now
    with pytest.raises(LockFailure, match=r"cannot reach the registry .* stays unverified"):
        resolve_image_digest("nvidia/cuda", "13.0.1-runtime-ubuntu24.04",
                             registry=f"http://127.0.0.1:{port}")  # fmt: skip


def test_official_images_live_under_library() -> None:
    assert registry_path("python") == "library/python"
    assert registry_path("nvidia/cuda") == "nvidia/cuda"


@pytest.mark.skipif(shutil.which(find_uv()) is None, reason="uv is not installed")
def test_real_uv_resolves_a_small_requirement_with_hashes() -> None:
    # Talks to PyPI (reachable on developer machines and CI); one tiny pure-Python package.
    from qlc.compiler.lockfile import parse_lock

    body = UvResolver(timeout_s=120).compile(["six==1.17.0"], "3.11", PLATFORM)
    lock = parse_lock("# qlc-lock-input: sha256:" + "0" * 64 + "\n" + body)
    assert [r.pin for r in lock.requirements] == ["six==1.17.0"]
    assert lock.requirements[0].hashes


def test_cli_lock_writes_the_lock_and_maps_failures_to_exit_1(
    spec_copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    import qlc.runtime.lock as lock_module
    from qlc.cli import RunFailure, app

    monkeypatch.setattr(lock_module.UvResolver, "compile", FakeResolver().compile)
    done = CliRunner().invoke(app, ["lock", str(spec_copy)])
    assert done.exit_code == 0, done.output
    assert spec_copy.with_suffix(".lock").is_file() and "locked" in done.output

    def unreachable(image: BaseImage) -> str:
        raise LockFailure("cannot reach the registry")

    monkeypatch.setattr(lock_module, "check_base_image", unreachable)
    done = CliRunner().invoke(app, ["lock", "--refresh-base", str(spec_copy)])
    # RunFailure is what qlc.cli.main prints without a traceback and maps to exit 1.
    assert isinstance(done.exception, RunFailure)
    assert "cannot reach the registry" in str(done.exception)
