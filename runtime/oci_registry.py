"""A small client for the OCI distribution API: blobs and manifests, by digest.

Only what pushing and pulling a qlc artifact needs (distribution spec v1.1): check a blob,
upload one monolithically (POST then PUT ?digest=), put and get a manifest, get a blob. Plain
HTTP for loopback registries (as Docker does), HTTPS elsewhere. Authentication follows the
registry's challenge: anonymous first, then a Bearer token (fetched from the realm the
registry names) or Basic, with the credentials of the Docker configuration's `auths` entry for
the host when there is one (~/.docker/config.json or $DOCKER_CONFIG; credential helpers are
not run). Credentials are never printed or stored by qlc.

`Registry` is the seam the artifact code uses, so unit tests can stand in for it; the
integration tests drive this client against Debian's docker-registry on loopback.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, Protocol

from qlc.runtime.push import DIGEST, REGISTRY_REPO

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
TIMEOUT_S = 60
CHUNK = 1 << 20
CHALLENGE_PARAM = re.compile(r'(\w+)="([^"]*)"')


class RegistryError(Exception):
    """The registry refused or failed a request; the message names the request and its answer."""


class Registry(Protocol):
    """What the artifact code needs from a registry, for one repository."""

    def has_blob(self, digest: str) -> bool: ...
    def put_blob(self, digest: str, size: int, data: BinaryIO) -> None: ...
    def put_manifest(self, reference: str, media_type: str, data: bytes) -> str: ...
    def get_manifest(self, reference: str, media_type: str) -> bytes: ...
    def get_blob(self, digest: str) -> Iterator[bytes]: ...


def is_loopback(host: str) -> bool:
    name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name.strip("[]")).is_loopback
    except ValueError:
        return False


def split_repository(repository: str) -> tuple[str, str]:
    """(host[:port], path) of HOST[:PORT]/PATH, checked as `qlc push --registry` checks it."""
    match = REGISTRY_REPO.fullmatch(repository)
    if match is None:
        raise RegistryError(
            f"{repository!r} is not HOST[:PORT]/REPO (lowercase letters, digits, '.', '_', "
            "'-'), e.g. ghcr.io/acme/adapters or 127.0.0.1:5000/qlc/tiny"
        )
    return match.group("host"), match.group("path").lstrip("/")


def docker_config_auth(host: str) -> str | None:
    """The base64 `auth` of the Docker configuration's entry for `host`, if there is one."""
    folder = os.environ.get("DOCKER_CONFIG") or str(Path.home() / ".docker")
    try:
        config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    auths = config.get("auths") if isinstance(config, dict) else None
    if not isinstance(auths, dict):
        return None
    for key in (host, f"https://{host}", f"http://{host}"):
        entry = auths.get(key)
        if isinstance(entry, dict) and isinstance(entry.get("auth"), str) and entry["auth"]:
            return str(entry["auth"])
    return None


class HttpRegistry:
    """One repository of a registry, over its HTTP API."""

    def __init__(self, repository: str, timeout_s: int = TIMEOUT_S) -> None:
        self.host, self.name = split_repository(repository)
        scheme = "http" if is_loopback(self.host) else "https"
        self.base = f"{scheme}://{self.host}/v2/{self.name}"
        self.timeout_s = timeout_s
        self._authorization: str | None = None

    def request(
        self,
        method: str,
        url: str,
        data: bytes | BinaryIO | None = None,
        headers: dict[str, str] | None = None,
    ) -> urllib.request.Request:
        request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
        if self._authorization:
            request.add_header("Authorization", self._authorization)
        return request

    def open(
        self,
        method: str,
        url: str,
        data: bytes | BinaryIO | None = None,
        headers: dict[str, str] | None = None,
        ok: tuple[int, ...] = (200,),
    ) -> tuple[int, dict[str, str], urllib.response.addinfourl | None]:
        """(status, headers, open response or None) once the status is one of `ok`."""
        for attempt in range(2):
            if attempt and hasattr(data, "seek"):
                data.seek(0)  # type: ignore[union-attr]
            try:
                answer = urllib.request.urlopen(
                    self.request(method, url, data, headers), timeout=self.timeout_s
                )
            except urllib.error.HTTPError as error:
                if error.code == 401 and attempt == 0 and self.authenticate(error.headers):
                    continue
                if error.code in ok:
                    return error.code, dict(error.headers), None
                body = error.read(2000).decode("utf-8", errors="replace")
                raise RegistryError(
                    f"{method} {url}: {error.code} {error.reason} {body.strip()}"
                ) from None
            except (urllib.error.URLError, OSError) as error:
                reason = getattr(error, "reason", error)
                raise RegistryError(
                    f"{method} {url}: cannot reach the registry ({reason})"
                ) from None
            if answer.status not in ok:
                answer.close()
                raise RegistryError(f"{method} {url}: unexpected status {answer.status}")
            return answer.status, dict(answer.headers), answer
        raise RegistryError(f"{method} {url}: unauthorized (check `docker login {self.host}`)")

    def authenticate(self, headers: object) -> bool:
        """Answer a 401 challenge; True when there is something new to try."""
        challenge = str(getattr(headers, "get", lambda *_: "")("WWW-Authenticate") or "")
        basic = docker_config_auth(self.host)
        if challenge.lower().startswith("basic"):
            if basic is None or self._authorization:
                return False
            self._authorization = f"Basic {basic}"
            return True
        if not challenge.lower().startswith("bearer"):
            return False
        params = dict(CHALLENGE_PARAM.findall(challenge))
        realm = params.pop("realm", "")
        if not realm.startswith(("https://", "http://")):
            return False
        token_request = urllib.request.Request(f"{realm}?{urllib.parse.urlencode(params)}")
        if basic is not None:
            token_request.add_header("Authorization", f"Basic {basic}")
        try:
            with urllib.request.urlopen(token_request, timeout=self.timeout_s) as answer:
                document = json.loads(answer.read())
        except (urllib.error.URLError, OSError, ValueError) as error:
            raise RegistryError(f"cannot get a token from {realm}: {error}") from None
        token = document.get("token") or document.get("access_token")
        if not isinstance(token, str) or not token:
            return False
        self._authorization = f"Bearer {token}"
        return True

    def has_blob(self, digest: str) -> bool:
        status, _, answer = self.open("HEAD", f"{self.base}/blobs/{digest}", ok=(200, 404))
        if answer is not None:
            answer.close()
        return status == 200

    def put_blob(self, digest: str, size: int, data: BinaryIO) -> None:
        _, headers, answer = self.open("POST", f"{self.base}/blobs/uploads/", data=b"", ok=(202,))
        if answer is not None:
            answer.close()
        location = headers.get("Location") or headers.get("location") or ""
        if not location:
            raise RegistryError(f"POST {self.base}/blobs/uploads/: no upload location given")
        url = urllib.parse.urljoin(f"{self.base}/blobs/uploads/", location)
        url += ("&" if "?" in url else "?") + urllib.parse.urlencode({"digest": digest})
        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(size)}
        _, _, answer = self.open("PUT", url, data=data, headers=headers, ok=(201,))
        if answer is not None:
            answer.close()

    def put_manifest(self, reference: str, media_type: str, data: bytes) -> str:
        """Store the manifest under `reference` (a tag or its digest); the registry's digest."""
        url = f"{self.base}/manifests/{reference}"
        _, headers, answer = self.open(
            "PUT", url, data=data, headers={"Content-Type": media_type}, ok=(201,)
        )
        if answer is not None:
            answer.close()
        digest = headers.get("Docker-Content-Digest") or headers.get("docker-content-digest")
        return str(digest or "")

    def get_manifest(self, reference: str, media_type: str) -> bytes:
        _, _, answer = self.open(
            "GET", f"{self.base}/manifests/{reference}", headers={"Accept": media_type}
        )
        assert answer is not None
        with answer:
            return bytes(answer.read())

    def get_blob(self, digest: str) -> Iterator[bytes]:
        if DIGEST.fullmatch(digest) is None:
            raise RegistryError(f"{digest!r} is not a sha256 digest")
        _, _, answer = self.open("GET", f"{self.base}/blobs/{digest}")
        assert answer is not None
        with answer:
            while block := answer.read(CHUNK):
                yield block
