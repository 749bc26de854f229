"""The run's manifest, written by the trainer itself (an in-toto statement following the
contract's schema): "running" at start, the final one last, with what actually ran: the
effective settings, the plan's substitutions, the run-time decisions, the inputs' hashes, the
environment observed, the metrics and the hashes of every record the run wrote."""

from __future__ import annotations

import os
import platform
import subprocess
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from qlc import contract
from qlc.compiler.plan import Plan
from qlc.trainer.rows import SourceRows
from qlc.trainer.runenv import RunEnv

PACKAGES = ("accelerate", "bitsandbytes", "datasets", "numpy", "peft", "pydantic", "safetensors",
            "tokenizers", "torch", "transformers", "trl")  # fmt: skip


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def gpu_driver() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.stdout.strip() else None


def observed_environment() -> dict[str, Any]:
    import torch

    cuda = torch.cuda.is_available()
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else []
    packages = package_versions()
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "gpus": gpus,
        "driver": gpu_driver() if cuda else None,
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "bitsandbytes": packages.get("bitsandbytes"),
        "packages": packages,
        "user": {"uid": os.getuid(), "gid": os.getgid()},
    }


def effective_settings(plan: Plan) -> dict[str, Any]:
    """{setting: value} of the plan that runs (its smoke and world-size variants applied):
    exactly the rows `qlc explain` prints for that plan."""
    settings = {row.name: row.value for row in plan.settings()}
    if plan.data.has_eval:  # what eval_loss means, in words (the same in every engine)
        settings["eval_loss_definition"] = plan.train.eval_metric
    return settings


def new_manifest(
    plan: Plan, plan_sha256: str, lock_sha256: str | None, env: RunEnv
) -> dict[str, Any]:
    return {
        "_type": contract.STATEMENT_TYPE,
        "subject": [],
        "predicateType": contract.PREDICATE_TYPE,
        "predicate": {
            "version": contract.MANIFEST_VERSION,
            "status": "running",
            "qlc_version": plan.qlc_version,
            "spec": {"name": plan.spec_name, "sha256": plan.spec_sha256},
            "plan_sha256": plan_sha256,
            "lock_sha256": lock_sha256,
            "image": {"id": env.image_id, "digest": env.image_digest, "base": env.base_image},
            "inputs": {"model": {}, "data": {}},
            "run": {
                "run_id": env.run_id,
                "seed": plan.job.seed,
                "deterministic": plan.job.deterministic,
                "smoke": env.smoke,
                "engine": plan.engine.name,
                "world_size": env.world_size,
                "examples_per_step": None,
                "grad_accum": None,
                "started_at": now(),
                "finished_at": None,
                "resumed_from": None,
            },
            "effective": {},
            "substitutions": [s.model_dump(mode="json") for s in plan.substitutions],
            "decisions": [],
            "observed": {},
            "environment": observed_environment(),
            "metrics": {},
            "records": {},
            "tracking": [],
            "error": None,
        },
    }


def record_plan(manifest: dict[str, Any], plan: Plan) -> None:
    """The plan that actually runs (world size applied): its settings and schedule."""
    predicate = manifest["predicate"]
    predicate["effective"] = effective_settings(plan)
    predicate["run"]["examples_per_step"] = plan.schedule.examples_per_step
    predicate["run"]["grad_accum"] = plan.schedule.grad_accum


def input_record(
    repo_id: str | None,
    revision: str | None,
    local: str | None,
    repo_type: str,
    uri: str | None = None,
) -> dict[str, Any]:
    """What was read: a local path's files (an object-store input: the object's URI and the
    files of the copy downloaded into the run directory), or a hub repository at the commit
    it resolved to."""
    path = Path(local) if local else None
    if path is None and repo_id is not None:
        path = hub_snapshot(repo_id, revision, repo_type)
        revision = path.name if path is not None else revision  # snapshots are named by commit
    record = {
        "id": repo_id,
        "revision": revision,
        "path": local,
        "files": contract.hash_tree(path) if path is not None and path.exists() else {},
    }
    return record if uri is None else {**record, "uri": uri}


def mixture_record(sources: list[SourceRows]) -> dict[str, Any]:
    """A mixture's inputs: each source's record with its weight and the rows it gave, and
    every file's hash under sources/<index>/ (what reproduce compares)."""
    records = []
    files: dict[str, str] = {}
    for index, read in enumerate(sources):
        source = read.plan
        record = input_record(source.hub_id, source.revision, read.local_file, "dataset")
        records.append({**record, "split": source.split, "weight": source.weight,
                        "rows": len(read.rows), "train_rows": read.train_rows,
                        "eval_rows": read.eval_rows})  # fmt: skip
        files.update({contract.source_file_name(index, name): digest
                      for name, digest in record["files"].items()})  # fmt: skip
    return {"id": None, "revision": None, "path": None, "files": files, "sources": records}


def hub_snapshot(repo_id: str, revision: str | None, repo_type: str) -> Path | None:
    """The local copy of a hub repository that loading just fetched, if the cache holds one."""
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(
                repo_id, revision=revision, repo_type=repo_type, local_files_only=True
            )
        )
    except Exception:  # not in the cache (e.g. datasets kept only its own arrow files)
        return None


def finish_manifest(manifest: dict[str, Any], out: Path, status: str, error: str | None) -> None:
    """The final state: status, error, the adapter as subjects (a succeeded run only) and the
    hashes of the records written so far."""
    predicate = manifest["predicate"]
    predicate.update(status=status, error=error)
    predicate["run"]["finished_at"] = now()
    predicate["metrics"] = {k: contract.finite_or_none(v) for k, v in predicate["metrics"].items()}
    adapter = out / contract.ADAPTER_DIR
    manifest["subject"] = (
        contract.subject_entries(contract.hash_tree(adapter), f"{contract.ADAPTER_DIR}/")
        if status == "succeeded"
        else []
    )
    predicate["records"] = {
        name: contract.sha256_file(out / name)
        for name in contract.TRAINER_RECORDS
        if (out / name).is_file()
    }


def write_manifest(out: Path, manifest: dict[str, Any]) -> None:
    contract.write_bytes_atomic(out / contract.MANIFEST_FILE, contract.manifest_bytes(manifest))
