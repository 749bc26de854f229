"""reproduce's image decision with a fake engine: pull the pushed image by the manifest's
digest, fall back (and say so) when the registry cannot serve it, refuse a pulled image that
is not the recorded one, and keep the local-image/rebuild path for manifests without one."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from rich.console import Console
from runtime_fakes import FakeEngine, tiny_inputs

from qlc.runtime import records
from qlc.runtime.docker_engine import ImageInfo, PullError
from qlc.runtime.reproduce import Verdict, image_for
from qlc.runtime.run import RunInputs

IMAGE_ID = "sha256:" + hashlib.sha256(b"recorded image config").hexdigest()
OTHER_ID = "sha256:" + hashlib.sha256(b"another image config").hexdigest()
DIGEST = "sha256:" + hashlib.sha256(b"pushed manifest").hexdigest()
REFERENCE = f"127.0.0.1:5000/qlc/tiny@{DIGEST}"
TAG = "qlc/tiny:0123456789ab"


def recorded(spec: Path, image_id: str = IMAGE_ID) -> records.BuildRecord:
    return records.BuildRecord(
        job="tiny", tag=TAG, image_id=image_id, image_key="0" * 64,
        context_hash="sha256:" + "c" * 64, context_dir="/ctx", spec_path=str(spec),
        spec_sha256="s" * 64, lock_sha256=None, base_image="qlc-base:bookworm",
        base_image_overridden=True, base_image_id=None, base_image_digests=[],
        qlc_version="0", built_at="2026-01-01T00:00:00+00:00", build_seconds=1.0,
        cache_hit=False, log_path=None,
    )  # fmt: skip


def image(image_id: str = IMAGE_ID) -> ImageInfo:
    return ImageInfo(image_id, (), {}, (), "10001:10001")


def decide(
    engine: FakeEngine,
    project: Path,
    inputs: RunInputs,
    digest: str | None,
    reuse_image: bool = True,
    console: Console | None = None,
) -> tuple[records.BuildRecord | None, Verdict]:
    verdicts = [Verdict("spec", True, "unchanged"), Verdict("lock", True, "unchanged")]
    host = {"image_id": IMAGE_ID, "image_tag": TAG, "base_image": "qlc-base:bookworm",
            "base_image_overridden": True}  # fmt: skip
    predicate = {"image": {"id": IMAGE_ID, "digest": digest, "base": "qlc-base:bookworm"}}
    console = console or Console(quiet=True)
    record = image_for(host, predicate, inputs, verdicts, engine, project, console, reuse_image)
    assert verdicts[-1].item == "image"
    return record, verdicts[-1]


@pytest.fixture
def built(tiny_project: Path) -> tuple[Path, RunInputs]:
    """A project whose build record names IMAGE_ID."""
    project = tiny_project.parents[1]
    records.save_build(project, recorded(tiny_project))
    return project, tiny_inputs(tiny_project)


def test_manifest_digest_pulls_the_pushed_image(built: tuple[Path, RunInputs]) -> None:
    project, inputs = built
    engine = FakeEngine(registry={REFERENCE: image()})
    record, verdict = decide(engine, project, inputs, REFERENCE)
    assert verdict == Verdict("image", True, f"pulled {REFERENCE} (image {IMAGE_ID})")
    assert record is not None and record.image_id == IMAGE_ID
    assert record.registry_digest == REFERENCE  # the rerun's manifest records it too
    assert f"pull {REFERENCE}" in engine.calls
    assert not [call for call in engine.calls if call.startswith("build")]


def test_unreachable_registry_falls_back_to_the_local_image_and_says_so(
    built: tuple[Path, RunInputs],
) -> None:
    project, inputs = built
    refused = PullError(f"cannot pull {REFERENCE}: connection refused")
    engine = FakeEngine(images={IMAGE_ID: image()}, pull_error=refused)
    console = Console(record=True, width=300)
    record, verdict = decide(engine, project, inputs, REFERENCE, console=console)
    assert record is not None and record.image_id == IMAGE_ID
    assert verdict.ok
    assert verdict.detail == (
        f"cannot pull {REFERENCE}: connection refused; instead local image {IMAGE_ID}"
    )
    assert "warning: cannot pull" in console.export_text()


def test_unreachable_registry_without_a_local_image_rebuilds_and_says_so(
    built: tuple[Path, RunInputs],
) -> None:
    project, inputs = built
    engine = FakeEngine(pull_error=PullError(f"cannot pull {REFERENCE}: connection refused"))
    record, verdict = decide(engine, project, inputs, REFERENCE)
    assert record is not None and record.image_id != IMAGE_ID  # the fake built a new one
    assert verdict.detail.startswith(
        f"cannot pull {REFERENCE}: connection refused; instead rebuilt:"
    )
    assert [call for call in engine.calls if call.startswith("build")]


def test_pulled_image_that_is_not_the_recorded_one_is_not_rerun(
    built: tuple[Path, RunInputs],
) -> None:
    project, inputs = built
    engine = FakeEngine(registry={REFERENCE: image(OTHER_ID)}, images={IMAGE_ID: image()})
    record, verdict = decide(engine, project, inputs, REFERENCE)
    assert record is None
    assert not verdict.ok
    assert verdict.detail == (
        f"not rerun: {REFERENCE} is image {OTHER_ID}, but the record names image {IMAGE_ID}: "
        "the registry holds a different image under this name; rebuild with "
        "`qlc build SPEC` and push again"
    )
    assert not [call for call in engine.calls if call.startswith("build")]


def test_manifest_without_a_digest_reuses_the_local_image(built: tuple[Path, RunInputs]) -> None:
    project, inputs = built
    engine = FakeEngine(images={IMAGE_ID: image()})
    record, verdict = decide(engine, project, inputs, None)
    assert record is not None and record.image_id == IMAGE_ID
    assert verdict == Verdict("image", True, f"local image {IMAGE_ID}")
    assert not [call for call in engine.calls if call.startswith(("pull", "build"))]


def test_rebuild_flag_builds_even_with_a_digest(built: tuple[Path, RunInputs]) -> None:
    project, inputs = built
    engine = FakeEngine(registry={REFERENCE: image()}, images={IMAGE_ID: image()})
    record, verdict = decide(engine, project, inputs, REFERENCE, reuse_image=False)
    assert record is not None and verdict.detail.startswith("rebuilt: ")
    assert not [call for call in engine.calls if call.startswith("pull")]


def test_pulled_image_without_a_project_record_gets_its_tag_back_and_is_a_cache_hit(
    tiny_project: Path,
) -> None:
    """Reproducing in a project that never built it: the pulled image is tagged as the
    manifest recorded and the spec's build finds it (same labels), so nothing is rebuilt."""
    from qlc.runtime.build import build

    project = tiny_project.parents[1]
    engine = FakeEngine()
    first = build(tiny_project, "qlc-base:bookworm", project_dir=project, engine=engine)
    pushed = engine.images.pop(first.tag)  # only the registry keeps it
    del engine.images[first.image_id]
    records.build_record_path(project, "tiny").unlink()
    records.last_build_path(project).unlink()
    engine.registry[REFERENCE] = pushed
    verdicts = [Verdict("spec", True, "unchanged"), Verdict("lock", True, "unchanged")]
    host = {"image_id": first.image_id, "image_tag": first.tag,
            "base_image": "qlc-base:bookworm", "base_image_overridden": True}  # fmt: skip
    predicate = {"image": {"id": first.image_id, "digest": REFERENCE}}
    inputs = tiny_inputs(tiny_project)
    quiet = Console(quiet=True)
    record = image_for(host, predicate, inputs, verdicts, engine, project, quiet, True)
    assert record is not None and record.image_id == first.image_id and record.cache_hit
    assert verdicts[-1] == Verdict("image", True, f"pulled {REFERENCE} (image {first.image_id})")
    assert len(engine.builds) == 1  # only the first build
