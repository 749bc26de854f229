"""Object-store inputs (s3://, gs://, az://): downloaded at start into the run directory's
inputs/ folder through fsspec (s3fs, gcsfs, adlfs, which the lock adds for plans that read
object stores), checked against the spec's sha256 pins before any model loads.

Credentials come only from the environment the job's platform provides (IRSA or the instance
role, workload identity, managed identity, secrets passed by name in runtime.secrets); each
backend finds them itself. Nothing here takes a credential from the plan. A missing object,
missing credentials, a refused access or a hash that is not the pinned one is a UserError
(exit 2: a batch service does not retry it).

A download lands under a temporary name and is renamed into place when complete, so a retry of
the job (a preempted run resuming) reuses what the first attempt fetched: the run trains on the
same bytes it started with. The pins are checked every time.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qlc import contract
from qlc.compiler.plan import Plan
from qlc.trainer.errors import UserError

BACKENDS = {"s3": "s3fs", "gs": "gcsfs", "az": "adlfs"}
CREDENTIALS = {
    "s3": "AWS credentials: the job's IAM role (IRSA on Kubernetes, the job role on AWS Batch, "
    "the instance profile), or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY named in "
    "runtime.secrets",
    "gs": "Google credentials: workload identity or the VM's service account, or a key file "
    "named by GOOGLE_APPLICATION_CREDENTIALS",
    "az": "Azure credentials: workload or managed identity, or AZURE_STORAGE_ACCOUNT_NAME with "
    "AZURE_STORAGE_ACCOUNT_KEY or AZURE_STORAGE_SAS_TOKEN named in runtime.secrets",
}
# Exception class names (of botocore, google-auth, azure-identity / azure-core) meaning that no
# usable credentials were found: matched by name, the backends being optional imports.
NO_CREDENTIALS = {
    "NoCredentialsError",
    "PartialCredentialsError",
    "DefaultCredentialsError",
    "CredentialUnavailableError",
    "ClientAuthenticationError",
}
PARTIAL = ".partial"


@dataclass(frozen=True)
class Fetched:
    """Where the run reads its object-store inputs (None: that input is not in one)."""

    model_dir: str | None
    data_file: str | None


def cache_dir(out: Path) -> Path:
    return out / contract.INPUTS_CACHE_DIR


def fetch_inputs(plan: Plan, out: Path, model: bool = True) -> Fetched:
    """Download the plan's object-store inputs into the run directory (or reuse a complete
    earlier download) and check their pins. `model` False: the model folder is only looked
    up (the smoke mode trains a tiny model of the same architecture instead)."""
    data_file = model_dir = None
    if plan.data.uri is not None:
        data_file = fetch_file(plan.data.uri, cache_dir(out) / "data", "data.path")
        check_file_pin(data_file, plan.data.sha256, plan.data.uri)
    if plan.model.uri is not None:
        if model:
            model_dir = fetch_folder(plan.model.uri, cache_dir(out) / "model", "model.path")
            check_folder_pins(model_dir, plan.model.sha256, plan.model.uri)
        else:
            listed(plan.model.uri, "model.path")
    return Fetched(str(model_dir) if model_dir else None, str(data_file) if data_file else None)


def filesystem(uri: str) -> Any:
    """A fresh fsspec file system for the URI's scheme (fresh: it reads the credentials of
    this process's environment now, not those of an earlier instance)."""
    import fsspec

    protocol = uri.split("://", 1)[0]
    try:
        return fsspec.filesystem(protocol, skip_instance_cache=True)
    except ImportError:
        raise UserError(
            f"{uri}: reading {protocol}:// needs {BACKENDS[protocol]}, which this environment "
            f"lacks: `qlc lock SPEC` adds it to the lock of a spec that reads {protocol}:// "
            "(then rebuild); for --local, pip install it"
        ) from None


def failure(uri: str, key: str, error: BaseException) -> UserError:
    """The user's words for a failed object-store call."""
    protocol = uri.split("://", 1)[0]
    name = type(error).__name__
    detail = (str(error).strip().splitlines() or [name])[0][:300]
    if name in NO_CREDENTIALS:
        return UserError(
            f"{key} = {uri!r}: no credentials for {protocol}:// ({name}: {detail}). The job "
            f"gets them from its platform, never from the spec: {CREDENTIALS[protocol]}"
        )
    if isinstance(error, FileNotFoundError):
        return UserError(f"{key} = {uri!r}: no such object ({detail}): check the bucket and key")
    if isinstance(error, PermissionError):
        return UserError(
            f"{key} = {uri!r}: access denied ({detail}): the job's identity may not read it. "
            f"{CREDENTIALS[protocol]}"
        )
    return UserError(f"{key} = {uri!r}: cannot read it: {name}: {detail}")


def call(uri: str, key: str, action: Any, *args: Any) -> Any:
    try:
        return action(*args)
    except Exception as error:  # the backend's own errors: all are the user's to fix here
        raise failure(uri, key, error) from None


def fetch_file(uri: str, dest: Path, key: str) -> Path:
    """One object, as dest/<its name>."""
    target = dest / uri.rstrip("/").rsplit("/", 1)[-1]
    if target.is_file():
        return target
    fs = filesystem(uri)
    info = call(uri, key, fs.info, uri)
    if info.get("type") != "file":
        raise UserError(f"{key} = {uri!r} is a folder: name the data file itself")
    dest.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + PARTIAL)
    call(uri, key, fs.get_file, uri, str(partial))
    partial.replace(target)
    return target


def listed(uri: str, key: str) -> list[str]:
    """Every object under a folder URI (keys without the scheme); UserError when none."""
    fs = filesystem(uri)
    found: list[str] = sorted(call(uri, key, fs.find, uri))
    if not found:
        raise UserError(f"{key} = {uri!r}: no such object (nothing under that folder)")
    return found


def fetch_folder(uri: str, dest: Path, key: str) -> Path:
    """Every object under a folder URI, as files under dest (a complete copy or none)."""
    if dest.is_dir():
        return dest
    fs = filesystem(uri)
    root = fs._strip_protocol(uri).rstrip("/") + "/"
    staging = dest.with_name(dest.name + PARTIAL)
    shutil.rmtree(staging, ignore_errors=True)
    for found in listed(uri, key):
        name = found[len(root) :] if found.startswith(root) else found.rsplit("/", 1)[-1]
        local = staging / name
        local.parent.mkdir(parents=True, exist_ok=True)
        call(uri, key, fs.get_file, found, str(local))
    staging.replace(dest)
    return dest


def check_file_pin(path: Path, expected: str | None, uri: str) -> None:
    if expected is None:
        return
    actual = contract.sha256_file(path)
    if actual != expected:
        raise UserError(
            f"data.path = {uri!r}: sha256 {actual} is not data.sha256 = {expected}: the file "
            "changed since the spec pinned it; pin the new hash if the change is meant"
        )


def check_folder_pins(folder: Path, expected: dict[str, str] | None, uri: str) -> None:
    if expected is None:
        return
    actual = contract.hash_tree(folder)
    wrong = sorted(name for name in expected if actual.get(name) != expected[name])
    extra = sorted(set(actual) - set(expected))
    if wrong or extra:
        parts = [f"{name}: {'missing' if name not in actual else 'sha256 ' + actual[name]}"
                 for name in wrong] + [f"{name}: not pinned" for name in extra]  # fmt: skip
        raise UserError(
            f"model.path = {uri!r}: the files are not the ones model.sha256 pins ("
            + "; ".join(parts[:5])
            + (f" and {len(parts) - 5} more" if len(parts) > 5 else "")
            + "): pin the files the folder holds, every one"
        )


def check_local_pins(plan: Plan, data_file: str | None, model_dir: str | None) -> None:
    """The spec's pins of local inputs (an object-store input was checked when fetched)."""
    if data_file is not None and plan.data.uri is None:
        check_file_pin(Path(data_file), plan.data.sha256, data_file)
    if model_dir is not None and plan.model.uri is None:
        check_folder_pins(Path(model_dir), plan.model.sha256, model_dir)
