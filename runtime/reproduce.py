"""reproduce: rerun a recorded run and say, item by item, whether it matched.

Order: the manifest itself (its sha256 against manifest.sha256, so an edit by hand is
caught, and its subjects against the run's files, so an edit that also rewrote
manifest.sha256 is caught too), the inputs as they are now against the recorded hashes
(spec, lock, model files, data files), the image (reused when the recorded one is still
there and spec and lock are unchanged, rebuilt otherwise), the rerun, then the outputs:
adapter files bit-identical, or final metrics within the stated relative tolerance, and
the hardware/software observed.

The image verdict says which image ran: "pulled REPO@sha256:..." (the manifest records a
registry digest: the pushed image, checked to be the recorded image id), "local image
sha256:..." (no digest, or the registry could not be reached: said so), or "rebuilt".
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from qlc.compiler.plan import TEMPLATE_KEY, Plan, source_key
from qlc.contract import PLAN_FILE, hash_tree, sha256_file, source_file_name
from qlc.runtime.docker_engine import DockerEngine, Engine, ImageInfo, PullError
from qlc.runtime.manifest import check_subjects, manifest_edited, read_manifest
from qlc.runtime.pull import ImageMismatch, digest_reference, pull_verified
from qlc.runtime.records import BuildRecord
from qlc.runtime.run import (
    RunFailed,
    RunInputError,
    RunInputs,
    RunResult,
    find_record_for_image,
    local_or_pulled,
    plan_of_image,
    run_container,
    run_inputs,
)

MODEL_CARD = "adapter/README.md"  # describes the run (timings included): not the adapter
METRIC_TOLERANCE = 0.01  # relative, on final_loss and eval_loss
INPUT_ITEMS = ("manifest", "spec", "lock", "model files", "data hash")
HARDWARE_KEYS = ("gpus", "driver", "cuda", "torch", "bitsandbytes", "python")


class ReproduceError(Exception):
    """The manifest cannot be used to reproduce anything (exit 2)."""


@dataclass(frozen=True)
class Verdict:
    item: str
    ok: bool
    detail: str


@dataclass(frozen=True)
class Reproduction:
    reproduced: bool
    verdicts: list[Verdict]
    rerun_dir: Path | None


def compare_files(item: str, recorded: dict[str, str], current: dict[str, str]) -> Verdict:
    if recorded == current:
        return Verdict(item, True, f"unchanged ({len(current)} files)")
    changed = sorted(n for n in recorded.keys() & current.keys() if recorded[n] != current[n])
    added, removed = (
        sorted(current.keys() - recorded.keys()),
        sorted(recorded.keys() - current.keys()),
    )
    parts = [f"{name}: sha256 {recorded[name][:12]} -> {current[name][:12]}" for name in changed]
    parts += [f"{name}: added" for name in added] + [f"{name}: removed" for name in removed]
    return Verdict(item, False, "changed: " + "; ".join(parts))


def input_verdicts(predicate: dict[str, Any], inputs: RunInputs) -> list[Verdict]:
    verdicts = []
    assert inputs.spec_path is not None
    spec_now = sha256_file(inputs.spec_path)
    spec_then = (predicate.get("spec") or {}).get("sha256")
    verdicts.append(
        Verdict(
            "spec",
            spec_now == spec_then,
            "unchanged"
            if spec_now == spec_then
            else f"changed: sha256 {str(spec_then)[:12]} -> {spec_now[:12]}",
        )
    )
    lock_path = inputs.spec_path.with_suffix(".lock")
    lock_now = sha256_file(lock_path) if lock_path.is_file() else None
    lock_then = predicate.get("lock_sha256")
    verdicts.append(
        Verdict(
            "lock",
            lock_now == lock_then,
            "unchanged"
            if lock_now == lock_then
            else f"changed: sha256 {str(lock_then)[:12]} -> {str(lock_now)[:12]}",
        )
    )
    recorded = predicate.get("inputs") or {}
    if inputs.local.model_dir is not None:
        then = (recorded.get("model") or {}).get("files") or {}
        verdicts.append(compare_files("model files", then, hash_tree(inputs.local.model_dir)))
    if inputs.local.data_file is not None:
        then = (recorded.get("data") or {}).get("files") or {}
        verdicts.append(compare_files("data hash", then, hash_tree(inputs.local.data_file)))
    if any(source_key(i) in inputs.local.files for i in range(len(inputs.plan.data.sources))):
        verdicts.append(mixture_verdict(inputs, (recorded.get("data") or {}).get("files") or {}))
    if TEMPLATE_KEY in inputs.local.files:
        then = (recorded.get("chat_template") or {}).get("files") or {}
        now = hash_tree(inputs.local.files[TEMPLATE_KEY])
        verdicts.append(compare_files("chat template hash", then, now))
    return verdicts


def mixture_verdict(inputs: RunInputs, then: dict[str, str]) -> Verdict:
    """The local sources of a mixture now against the hashes the run recorded for them."""
    local = [i for i in range(len(inputs.plan.data.sources)) if source_key(i) in inputs.local.files]
    now = {source_file_name(i, name): digest for i in local
           for name, digest in hash_tree(inputs.local.files[source_key(i)]).items()}  # fmt: skip
    prefixes = tuple(source_file_name(i, "") for i in local)
    recorded = {name: digest for name, digest in then.items() if name.startswith(prefixes)}
    return compare_files("data sources hash", recorded, now)


def output_verdicts(old: dict[str, Any], new: dict[str, Any]) -> list[Verdict]:
    old_subjects = subjects(old)
    new_subjects = subjects(new)
    old_card, new_card = old_subjects.pop(MODEL_CARD, None), new_subjects.pop(MODEL_CARD, None)
    identical = bool(old_subjects) and old_subjects == new_subjects
    adapter = Verdict(
        "adapter",
        identical,
        f"bit-identical ({len(new_subjects)} files)"
        if identical
        else compare_files("adapter", old_subjects, new_subjects).detail,
    )
    verdicts = [adapter]
    if old_card is not None or new_card is not None:
        same = old_card == new_card
        verdicts.append(
            Verdict(
                "model card",
                True,
                "identical" if same else "differs (it records this run's timings; not compared)",
            )
        )
    metrics = metric_verdict(
        old["predicate"].get("metrics") or {}, new["predicate"].get("metrics") or {}
    )
    return [*verdicts, metrics, hardware_verdict(old["predicate"], new["predicate"])]


def subjects(manifest: dict[str, Any]) -> dict[str, str]:
    return {s["name"]: s["digest"]["sha256"] for s in manifest.get("subject") or []}


def metric_verdict(old: dict[str, Any], new: dict[str, Any]) -> Verdict:
    compared, off = [], []
    for key in ("final_loss", "eval_loss"):
        a, b = old.get(key), new.get(key)
        if not isinstance(a, int | float) or not isinstance(b, int | float):
            continue
        compared.append(key)
        if not math.isclose(a, b, rel_tol=METRIC_TOLERANCE, abs_tol=1e-12):
            off.append(f"{key} {a:.6g} -> {b:.6g}")
    if not compared:
        return Verdict("metrics", False, "no final loss recorded to compare")
    if off:
        return Verdict("metrics", False, f"outside {METRIC_TOLERANCE:.0%}: " + ", ".join(off))
    return Verdict("metrics", True, f"{', '.join(compared)} within {METRIC_TOLERANCE:.0%}")


def hardware_verdict(old: dict[str, Any], new: dict[str, Any]) -> Verdict:
    before, after = old.get("environment") or {}, new.get("environment") or {}
    changed = [
        f"{k}: {before.get(k)} -> {after.get(k)}"
        for k in HARDWARE_KEYS
        if before.get(k) != after.get(k)
    ]
    return Verdict("hardware", not changed, "same" if not changed else "; ".join(changed))


def manifest_verdict(run_dir: Path, manifest: dict[str, Any]) -> Verdict | None:
    """A failed verdict when the manifest is not what the runtime wrote for these files:
    its bytes differ from manifest.sha256 or (that file rewritten too) its subjects do not
    hash to the run's files. None when it checks out."""
    edited = manifest_edited(run_dir)
    if edited is not None:
        return Verdict("manifest", False, f"edited by hand: {edited}")
    mismatches = check_subjects(run_dir, manifest)
    if mismatches:
        return Verdict(
            "manifest",
            False,
            "does not describe the run's files (edited by hand?): " + "; ".join(mismatches),
        )
    return None


def reproduce(
    manifest_path: Path,
    *,
    project_dir: Path | None = None,
    engine: Engine | None = None,
    console: Console | None = None,
    reuse_image: bool = True,
    local: bool = False,
) -> Reproduction:
    """Rerun a recorded run (in a container, or with local=True in this Python, as `qlc run
    --local` ran it) and give a verdict per item."""
    console = console or Console(stderr=True, highlight=False, soft_wrap=True)
    project = (project_dir or Path.cwd()).resolve()
    manifest_path = manifest_path.resolve()
    original = read_manifest(manifest_path)
    if original is None:
        raise ReproduceError(f"{manifest_path}: not a qlc manifest (unreadable or not JSON)")
    failed = manifest_verdict(manifest_path.parent, original)
    if failed is not None:
        return Reproduction(False, [failed], None)
    predicate = original["predicate"]
    host = predicate.get("host") or {}
    if predicate.get("status") != "succeeded":
        raise ReproduceError(
            f"{manifest_path}: the recorded run {predicate.get('status')}: "
            "only a succeeded run can be reproduced"
        )
    if not host.get("spec_path"):
        raise ReproduceError(
            f"{manifest_path}: no host record of the spec (the run did not go "
            "through `qlc run`): rerun it with `qlc run SPEC` instead"
        )
    spec_path = Path(host["spec_path"])
    if not spec_path.is_file():
        raise ReproduceError(f"{manifest_path}: the recorded spec {spec_path} is gone")
    inputs = recorded_inputs(manifest_path.parent, predicate, spec_path, project)
    verdicts = [
        Verdict("manifest", True, "matches manifest.sha256 and the run's files"),
        *input_verdicts(predicate, inputs),
    ]
    smoke = bool((predicate.get("run") or {}).get("smoke"))
    if local or (host.get("mode") == "local" and engine is None and not reuse_image):
        rerun = _rerun_local(spec_path, project, smoke, console)
        verdicts.append(Verdict("image", True, "none: rerun in this Python (--local)"))
    else:
        engine = engine or DockerEngine()
        record = image_for(host, predicate, inputs, verdicts, engine, project, console,
                           reuse_image)  # fmt: skip
        if record is None:
            return Reproduction(False, verdicts, None)
        rerun = _rerun(record, spec_path, project, smoke, engine, console)
    if rerun.status != "succeeded":
        verdicts.append(Verdict("rerun", False, f"{rerun.status} ({rerun.run_dir})"))
        return Reproduction(False, verdicts, rerun.run_dir)
    verdicts += output_verdicts(original, rerun.manifest.data)
    by_item = {v.item: v for v in verdicts}
    inputs_ok = all(v.ok for v in verdicts if v.item in INPUT_ITEMS)
    reproduced = inputs_ok and (by_item["adapter"].ok or by_item["metrics"].ok)
    return Reproduction(reproduced, verdicts, rerun.run_dir)


def image_for(
    host: dict[str, Any],
    predicate: dict[str, Any],
    inputs: RunInputs,
    verdicts: list[Verdict],
    engine: Engine,
    project: Path,
    console: Console,
    reuse_image: bool,
) -> BuildRecord | None:
    """The image to rerun, its "image" verdict appended: the pushed image pulled by the
    manifest's digest, else the recorded image still in the daemon, else a build of the spec
    as it is now (a cache hit when nothing changed). Only with spec and lock unchanged is a
    recorded image reused. None (with a failed verdict) when the pulled image is not the one
    the manifest names: rerunning something else would prove nothing."""
    recorded_id = str(host.get("image_id") or (predicate.get("image") or {}).get("id") or "")
    inputs_same = all(v.ok for v in verdicts if v.item in ("spec", "lock"))
    reference = digest_reference((predicate.get("image") or {}).get("digest"))
    note = ""
    if reuse_image and inputs_same and reference is not None:
        try:
            image = pull_verified(engine, reference, recorded_id or None)
        except ImageMismatch as error:
            verdicts.append(Verdict("image", False, f"not rerun: {error}"))
            return None
        except PullError as error:
            note = f"{error}; instead "
            console.print(f"warning: {error}: using a local image or a rebuild", markup=False)
        else:
            return pulled_record(image, reference, host, inputs, verdicts, engine, project, console)
    if reuse_image and inputs_same and recorded_id and engine.find_image(recorded_id):
        found = find_record_for_image(project, recorded_id)
        if found is not None:
            verdicts.append(Verdict("image", True, f"{note}local image {recorded_id}"))
            return found
    record = rebuild(host, inputs, engine, project, console)
    same = record.image_id == recorded_id
    verdicts.append(
        Verdict(
            "image",
            same or inputs_same,
            f"{note}rebuilt: the same image {recorded_id}"
            if same
            else f"{note}rebuilt: {recorded_id or 'none'} -> {record.image_id}",
        )
    )
    return record


def pulled_record(
    image: ImageInfo,
    reference: str,
    host: dict[str, Any],
    inputs: RunInputs,
    verdicts: list[Verdict],
    engine: Engine,
    project: Path,
    console: Console,
) -> BuildRecord:
    """A build record to run the pulled image under: this project's record of that image,
    else the recorded tag put back on it and the spec's build found in the cache."""
    record = find_record_for_image(project, image.id)
    if record is None:
        tag = str(host.get("image_tag") or "")
        if ":" in tag.rsplit("/", 1)[-1]:
            repository, name = tag.rsplit(":", 1)
            engine.tag(image.id, repository, name)
        record = rebuild(host, inputs, engine, project, console)
    if record.image_id != image.id:
        verdicts.append(
            Verdict(
                "image",
                False,
                f"pulled {reference} (image {image.id}), but the spec as it is now builds "
                f"image {record.image_id} (another qlc version?): rebuilt and ran that",
            )
        )
        return record
    verdicts.append(Verdict("image", True, f"pulled {reference} (image {image.id})"))
    # The rerun's manifest records the digest too: the same pushed image ran both times.
    return record.model_copy(update={"registry_digest": reference})


def recorded_inputs(
    run_dir: Path, predicate: dict[str, Any], spec_path: Path, project: Path
) -> RunInputs:
    """The recorded run's plan (its plan.json, by the manifest's hash) and where its local
    inputs are now."""
    plan_file = run_dir / PLAN_FILE
    expected = predicate.get("plan_sha256")
    if not plan_file.is_file() or sha256_file(plan_file) != expected:
        raise ReproduceError(
            f"{run_dir}: no {PLAN_FILE} with the manifest's plan_sha256: the run directory is "
            "incomplete"
        )
    try:
        plan = Plan.model_validate_json(plan_file.read_bytes())
    except ValueError:
        raise ReproduceError(
            f"{plan_file}: made by another qlc version; use that version"
        ) from None
    try:
        return run_inputs(plan, spec_path, project)
    except RunInputError as error:
        raise ReproduceError(str(error)) from None


def rebuild(
    host: dict[str, Any], inputs: RunInputs, engine: Engine, project: Path, console: Console
) -> BuildRecord:
    from qlc.runtime.build import build

    base = host.get("base_image") if host.get("base_image_overridden") else None
    assert inputs.spec_path is not None
    # build's record keeps the push of the same image (records.save_build)
    return build(inputs.spec_path, base, project_dir=project, engine=engine, console=console)


def _rerun(
    record: BuildRecord,
    spec_path: Path,
    project: Path,
    smoke: bool,
    engine: Engine,
    console: Console,
) -> RunResult:
    """The image's own plan (its label), run with this host's inputs."""
    try:
        image = local_or_pulled(record, engine, console)
        inputs = run_inputs(plan_of_image(image), spec_path, project)
        return run_container(record, inputs, smoke=smoke, engine=engine, console=console)
    except RunFailed as failure:
        console.print(str(failure), markup=False)
        return failure.result


def _rerun_local(spec_path: Path, project: Path, smoke: bool, console: Console) -> RunResult:
    from qlc.runtime.run_local import run_local

    try:
        return run_local(spec_path, project, smoke=smoke, console=console)
    except RunFailed as failure:
        console.print(str(failure), markup=False)
        return failure.result
