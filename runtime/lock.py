"""qlc lock: resolve a spec's training stack into a hash-locked requirements file.

Side effects live here: running the resolver (`uv pip compile`, behind the Resolver seam),
writing `specs/<stem>.lock` atomically, and asking a registry for a base image's digest
(behind the HttpClient seam) for `qlc lock --refresh-base`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from qlc.compiler import lockfile
from qlc.compiler.context import plan_spec
from qlc.compiler.load import Diagnostic, SpecError, read_spec_file
from qlc.compiler.lockfile import INDEX_URL, PLATFORM, LockError, parse_lock
from qlc.compiler.plan import BaseImage, Plan
from qlc.userio import UnreadableFile, os_reason, read_optional_user_file


class LockFailure(RuntimeError):
    """The resolver or the registry could not do its part; the message says why and what next."""


class Resolver(Protocol):
    def compile(self, requirements: Sequence[str], python: str, platform: str) -> str:
        """Return hash-locked requirements text (no header) for the given top-level pins."""
        ...


def find_uv() -> str:
    """uv from qlc's own environment (pip puts it beside the interpreter, which need not be on
    PATH, e.g. `.venv/bin/qlc lock`), else the one on PATH."""
    return shutil.which("uv", path=str(Path(sys.executable).parent)) or "uv"


@dataclass(frozen=True)
class UvResolver:
    """`uv pip compile --generate-hashes` against PyPI only (no user or machine uv config)."""

    uv: str = field(default_factory=find_uv)
    index_url: str = INDEX_URL
    timeout_s: float = 600.0

    def command(self, python: str, platform: str) -> list[str]:
        return [
            self.uv, "pip", "compile", "-", "--generate-hashes", "--no-header",
            "--no-config", "--python-version", python, "--python-platform", platform,
            "--index-url", self.index_url, "--quiet",
        ]  # fmt: skip

    def compile(self, requirements: Sequence[str], python: str, platform: str) -> str:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("UV_INDEX", "UV_EXTRA"))}
        try:
            done = subprocess.run(
                self.command(python, platform),
                input="\n".join(requirements) + "\n",
                capture_output=True,
                text=True,
                timeout=self.timeout_s,
                env=env,
                check=False,
            )
        except FileNotFoundError:
            raise LockFailure(f"{self.uv!r} not found: install uv (pip install uv)") from None
        except subprocess.TimeoutExpired:
            raise LockFailure(f"uv pip compile took over {self.timeout_s:.0f} s") from None
        if done.returncode != 0:
            raise LockFailure(f"uv pip compile failed (exit {done.returncode}):\n"
                              f"{done.stderr.strip()}")  # fmt: skip
        return done.stdout


def lock_path_for(spec_path: Path) -> Path:
    """specs/guanaco.toml -> specs/guanaco.lock."""
    return spec_path.with_suffix(".lock")


def plan_for(spec_path: Path) -> Plan:
    """Load and resolve a spec; SpecError (with FILE:LINE:COL) for anything the user must fix."""
    return plan_spec(read_spec_file(spec_path), str(spec_path))[0]


def lock_text(plan: Plan, resolver: Resolver) -> str:
    """The full lock text for a plan: qlc header + the resolver's hash-locked output."""
    stack, python = plan.stack, plan.stack.python
    body = resolver.compile(stack.requirements(), python, PLATFORM)
    text = lockfile.lock_text(stack, python, PLATFORM, body)
    try:
        parse_lock(text)
    except LockError as err:
        raise LockFailure(f"the resolver's output is not a valid qlc lock: {err}") from None
    return text


def write_atomically(path: Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, fsync, then rename over it."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def lock_spec(spec_path: Path, resolver: Resolver | None = None) -> Path:
    """Resolve the spec's stack and write `<spec stem>.lock` beside it; return its path."""
    plan = plan_for(spec_path)
    target = lock_path_for(spec_path)
    check_lock_target(target)  # before the resolver's minutes
    text = lock_text(plan, resolver or UvResolver())
    try:
        write_atomically(target, text.encode("utf-8"))
    except OSError as err:
        raise SpecError([Diagnostic(str(target), 1, 1, "", f"cannot write the lock there: "
                                    f"{os_reason(err)}")]) from None  # fmt: skip
    return target


def check_lock_target(target: Path) -> None:
    """qlc lock replaces a lock qlc wrote, never another file, and only where it can write:
    a SpecError naming the file otherwise (checked before the resolver's minutes)."""
    try:
        existing = read_optional_user_file(target, lockfile.MAX_LOCK_BYTES)
    except UnreadableFile as err:
        problem = f"{err.reason}; qlc lock writes the lock here: move it away"
        raise SpecError([Diagnostic(str(target), 1, 1, "", problem)]) from None
    if existing is not None and not existing.startswith(lockfile.INPUT_HEADER.encode()):
        problem = (
            f"not a lock qlc wrote (it does not start with {lockfile.INPUT_HEADER.strip()!r}); "
            "qlc lock replaces only its own locks: move it away"
        )
        raise SpecError([Diagnostic(str(target), 1, 1, "", problem)])
    try:
        with tempfile.TemporaryFile(dir=target.parent):
            pass
    except OSError as err:
        problem = f"cannot write the lock there: {os_reason(err)}"
        raise SpecError([Diagnostic(str(target), 1, 1, "", problem)]) from None


# --- base image digests from a Docker Registry v2 API ---------------------------------------

MANIFEST_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
)
DOCKER_HUB = "https://registry-1.docker.io"


@dataclass(frozen=True)
class HttpResponse:
    status: int
    headers: Mapping[str, str]
    body: bytes


class HttpClient(Protocol):
    def request(self, method: str, url: str, headers: Mapping[str, str]) -> HttpResponse: ...


@dataclass(frozen=True)
class UrllibClient:
    timeout_s: float = 10.0

    def request(self, method: str, url: str, headers: Mapping[str, str]) -> HttpResponse:
        req = urllib.request.Request(url, method=method, headers=dict(headers))
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                return HttpResponse(resp.status, dict(resp.headers.items()), resp.read())
        except urllib.error.HTTPError as err:
            return HttpResponse(err.code, dict(err.headers.items()), err.read())


def registry_path(repository: str) -> str:
    """Docker Hub's official images live under library/: 'python' -> 'library/python'."""
    return repository if "/" in repository else f"library/{repository}"


def _bearer_token(challenge: str, client: HttpClient) -> str:
    params = dict(re.findall(r'(\w+)="([^"]*)"', challenge))
    realm = params.pop("realm", "")
    if not challenge.lower().startswith("bearer") or not realm:
        raise LockFailure(f"registry asked for unsupported authentication: {challenge!r}")
    url = realm + "?" + urllib.parse.urlencode(sorted(params.items()))
    resp = client.request("GET", url, {})
    if resp.status != 200:
        raise LockFailure(f"registry token request failed: HTTP {resp.status} from {realm}")
    data = json.loads(resp.body or b"{}")
    token = data.get("token") or data.get("access_token")
    if not isinstance(token, str):
        raise LockFailure(f"registry token response from {realm} has no token")
    return token


def _header(headers: Mapping[str, str], name: str) -> str | None:
    return next((v for k, v in headers.items() if k.lower() == name.lower()), None)


def resolve_image_digest(
    repository: str, tag: str, *, registry: str = DOCKER_HUB, client: HttpClient | None = None
) -> str:
    """HEAD /v2/<repo>/manifests/<tag>: the tag's current digest ('sha256:...')."""
    http = client or UrllibClient()
    url = f"{registry.rstrip('/')}/v2/{registry_path(repository)}/manifests/{tag}"
    headers = {"Accept": ", ".join(MANIFEST_TYPES)}
    where = f"{repository}:{tag} at {registry}"
    try:
        resp = http.request("HEAD", url, headers)
        challenge = _header(resp.headers, "WWW-Authenticate")
        if resp.status == 401 and challenge:
            headers["Authorization"] = "Bearer " + _bearer_token(challenge, http)
            resp = http.request("HEAD", url, headers)
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise LockFailure(f"cannot reach the registry for {where}: {reason}; the digest in "
                          "qlc's compatibility table stays unverified") from None  # fmt: skip
    if resp.status != 200:
        raise LockFailure(f"registry answered HTTP {resp.status} for {where}")
    digest = _header(resp.headers, "Docker-Content-Digest") or ""
    if not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
        raise LockFailure(f"registry sent no usable Docker-Content-Digest for {where}")
    return digest


def check_base_image(
    image: BaseImage, *, registry: str = DOCKER_HUB, client: HttpClient | None = None
) -> str:
    """Compare the pinned digest with the registry's; return the registry's digest.

    A mismatch means the tag moved: update the digest in tools/regen_compat.py, regenerate
    compiler/data/compat.toml, and re-lock.
    """
    current = resolve_image_digest(image.repository, image.tag, registry=registry, client=client)
    if current != image.digest:
        raise LockFailure(
            f"{image.repository}:{image.tag} now resolves to {current}, but qlc pins "
            f"{image.digest}: update tools/regen_compat.py and run it"
        )
    return current
