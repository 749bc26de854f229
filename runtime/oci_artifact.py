"""A run as an OCI artifact (ORAS conventions): push by digest, pull back verified.

The artifact is an OCI image manifest (image-spec v1.1 artifact guidance):
- `artifactType` ARTIFACT_TYPE names what it is: a qlc run's adapter and its records;
- `config` is the empty descriptor (`application/vnd.oci.empty.v1+json`, the two bytes `{}`),
  as the guidance says when the artifact needs no configuration of its own;
- one layer per file, each with `org.opencontainers.image.title` = its path in the run
  directory (adapter/adapter_model.safetensors, manifest.json, ...), as `oras push` writes it,
  so `oras pull` recreates the run directory;
- annotations: the run's manifest sha256 and when the run finished (not the push time: the
  same run always gives the same artifact, hence the same digest).

Blobs go first (skipped when the registry has them), the manifest last, under the tag when
one was asked for, else under its own digest. What comes back is REPO@sha256:<digest of the
manifest bytes>, checked against the registry's Docker-Content-Digest.

A pull by digest checks the manifest bytes against the digest, every blob against its
descriptor, every title (a relative path inside the run directory, each once), then the run
itself as publishing does (manifest.sha256, subjects, records), in a staging directory that is
renamed into place only when all of it holds.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from qlc.contract import (
    MANIFEST_FILE,
    json_bytes,
    read_nofollow,
)
from qlc.runtime.oci_registry import OCI_MANIFEST, HttpRegistry, Registry, RegistryError
from qlc.runtime.publish import (
    PublishError,
    RunFile,
    certified_files,
    record_publication,
    verified_run,
)
from qlc.userio import clip, output_problem

ARTIFACT_TYPE = "application/vnd.qlc.run.adapter.v1"
EMPTY_CONFIG = {
    "mediaType": "application/vnd.oci.empty.v1+json",
    "digest": "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a",
    "size": 2,
    "data": "e30=",
}
EMPTY_BYTES = b"{}"
TITLE = "org.opencontainers.image.title"
CREATED = "org.opencontainers.image.created"
RUN_MANIFEST_SHA256 = "io.qlc.run.manifest.sha256"
MEDIA_TYPES = {
    MANIFEST_FILE: "application/vnd.in-toto+json",
    ".json": "application/json",
    ".md": "text/markdown",
    ".jinja": "text/plain",
    ".sha256": "text/plain",
    ".svg": "image/svg+xml",
    ".png": "image/png",
}
BINARY = "application/octet-stream"
REFERENCE = re.compile(r"^(?P<repository>[^@\s]+)@(?P<digest>sha256:[0-9a-f]{64})$")
CHUNK = 1 << 20


class PullError(Exception):
    """An artifact that is not what its digest or its records say: nothing was kept."""


@dataclass(frozen=True)
class Pushed:
    reference: str  # HOST/REPO@sha256:...
    digest: str
    tag: str | None
    layers: int
    bytes: int


def media_type(name: str) -> str:
    return MEDIA_TYPES.get(name) or MEDIA_TYPES.get(PurePosixPath(name).suffix, BINARY)


def artifact_manifest(files: list[RunFile], created: str | None) -> bytes:
    """The OCI manifest of the files (canonical JSON: the same files give the same bytes)."""
    manifest_sha = next(f.sha256 for f in files if f.name == MANIFEST_FILE)
    annotations = {RUN_MANIFEST_SHA256: manifest_sha, **({CREATED: created} if created else {})}
    document = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": ARTIFACT_TYPE,
        "config": EMPTY_CONFIG,
        "layers": [
            {
                "mediaType": media_type(f.name),
                "digest": f"sha256:{f.sha256}",
                "size": f.size,
                "annotations": {TITLE: f.name},
            }
            for f in sorted(files, key=lambda f: f.name)
        ],
        "annotations": annotations,
    }
    return json_bytes(document)


def push_files(
    registry: Registry, repository: str, files: list[RunFile], tag: str | None, created: str | None
) -> Pushed:
    """Blobs, then the manifest (by tag, or by its digest); the pushed reference."""
    if not registry.has_blob(str(EMPTY_CONFIG["digest"])):
        registry.put_blob(str(EMPTY_CONFIG["digest"]), 2, io.BytesIO(EMPTY_BYTES))
    for f in files:
        digest = f"sha256:{f.sha256}"
        if registry.has_blob(digest):
            continue
        with open(f.path, "rb") as handle:
            registry.put_blob(digest, f.size, handle)
    body = artifact_manifest(files, created)
    digest = "sha256:" + hashlib.sha256(body).hexdigest()
    answered = registry.put_manifest(tag or digest, OCI_MANIFEST, body)
    if answered and answered != digest:
        raise RegistryError(f"the registry stored the manifest as {answered}, not {digest}")
    return Pushed(f"{repository}@{digest}", digest, tag, len(files), sum(f.size for f in files))


def safe_title(title: object, seen: set[str]) -> str:
    """A layer's title as a relative path inside the run directory, each title once."""
    path = PurePosixPath(str(title))
    if (
        not isinstance(title, str)
        or not title
        or path.is_absolute()
        or any(part in ("", ".", "..") for part in title.split("/"))
        or "\\" in title
        or title in seen
    ):
        raise PullError(f"layer title {title!r}: not a plain relative path (or given twice)")
    seen.add(title)
    return title


def parse_manifest(body: bytes, digest: str) -> list[dict[str, Any]]:
    """The layers of a qlc artifact whose manifest bytes have `digest`."""
    if "sha256:" + hashlib.sha256(body).hexdigest() != digest:
        raise PullError(f"the registry's manifest does not have the digest asked for ({digest})")
    try:
        document = json.loads(body)
    except ValueError:
        raise PullError(f"{digest}: the manifest is not JSON") from None
    if document.get("artifactType") != ARTIFACT_TYPE:
        raise PullError(
            f"{digest} is not a qlc run artifact (artifactType "
            f"{document.get('artifactType')!r}, expected {ARTIFACT_TYPE})"
        )
    layers = document.get("layers")
    if not isinstance(layers, list) or not layers:
        raise PullError(f"{digest}: the manifest lists no layers")
    return layers


def fetch_layer(registry: Registry, layer: dict[str, Any], target: Path) -> None:
    digest, size = str(layer.get("digest", "")), layer.get("size")
    hasher, written = hashlib.sha256(), 0
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, "xb") as handle:
        for block in registry.get_blob(digest):
            hasher.update(block)
            written += len(block)
            handle.write(block)
    if "sha256:" + hasher.hexdigest() != digest or written != size:
        raise PullError(f"{target.name}: the blob does not match its descriptor ({digest})")


def pull_into(registry: Registry, digest: str, destination: Path) -> Path:
    """Fetch the artifact `digest` into destination (new), verified as a publishable run. The
    destination is checked, and its staging folder made, before any network."""
    if os.path.lexists(destination):
        raise PullError(
            f"-o {clip(str(destination), 200)}: exists: pull into a new directory with -o"
        )
    try:
        target = destination.resolve()
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.qlc-pull-", dir=target.parent))
    except OSError as error:
        raise PullError(output_problem(destination, error)) from None
    try:
        layers = parse_manifest(registry.get_manifest(digest, OCI_MANIFEST), digest)
        seen: set[str] = set()
        for layer in layers:
            title = safe_title((layer.get("annotations") or {}).get(TITLE), seen)
            fetch_layer(registry, layer, staging / title)
        check_pulled_run(staging)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def check_pulled_run(run_dir: Path) -> None:
    """The pulled files are a run's certified files, no more and no fewer."""
    try:
        manifest = json.loads(read_nofollow(run_dir / MANIFEST_FILE))
        files = certified_files(run_dir, manifest, with_plan=True)
    except (OSError, ValueError, KeyError, TypeError, PublishError) as error:
        raise PullError(f"the pulled run does not verify: {error}") from None
    names = {f.name for f in files}
    present = {p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*") if p.is_file()}
    if present != names:
        raise PullError(f"the artifact holds files its records do not certify: {present - names}")


def publish_oci(
    run: Path,
    repository: str,
    tag: str | None,
    model: Path | None = None,
    registry: Registry | None = None,
) -> Pushed:
    """Verify the run, push its certified files (plan.json too, so `qlc generate` can use the
    pulled run), record the pushed reference in the run's published.json."""
    inputs, files = verified_run(run, model, with_plan=True)
    created = (inputs.manifest["predicate"].get("run") or {}).get("finished_at")
    client = registry if registry is not None else HttpRegistry(repository)
    pushed = push_files(client, repository, files, tag, created)
    target = f"oci:{repository}" + (f":{tag}" if tag else "")
    record_publication(inputs.run_dir, target, pushed.reference)
    return pushed


def parse_reference(reference: str) -> tuple[str, str]:
    """(HOST/REPO, sha256:...) of oci:HOST/REPO@sha256:<64 hex>."""
    bare = reference.removeprefix("oci:")
    match = REFERENCE.fullmatch(bare)
    if match is None:
        raise PullError(
            f"{reference!r}: expected oci:HOST[:PORT]/REPO@sha256:<64 hex> (a pull names the "
            "digest `qlc publish` printed, never a tag)"
        )
    return match.group("repository"), match.group("digest")


def pull_run(reference: str, destination: Path, registry: Registry | None = None) -> Path:
    repository, digest = parse_reference(reference)
    client = registry if registry is not None else HttpRegistry(repository)
    return pull_into(client, digest, destination)


def cached_run(reference: str, cache: Path, registry: Registry | None = None) -> Path:
    """The run of `reference` under cache/sha256-<hex>: pulled once, verified at every use."""
    _, digest = parse_reference(reference)
    folder = cache / digest.replace(":", "-")
    if folder.is_dir():
        check_pulled_run(folder)
        return folder
    return pull_run(reference, folder, registry)
