"""The run's manifest after the process ends: add the host's view, check, report.

The trainer writes manifest.json itself (status "running" at start, the final one last),
following the contract's schema. After the container or process exits the runtime reads it
back (checking the schema), adds `predicate.host` (how it ended, exit code, OOM kill, image,
timings), re-hashes every subject and record against the files, turns a manifest still saying
"running" into "failed" or "interrupted" with no subjects, writes report.md and loss.png and adds
their hashes to the records, writes the manifest atomically, and records the sha256 of its
final bytes beside it in `manifest.sha256` so a later edit by hand is detected.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from qlc import __version__, contract
from qlc.contract import MANIFEST_DIGEST_FILE as MANIFEST_DIGEST
from qlc.contract import MANIFEST_FILE as MANIFEST
from qlc.contract import read_nofollow, sha256_file
from qlc.contract import write_bytes_atomic as write_atomic


@dataclass(frozen=True)
class HostView:
    mode: str  # "container" | "local"
    exit_code: int | None
    oom_killed: bool
    ended: str  # exited | oom-killed | interrupted | lost | not-started
    image_id: str | None
    image_tag: str | None
    base_image: str | None
    base_image_id: str | None
    started_at: str
    finished_at: str
    duration_s: float
    user: str | None
    network: str | None
    gpus_requested: int
    read_only_inputs: list[str] = field(default_factory=list)
    detail: str = ""
    spec_path: str | None = None
    base_image_overridden: bool = False


@dataclass(frozen=True)
class FinalManifest:
    path: Path
    status: str
    data: dict[str, Any]
    problems: list[str]
    write_error: OSError | None = None  # the final manifest could not be written whole
    manifest_updated: bool = True  # False: even the in-place fallback failed
    report_error: OSError | None = None  # report.md / loss.png could not be written


def read_manifest(path: Path) -> dict[str, Any] | None:
    """The manifest as written, once it follows the schema; None when missing, unreadable or
    not a qlc manifest of this version."""
    try:
        return contract.read_manifest_file(path)
    except (OSError, ValueError):
        return None


def schema_problem(path: Path) -> str | None:
    """Why the manifest at `path` cannot be read as a qlc manifest, or None when it can."""
    try:
        contract.read_manifest_file(path)
    except FileNotFoundError:
        return f"{path}: no manifest"
    except contract.ManifestError as error:
        return f"{path} does not follow the qlc manifest schema: {error}"
    except (OSError, ValueError) as error:
        return f"{path} is not readable JSON ({error})"
    return None


def check_subjects(run_dir: Path, data: dict[str, Any]) -> list[str]:
    """Each subject's and each record's sha256 against the file in the run directory."""
    problems = []
    named = [(str(s.get("name", "")), (s.get("digest") or {}).get("sha256"), "subject")
             for s in data.get("subject") or []]  # fmt: skip
    records = (data.get("predicate") or {}).get("records") or {}
    named += [(str(name), digest, "record") for name, digest in records.items()]
    for name, expected, what in named:
        path = (run_dir / name).resolve()
        if not path.is_relative_to(run_dir.resolve()) or not path.is_file():
            problems.append(f"{what} {name}: no such file in {run_dir}")
        elif sha256_file(path) != expected:
            problems.append(f"{what} {name}: sha256 differs from the file's")
    return problems


def finalize(run_dir: Path, host: HostView) -> FinalManifest:
    """Read what the script wrote, make it truthful, add the host view, write it last."""
    path = run_dir / MANIFEST
    data = read_manifest(path)
    problems: list[str] = []
    if data is None:
        data = placeholder(host, schema_problem(path))
    predicate = data["predicate"]
    status = str(predicate.get("status") or "failed")
    if status == "running" or (status == "succeeded" and host.ended != "exited"):
        status = "interrupted" if host.ended == "interrupted" else "failed"
        predicate["error"] = predicate.get("error") or (
            f"the training process ended ({ending(host)}) before writing its final manifest"
        )
    elif status == "succeeded" and host.exit_code not in (0, None):
        status = "failed"
        predicate["error"] = f"exit status {host.exit_code} after the script reported success"
    if status == "succeeded":
        problems = check_subjects(run_dir, data)
        if not data.get("subject"):
            problems.append("a succeeded run lists no adapter files")
        if problems:
            status = "failed"
            predicate["error"] = "; ".join(problems)
    if status != "succeeded":
        data["subject"] = []  # never claim an adapter of a run that did not finish
    predicate["status"] = status
    predicate["host"] = {**asdict(host), "qlc_version": __version__, "problems": problems}
    final = FinalManifest(path=path, status=status, data=data, problems=problems)
    report_error = None
    try:  # the report describes the final record; its hash goes into it
        write_report(run_dir, final)
    except OSError as error:
        report_error = error
    records = predicate.setdefault("records", {})
    for name in contract.HOST_RECORDS:
        if (run_dir / name).is_file() and report_error is None:
            records[name] = sha256_file(run_dir / name)
    try:
        write_manifest(path, data)
        write_digest(run_dir)
    except OSError as error:  # e.g. the disk is full
        return record_unwritable(run_dir, data, problems, error)
    return replace(final, report_error=report_error)


def write_manifest(path: Path, data: dict[str, Any]) -> None:
    """The manifest, checked against the schema, written whole or not at all."""
    write_atomic(path, contract.manifest_bytes(data))


def write_digest(run_dir: Path) -> None:
    path = run_dir / MANIFEST
    write_atomic(run_dir / MANIFEST_DIGEST, f"{sha256_file(path)}  {MANIFEST}\n".encode())


def record_unwritable(
    run_dir: Path, data: dict[str, Any], problems: list[str], error: OSError
) -> FinalManifest:
    """The final manifest could not be written atomically (no room for a temporary file):
    record the run as failed in place, compactly, else as a bare statement, so it never
    keeps saying "running". `manifest_updated` is False when even that failed."""
    path = run_dir / MANIFEST
    predicate = data["predicate"]
    predicate["status"] = "failed"
    unwritten = f"the final manifest could not be written: {error.strerror or error}"
    predicate["error"] = "; ".join(filter(None, [predicate.get("error"), unwritten]))
    data["subject"] = []
    bare = {key: data.get(key) for key in ("_type", "predicateType")}
    bare_predicate = {k: predicate.get(k) for k in ("status", "error", "spec", "host")}
    candidates: list[dict[str, Any]] = [data, {**bare, "subject": [], "predicate": bare_predicate}]
    updated = False
    for candidate in candidates:
        try:
            write_in_place(path, json.dumps(candidate, separators=(",", ":")).encode())
        except OSError:
            continue
        updated = True
        break
    digest_written = False
    if updated:
        with contextlib.suppress(OSError):
            write_digest(run_dir)
            digest_written = True
    if not digest_written:  # an earlier digest would no longer match: it would read as an edit
        with contextlib.suppress(OSError):
            (run_dir / MANIFEST_DIGEST).unlink(missing_ok=True)
    return FinalManifest(path, "failed", data, problems, error, manifest_updated=updated)


def write_in_place(path: Path, data: bytes) -> None:
    """Overwrite without a temporary file: truncating first frees the old bytes, so this
    can succeed on a full disk where write_atomic cannot. Not atomic: the last resort.
    A link in the file's place is refused (ELOOP), never followed."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
    with os.fdopen(os.open(path, flags, 0o644), "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def placeholder(host: HostView, problem: str | None) -> dict[str, Any]:
    """A manifest for a run whose trainer wrote none (it did not start, or died early) or one
    that is not a qlc manifest: a failed run, claiming nothing."""
    why = f"no manifest from the trainer ({ending(host)})"
    if problem is not None and not problem.endswith(": no manifest"):
        why = f"{problem} ({ending(host)})"
    return {
        "_type": contract.STATEMENT_TYPE,
        "subject": [],
        "predicateType": contract.PREDICATE_TYPE,
        "predicate": {
            "version": contract.MANIFEST_VERSION,
            "status": "failed",
            "qlc_version": __version__,
            "spec": {},
            "plan_sha256": None,
            "lock_sha256": None,
            "image": {"id": host.image_id, "digest": None, "base": host.base_image},
            "inputs": {},
            "run": {  # nothing is known of a run that recorded nothing
                **dict.fromkeys(contract.RUN_SCHEMA),
                "started_at": host.started_at,
                "finished_at": host.finished_at,
            },
            "effective": {},
            "substitutions": [],
            "decisions": [],
            "observed": {},
            "environment": {},
            "metrics": {},
            "records": {},
            "tracking": [],
            "error": why,
        },
    }


def ending(host: HostView) -> str:
    if host.oom_killed:
        return "killed for lack of memory"
    if host.ended == "interrupted":
        return "interrupted"
    if host.ended in ("lost", "not-started"):
        return host.detail.splitlines()[0] if host.detail else host.ended
    return f"exit status {host.exit_code}"


def manifest_edited(run_dir: Path) -> str | None:
    """Why the manifest no longer matches what the runtime wrote, or None when it does."""
    digest_file, path = run_dir / MANIFEST_DIGEST, run_dir / MANIFEST
    if not path.is_file():
        return f"{path}: no manifest"
    if not digest_file.is_file():
        return f"{digest_file}: missing, so the manifest cannot be checked"
    words = read_nofollow(digest_file).decode("utf-8", errors="replace").split()
    recorded = words[0] if words else ""
    if recorded != sha256_file(path):
        return f"{path} was changed after the run (its sha256 differs from {MANIFEST_DIGEST})"
    return None


def losses(run_dir: Path) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(step, loss) of training and of evaluation from metrics.jsonl."""
    train, evaluation = [], []
    path = run_dir / contract.METRICS_FILE
    if not path.is_file():
        return [], []
    try:
        text = read_nofollow(path).decode("utf-8", errors="replace")
    except OSError:
        return [], []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            continue
        if isinstance(record.get("loss"), int | float) and record.get("event", "train") == "train":
            train.append((record["step"], float(record["loss"])))
        if isinstance(record.get("eval_loss"), int | float):
            evaluation.append((record["step"], float(record["eval_loss"])))
    return train, evaluation


def plot_losses(run_dir: Path) -> Path | None:
    train, evaluation = losses(run_dir)
    if not train and not evaluation:
        return None
    try:
        import matplotlib
    except ImportError:  # qlc installed without matplotlib: the report says so
        return None
    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(figsize=(7, 4), dpi=100)
    if train:
        axes.plot(*zip(*train, strict=True), label="train loss")
    if evaluation:
        axes.plot(*zip(*evaluation, strict=True), marker="o", label="eval loss")
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    target = run_dir / contract.LOSS_PLOT_FILE
    image = io.BytesIO()
    figure.savefig(image, format="png", metadata={"Software": None})
    write_atomic(target, image.getvalue())
    pyplot.close(figure)
    return target


def write_report(run_dir: Path, final: FinalManifest) -> Path:
    predicate = final.data["predicate"]
    host = predicate.get("host", {})
    plot = plot_losses(run_dir)
    lines = [
        f"# qlc run: {(predicate.get('spec') or {}).get('name', '?')}",
        "",
        f"- status: **{final.status}** ({ending_text(host)})",
        f"- error: {predicate.get('error')}" if predicate.get("error") else "",
        f"- duration: {host.get('duration_s')} s, {host.get('started_at')} to "
        f"{host.get('finished_at')}",
        image_line(host, predicate.get("image") or {}),
        f"- spec sha256: {(predicate.get('spec') or {}).get('sha256')}",
        f"- lock sha256: {predicate.get('lock_sha256') or 'none (no lock beside the spec)'}",
        "",
        "## Metrics",
        "",
        *table({k: shown_value(k, v) for k, v in (predicate.get("metrics") or {}).items()}),
        "",
        "## Adapter files",
        "",
        *(
            [f"- `{s['name']}` sha256 `{s['digest']['sha256']}`" for s in final.data["subject"]]
            or ["- none (the run did not succeed)"]
        ),
        "",
        "## Tracking",
        "",
        *tracking_lines(predicate.get("tracking") or []),
        "",
        "## Environment observed in the run",
        "",
        *table({k: v for k, v in (predicate.get("environment") or {}).items() if k != "packages"}),
    ]
    if plot is not None:
        lines += ["", "## Loss", "", "![loss curve](loss.png)"]
    elif any(losses(run_dir)):
        lines += ["", "## Loss", "", "(no loss.png: install matplotlib to draw it)"]
    target = run_dir / contract.REPORT_FILE
    write_atomic(target, ("\n".join(line for line in lines if line is not None) + "\n").encode())
    return target


def tracking_lines(entries: list[Any]) -> list[str]:
    """Where each tracker logged (its URL, run id, folder in the run directory) or its error."""
    lines = []
    for entry in entries:
        if not isinstance(entry, dict):
            continue
        name = entry.get("tracker", "?")
        if entry.get("error"):
            lines.append(f"- {name}: failed, switched off ({entry['error']})")
            continue
        parts = [f"{key} `{entry[key]}`" for key in ("url", "run_id", "log_dir", "file")
                 if entry.get(key)]  # fmt: skip
        if entry.get("sync"):
            parts.append(f"upload with `{entry['sync']}` (from the run directory)")
        lines.append(f"- {name}: " + (", ".join(parts) or "started"))
    return lines or ["- none"]


def image_line(host: dict[str, Any], image: dict[str, Any]) -> str:
    """Where the run ran: the image (and the registry digest it was pushed as), or --local."""
    if host.get("mode") == "local":
        return "- image: none (ran locally with --local, in the Python that ran qlc)"
    line = f"- image: {host.get('image_tag')} ({host.get('image_id')})"
    if image.get("digest"):
        line += f", pushed as {image['digest']}"
    return line + f", base {host.get('base_image')}"


def ending_text(host: dict[str, Any]) -> str:
    code, ended = host.get("exit_code"), host.get("ended")
    return f"{ended}, exit status {code}" + (", OOM-killed" if host.get("oom_killed") else "")


def shown_value(key: str, value: Any) -> Any:
    """Bytes as GiB for people (peak_memory_bytes 786345984 reads as 0.73 GiB)."""
    if key.endswith("_bytes") and isinstance(value, int) and not isinstance(value, bool):
        return f"{value / 2**30:.2f} GiB"
    return value


def table(values: dict[str, Any]) -> list[str]:
    if not values:
        return ["(none)"]
    rows = ["| key | value |", "|---|---|"]
    rows += [f"| {key} | {json.dumps(value)} |" for key, value in sorted(values.items())]
    return rows
