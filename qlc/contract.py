"""The contract between the host (compiler, runtime) and the image (the trainer).

Standard library only: the image imports it beside the trainer package, the runtime imports it
to launch runs and to check what they wrote. Every name that crosses the boundary lives here
once: environment variables, file and marker names, the container user, exit codes, the
manifest's versioned schema (checked when written and when read), hashing and atomic writes.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import stat
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

# ---------------------------------------------------------------------------------------------
# Environment of a training process (set by the one launch path, read by the trainer).
ENV_PLAN = "QLC_PLAN"  # path of plan.json (default: beside train.py)
ENV_OUTPUT_DIR = "QLC_OUTPUT_DIR"  # the run directory
ENV_MODEL_PATH = "QLC_MODEL_PATH"  # where a local model.path is mounted or found
ENV_DATA_PATH = "QLC_DATA_PATH"  # where a local data.path is mounted or found
# The other local inputs, as a JSON object {spec key: path where it is mounted or found}:
# each data.sources[N].path of a mixture, data.chat_template_file
# ({"data.sources[0].path": "/inputs/files/0/a.jsonl"}).
ENV_INPUT_PATHS = "QLC_INPUT_PATHS"
ENV_SMOKE = "QLC_SMOKE"  # "1": the plan's smoke variant (tiny model of the same architecture)
ENV_NPROC = "QLC_NPROC"  # training processes on this node (CPU runs: gloo processes)
ENV_IMAGE_ID = "QLC_IMAGE_ID"  # the image the run ran in (recorded in the manifest)
ENV_IMAGE_DIGEST = "QLC_IMAGE_DIGEST"  # its registry digest, when it was pushed
ENV_BASE_IMAGE = "QLC_BASE_IMAGE"  # the base image it was built FROM
ENV_RUN_ID = "QLC_RUN_ID"  # the run's id, fixed by the launcher (stable across retries)
ENV_USER_ERROR_FILE = (
    "QLC_USER_ERROR_FILE"  # launcher <-> rank 0: "the run stopped on a user error"
)
ENV_PROFILE_STEPS = "QLC_PROFILE_STEPS"  # fast engine: print a profile of N steps (no numerics)

# Every variable above: a spec's runtime.env may not set them (the launch path does).
PROTOCOL_ENV = (
    ENV_PLAN,
    ENV_OUTPUT_DIR,
    ENV_MODEL_PATH,
    ENV_DATA_PATH,
    ENV_INPUT_PATHS,
    ENV_SMOKE,
    ENV_NPROC,
    ENV_IMAGE_ID,
    ENV_IMAGE_DIGEST,
    ENV_BASE_IMAGE,
    ENV_RUN_ID,
    ENV_USER_ERROR_FILE,
    ENV_PROFILE_STEPS,
)
PROTOCOL_PREFIX = "QLC_"

# Where inputs may live besides the hub and local files: object stores, read through fsspec
# (s3fs, gcsfs, adlfs); the job reaches them with the target's own credentials.
OBJECT_STORE_SCHEMES = ("s3://", "gs://", "az://")

# Variables that change how a Python process loads code or where its network traffic and
# credentials go: a spec may not set them (runtime.env), only the person running qlc.
LOADER_ENV = (
    "PYTHONPATH",
    "PYTHONHOME",
    "PYTHONSTARTUP",
    "PYTHONUSERBASE",
    "PYTHONSAFEPATH",
    "PYTHONPLATLIBDIR",
    "PYTHONEXECUTABLE",
    "PYTHONINSPECT",
    "PYTHONBREAKPOINT",
    "PYTHONWARNINGS",
    "PYTHONNOUSERSITE",
    "LD_PRELOAD",
    "LD_LIBRARY_PATH",
    "LD_AUDIT",
    "PATH",
    "HOME",
    "BASH_ENV",
    "ENV",
    "HF_ENDPOINT",
    "HF_HUB_ENDPOINT",
    "HF_HOME",
    "HF_TOKEN_PATH",
    "HF_HUB_CACHE",
    "HUGGINGFACE_HUB_CACHE",
    "TRANSFORMERS_CACHE",
    "HF_DATASETS_CACHE",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "NO_PROXY",
    "http_proxy",
    "https_proxy",
    "all_proxy",
    "no_proxy",
    "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "AWS_ENDPOINT_URL",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "GOOGLE_APPLICATION_CREDENTIALS",
    "TORCHINDUCTOR_CACHE_DIR",
    "TRITON_CACHE_DIR",
    "CUDA_VISIBLE_DEVICES",
    "NVIDIA_VISIBLE_DEVICES",
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "NNODES",
    "NODE_RANK",
)
LOADER_PREFIXES = ("PYTHON", "LD_", "DYLD_")


def reserved_env(name: str) -> str | None:
    """Why a spec may not set environment variable `name` (runtime.env), or None when it may."""
    if name.startswith(PROTOCOL_PREFIX):
        return "QLC_* variables are qlc's own protocol between host and image"
    if name in LOADER_ENV or name.startswith(LOADER_PREFIXES):
        return (
            "it changes how the training process loads code, which GPUs or processes it "
            "uses, or where its traffic and credentials go; set it in the environment of "
            "`qlc run` yourself if you mean it"
        )
    return None


# ---------------------------------------------------------------------------------------------
# Files.
PLAN_FILE = "plan.json"
SPEC_FILE = "spec.toml"
SCRIPT_FILE = "train.py"
LOCK_FILE = "requirements.lock"
SETTINGS_FILE = "settings.txt"  # the run directory's copy of the resolved settings table
CONTEXT_MARKER = ".qlc-context"  # a directory qlc wrote a build context into
RUN_MARKER = ".qlc-run"  # a directory qlc made for a run: {"run_id", "plan_sha256", "job"}
MANIFEST_FILE = "manifest.json"
MANIFEST_DIGEST_FILE = "manifest.sha256"
METRICS_FILE = "metrics.jsonl"
DATA_REPORT_FILE = "data_report.json"
SAMPLE_FILE = "sample.json"
REPORT_FILE = "report.md"
LOSS_PLOT_FILE = "loss.png"
RUN_LOG_FILE = "run.log"
PUBLISH_RECORD_FILE = "published.json"  # qlc publish: where the run went (host only)
INPUTS_CACHE_DIR = "inputs"  # object-store inputs, downloaded into the run directory
PREEMPTED_FLAG = ".qlc-preempted"  # a process stopped on SIGTERM with a checkpoint (node script)
ADAPTER_DIR = "adapter"
ADAPTER_STAGING_DIR = ".adapter.partial"  # written whole, then renamed to adapter/
ADAPTER_OLD_DIR = ".adapter.old"
CHECKPOINTS_DIR = "checkpoints"
SMOKE_MODEL_DIR = "smoke-model"
COMPLETE_MARKER = "qlc-complete.json"  # in a checkpoint the trainer has finished writing
USER_ERROR_FLAG = ".qlc-user-error"
MODEL_CARD_FILE = "README.md"  # in adapter/
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")
# Files of the run directory the trainer writes and the manifest's records certify.
TRAINER_RECORDS = (METRICS_FILE, DATA_REPORT_FILE, SAMPLE_FILE, SETTINGS_FILE, PLAN_FILE)
# Files the runtime writes after the trainer ends, certified by the manifest too.
HOST_RECORDS = (REPORT_FILE, LOSS_PLOT_FILE)
PROGRESS_PREFIX = "QLC_PROGRESS "
# Local data files by suffix: the spec accepts these, the trainer reads them by this format.
DATA_FILE_FORMATS = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def data_file_format(path: str) -> str | None:
    """A data file's format from its suffix (None: not a data file qlc reads)."""
    suffix = "." + path.rsplit(".", 1)[-1].lower() if "." in path else ""
    return DATA_FILE_FORMATS.get(suffix)


# ---------------------------------------------------------------------------------------------
# Processes.
CONTAINER_UID = 10001
CONTAINER_GID = 10001
CONTAINER_USER = f"{CONTAINER_UID}:{CONTAINER_GID}"
CONTAINER_OUTPUT_DIR = "/out"
CONTAINER_INPUTS_DIR = "/inputs"
CONTAINER_APP_DIR = "/qlc"  # train.py, plan.json and the trainer package in the image
CONTAINER_VENV = "/opt/venv"  # the image's Python environment (bin/python, bin/torchrun)
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USER_ERROR = 2
EXIT_PREEMPTED = 143  # 128 + SIGTERM: a preempted run saved a checkpoint; retry resumes it
RETRYABLE_EXIT_CODES = (EXIT_PREEMPTED, 137)  # preemption / SIGKILL by the platform
# Seconds an exported job gives the trainer between SIGTERM (preemption) and SIGKILL, where the
# service lets the job file say so: the trainer's checkpoint on SIGTERM must fit in it.
PREEMPTION_GRACE_S = 120


# ---------------------------------------------------------------------------------------------
# Hashing and atomic writes.
def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def hash_tree(root: Path) -> dict[str, str]:
    """{name: sha256} of a file, or of every file under a folder by relative path (a
    `.cache` folder inside, which loaders write next to the data, is left out)."""
    if root.is_file():
        return {root.name: sha256_file(root)}
    files = sorted(p for p in root.rglob("*") if p.is_file() and ".cache" not in p.parts)
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in files}


def source_file_name(index: int, name: str) -> str:
    """A mixture's file in the manifest's inputs.data.files: data.sources[index]'s `name`."""
    return f"sources/{index}/{name}"


def write_bytes_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """The whole new file or the old one: a unique temporary file in the same folder, renamed
    into place (a link at `path` is replaced, never followed). A failed write (a full disk)
    leaves no temporary file behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def json_bytes(data: Any) -> bytes:
    """Canonical JSON: sorted keys, two-space indent, one trailing newline; NaN and infinity
    are refused (they are not JSON)."""
    return (json.dumps(data, indent=2, sort_keys=True, allow_nan=False) + "\n").encode()


def write_json_atomic(path: Path, data: Any) -> None:
    write_bytes_atomic(path, json_bytes(data))


def read_nofollow(path: Path) -> bytes:
    """Bytes of a file a run wrote; a link in its place is refused (ELOOP), never followed,
    and so is anything but a regular file (a FIFO would block the reader for ever)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        return handle.read()


def finite_or_none(value: Any) -> Any:
    """A float that JSON can hold: NaN and infinities become None (a metric that diverged)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# ---------------------------------------------------------------------------------------------
# The run manifest: an in-toto statement whose predicate follows MANIFEST_SCHEMA.
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "urn:qlc:manifest:v2"
MANIFEST_VERSION = 2
STATUSES = ("running", "succeeded", "failed", "interrupted")
EVAL_LOSS_DEFINITION = (
    "token-weighted mean cross-entropy over every label token of the evaluation examples "
    "(sum of per-token losses / number of label tokens), dropout off"
)

_STR, _INT, _FLOAT, _BOOL, _DICT, _LIST, _NONE = str, int, float, bool, dict, list, type(None)
# key: (types allowed, required). Nested objects name their own schema below.
MANIFEST_SCHEMA: dict[str, tuple[tuple[type, ...], bool]] = {
    "version": ((_INT,), True),
    "status": ((_STR,), True),
    "qlc_version": ((_STR,), True),
    "spec": ((_DICT,), True),
    "plan_sha256": ((_STR, _NONE), True),
    "lock_sha256": ((_STR, _NONE), True),
    "image": ((_DICT,), True),
    "inputs": ((_DICT,), True),
    "run": ((_DICT,), True),
    "effective": ((_DICT,), True),
    "substitutions": ((_LIST,), True),
    "decisions": ((_LIST,), True),
    "observed": ((_DICT,), True),
    "environment": ((_DICT,), True),
    "metrics": ((_DICT,), True),
    "records": ((_DICT,), True),
    # one entry per tracker: where it logged, or its error (every run writes it; optional so
    # that runs finished before trackers existed still read)
    "tracking": ((_LIST,), False),
    "error": ((_STR, _NONE), True),
    "host": ((_DICT,), False),  # added by the runtime after the process ends
}
RUN_SCHEMA: dict[str, tuple[tuple[type, ...], bool]] = {
    "run_id": ((_STR, _NONE), True),
    "seed": ((_INT, _NONE), True),
    "deterministic": ((_BOOL, _NONE), True),
    "smoke": ((_BOOL, _NONE), True),
    "engine": ((_STR, _NONE), True),
    "world_size": ((_INT, _NONE), True),
    "examples_per_step": ((_INT, _NONE), True),
    "grad_accum": ((_INT, _NONE), True),
    "started_at": ((_STR, _NONE), True),
    "finished_at": ((_STR, _NONE), True),
    "resumed_from": ((_STR, _NONE), True),
}
SUBSTITUTION_KEYS = ("key", "written", "effective", "why")
DECISION_KEYS = ("what", "chosen", "why")
TRACKING_KEYS = ("tracker", "error")


class ManifestError(ValueError):
    """A manifest that does not follow the schema; the message lists every problem."""


def _check_fields(
    data: Mapping[str, Any], schema: Mapping[str, tuple[tuple[type, ...], bool]], where: str
) -> list[str]:
    problems = []
    for key, (types, required) in schema.items():
        if key not in data:
            if required:
                problems.append(f"{where}.{key}: missing")
            continue
        value = data[key]
        ok = isinstance(value, types) and not (isinstance(value, bool) and _BOOL not in types)
        if not ok:
            names = "/".join("null" if t is _NONE else t.__name__ for t in types)
            problems.append(f"{where}.{key}: expected {names}, got {type(value).__name__}")
    return problems


def _check_entries(items: Any, keys: Iterable[str], where: str) -> list[str]:
    problems = []
    for index, item in enumerate(items if isinstance(items, list) else []):
        if not isinstance(item, dict) or any(key not in item for key in keys):
            problems.append(f"{where}[{index}]: needs {', '.join(keys)}")
    return problems


def manifest_problems(statement: Any) -> list[str]:
    """Every way `statement` breaks the manifest schema ([] when it follows it)."""
    if not isinstance(statement, dict):
        return ["the manifest is not a JSON object"]
    problems = []
    if statement.get("_type") != STATEMENT_TYPE:
        problems.append(f"_type: expected {STATEMENT_TYPE}")
    if statement.get("predicateType") != PREDICATE_TYPE:
        problems.append(
            f"predicateType: expected {PREDICATE_TYPE} (got {statement.get('predicateType')!r})"
        )
    subjects = statement.get("subject")
    if not isinstance(subjects, list):
        problems.append("subject: expected a list")
    else:
        for index, subject in enumerate(subjects):
            digest = subject.get("digest") if isinstance(subject, dict) else None
            if not (
                isinstance(subject, dict)
                and isinstance(subject.get("name"), str)
                and isinstance(digest, dict)
                and isinstance(digest.get("sha256"), str)
            ):
                problems.append(f"subject[{index}]: needs name and digest.sha256")
    predicate = statement.get("predicate")
    if not isinstance(predicate, dict):
        return [*problems, "predicate: expected an object"]
    problems += _check_fields(predicate, MANIFEST_SCHEMA, "predicate")
    if predicate.get("version") != MANIFEST_VERSION:
        problems.append(f"predicate.version: expected {MANIFEST_VERSION}")
    if predicate.get("status") not in STATUSES:
        problems.append(f"predicate.status: one of {', '.join(STATUSES)}")
    if isinstance(predicate.get("run"), dict):
        problems += _check_fields(predicate["run"], RUN_SCHEMA, "predicate.run")
    problems += _check_entries(
        predicate.get("substitutions"), SUBSTITUTION_KEYS, "predicate.substitutions"
    )
    problems += _check_entries(predicate.get("decisions"), DECISION_KEYS, "predicate.decisions")
    problems += _check_entries(predicate.get("tracking"), TRACKING_KEYS, "predicate.tracking")
    records = predicate.get("records")
    if isinstance(records, dict) and not all(
        isinstance(k, str) and isinstance(v, str) for k, v in records.items()
    ):
        problems.append("predicate.records: expected {file name: sha256}")
    return problems


def check_manifest(statement: Any) -> dict[str, Any]:
    """The statement, once it follows the schema; ManifestError listing every problem."""
    problems = manifest_problems(statement)
    if problems:
        raise ManifestError("; ".join(problems))
    result: dict[str, Any] = statement
    return result


def manifest_bytes(statement: dict[str, Any]) -> bytes:
    """A manifest's bytes, checked against the schema first (a bad manifest is never written)."""
    return json_bytes(check_manifest(statement))


def read_manifest_file(path: Path) -> dict[str, Any]:
    """A manifest read back and checked (ManifestError, OSError or ValueError otherwise)."""
    return check_manifest(json.loads(read_nofollow(path)))


def subject_entries(names_and_digests: Mapping[str, str], prefix: str) -> list[dict[str, Any]]:
    return [
        {"name": f"{prefix}{name}", "digest": {"sha256": digest}}
        for name, digest in sorted(names_and_digests.items())
    ]


# ---------------------------------------------------------------------------------------------
# Run directories: a directory becomes a run's when qlc claims it with RUN_MARKER; a run never
# writes into a directory it has not claimed, into another plan's run, or into a finished run.
def claim_run_dir(directory: Path, plan_sha256: str, job: str, run_id: str | None) -> str | None:
    """Claim `directory` for a run of the plan with `plan_sha256` (create it, or take it back
    to resume); the reason it cannot be claimed, or None once it is claimed."""
    marker = directory / RUN_MARKER
    if directory.is_dir() and not marker.is_file():
        foreign = sorted(p.name for p in directory.iterdir())
        if foreign:
            shown = ", ".join(foreign[:3]) + (" ..." if len(foreign) > 3 else "")
            return (
                f"{directory} is not a qlc run directory (it holds {shown} and no {RUN_MARKER}): "
                "a run writes only into a new directory or one qlc made for the same plan"
            )
    elif marker.is_file():
        try:
            claimed = json.loads(read_nofollow(marker))
        except (OSError, ValueError):
            return f"{marker} is unreadable: this directory is not a run qlc can continue"
        if not isinstance(claimed, dict) or claimed.get("plan_sha256") != plan_sha256:
            other = claimed.get("job") if isinstance(claimed, dict) else None
            return (
                f"{directory} holds a run of another plan (job {other!r}): a run continues only "
                "in a directory of its own plan; start a new run instead"
            )
        status = _manifest_status(directory / MANIFEST_FILE)
        if status == "succeeded":
            return f"{directory} holds a finished run (status succeeded): it is never rewritten"
        return None
    directory.mkdir(parents=True, exist_ok=True)
    write_json_atomic(marker, {"plan_sha256": plan_sha256, "job": job, "run_id": run_id})
    return None


def _manifest_status(path: Path) -> str | None:
    try:
        data = json.loads(read_nofollow(path))
    except (OSError, ValueError):
        return None
    predicate = data.get("predicate") if isinstance(data, dict) else None
    status = predicate.get("status") if isinstance(predicate, dict) else None
    return status if isinstance(status, str) else None
