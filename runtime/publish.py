"""What a run publishes: its files, each certified by the run's own records, or nothing.

A run directory is published only when everything that leaves it is what the run wrote:
`open_run` checks the adapter against the manifest's subjects, the plan and the base model;
here manifest.json is checked against manifest.sha256 (written by the runtime when the run
ended), report.md against the manifest's records and plan.json against its plan_sha256. The
result is the list of files to upload with the sha256 each must have; a hub upload or an OCI
push sends exactly these, and a pull checks them again.

Targets are `hf:ORG/NAME` (the Hugging Face Hub) and `oci:HOST[:PORT]/REPO[:TAG]` (an OCI
registry, ORAS conventions); `parse_target` names the problem when a target is neither.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from qlc.contract import (
    ADAPTER_DIR,
    MANIFEST_DIGEST_FILE,
    MANIFEST_FILE,
    MODEL_CARD_FILE,
    PLAN_FILE,
    PUBLISH_RECORD_FILE,
    REPORT_FILE,
    sha256_file,
    write_json_atomic,
)
from qlc.runtime.generate import RunInputs, open_run
from qlc.runtime.manifest import manifest_edited

HUB_SCHEME = "hf:"
OCI_SCHEME = "oci:"


class PublishError(Exception):
    """A run or target that cannot be published as asked (a user error): nothing was sent."""


@dataclass(frozen=True)
class RunFile:
    name: str  # path relative to the run directory, e.g. adapter/adapter_model.safetensors
    path: Path
    sha256: str
    size: int


@dataclass(frozen=True)
class Target:
    scheme: str  # "hf" or "oci"
    name: str  # ORG/NAME, or HOST[:PORT]/REPO
    tag: str | None  # oci only


def parse_target(target: str) -> Target:
    if target.startswith(HUB_SCHEME):
        return Target("hf", target[len(HUB_SCHEME) :], None)
    if target.startswith(OCI_SCHEME):
        rest = target[len(OCI_SCHEME) :]
        if "@" in rest:
            raise PublishError(f"--to {target}: a push names a tag, not a digest (@sha256:...)")
        repository, _, tag = rest.rpartition(":") if ":" in rest.split("/")[-1] else (rest, "", "")
        return Target("oci", repository, tag or None)
    raise PublishError(
        f"--to {target!r}: expected hf:ORG/NAME (Hugging Face Hub) or "
        "oci:HOST[:PORT]/REPO[:TAG] (an OCI registry)"
    )


def run_file(run_dir: Path, name: str, expected: str | None, why: str) -> RunFile:
    """The file `name` of the run, once its sha256 is `expected` (the record that certifies it)."""
    path = run_dir / name
    if not path.is_file() or path.is_symlink():
        raise PublishError(f"{path}: missing ({why})")
    digest = sha256_file(path)
    if expected is None:
        raise PublishError(f"{path}: no record certifies it ({why})")
    if digest != expected:
        raise PublishError(
            f"{path}: sha256 {digest[:12]}... differs from {why} ({expected[:12]}...): the run "
            "was changed after it ended; nothing was published"
        )
    return RunFile(name, path, digest, path.stat().st_size)


def recorded_manifest_sha256(run_dir: Path) -> str:
    problem = manifest_edited(run_dir)
    if problem is not None:
        raise PublishError(f"{problem}; nothing was published")
    return (run_dir / MANIFEST_DIGEST_FILE).read_text(encoding="utf-8").split()[0]


def certified_files(run_dir: Path, manifest: dict[str, Any], with_plan: bool) -> list[RunFile]:
    """The adapter directory, manifest.json, manifest.sha256, report.md (and plan.json), each
    checked against the record that certifies it. Every adapter file must be a subject."""
    predicate = manifest.get("predicate") or {}
    subjects = {s["name"]: s["digest"]["sha256"] for s in manifest.get("subject") or []}
    records = predicate.get("records") or {}
    files = []
    for path in sorted(p for p in (run_dir / ADAPTER_DIR).rglob("*") if p.is_file()):
        name = path.relative_to(run_dir).as_posix()
        files.append(run_file(run_dir, name, subjects.get(name), "the manifest's subject"))
    digest = recorded_manifest_sha256(run_dir)
    files.append(run_file(run_dir, MANIFEST_FILE, digest, MANIFEST_DIGEST_FILE))
    anchor = run_dir / MANIFEST_DIGEST_FILE
    files.append(RunFile(MANIFEST_DIGEST_FILE, anchor, sha256_file(anchor), anchor.stat().st_size))
    files.append(run_file(run_dir, REPORT_FILE, records.get(REPORT_FILE), "the manifest's records"))
    if with_plan:
        plan_sha = predicate.get("plan_sha256")
        files.append(run_file(run_dir, PLAN_FILE, plan_sha, "the manifest's plan_sha256"))
    return files


def verified_run(
    run: Path, base_model_path: Path | None = None, with_plan: bool = False
) -> tuple[RunInputs, list[RunFile]]:
    """open_run's checks, then every file to publish certified; PublishError otherwise."""
    inputs = open_run(Path(run), base_model_path)
    return inputs, certified_files(inputs.run_dir, inputs.manifest, with_plan)


def card_text(files: list[RunFile]) -> str:
    card = next((f for f in files if f.name == f"{ADAPTER_DIR}/{MODEL_CARD_FILE}"), None)
    if card is None:
        raise PublishError(f"the run has no model card ({ADAPTER_DIR}/README.md)")
    return card.path.read_text(encoding="utf-8")


def record_publication(run_dir: Path, target: str, where: str) -> None:
    """Append {target, where, manifest_sha256, at} to the run's published.json (the run's
    certified files are untouched; this record is the host's, like manifest.sha256)."""
    path = run_dir / PUBLISH_RECORD_FILE
    try:
        entries = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else []
    except ValueError:
        entries = []
    entries = entries if isinstance(entries, list) else []
    entries.append(
        {
            "target": target,
            "where": where,
            "manifest_sha256": sha256_file(run_dir / MANIFEST_FILE),
            "at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
    )
    write_json_atomic(path, entries)
