"""Pulling by digest: the reference check, the pulled image checked against the record, and
`qlc run` of a pushed build: pulled back when the daemon lost it, the digest handed to the
container after a push (last build, spec cache hit, --resume)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from rich.console import Console
from runtime_fakes import FakeEngine, tiny_inputs, trainer_manifest

from qlc.runtime import records
from qlc.runtime.docker_engine import ContainerRequest, ImageInfo, PullError
from qlc.runtime.pull import ImageMismatch, digest_reference, pull_verified
from qlc.runtime.run import RunFailed, RunInputError, run, run_container

QUIET = Console(quiet=True)
IMAGE_ID = "sha256:" + hashlib.sha256(b"built image config").hexdigest()
DIGEST = "sha256:" + hashlib.sha256(b"pushed manifest").hexdigest()
REFERENCE = f"127.0.0.1:5000/qlc/tiny@{DIGEST}"


def image(image_id: str = IMAGE_ID, labels: dict[str, str] | None = None) -> ImageInfo:
    return ImageInfo(image_id, (), labels or {}, (), "10001:10001")


def pushed_record(spec: Path, registry_digest: str | None = REFERENCE) -> records.BuildRecord:
    return records.BuildRecord(
        job="tiny", tag="qlc/tiny:0123456789ab", image_id=IMAGE_ID, image_key="0" * 64,
        context_hash="sha256:" + "c" * 64, context_dir="/ctx", spec_path=str(spec),
        spec_sha256="s" * 64, lock_sha256=None, base_image="qlc-base:bookworm",
        base_image_overridden=True, base_image_id=None, base_image_digests=[],
        qlc_version="0", built_at="2026-01-01T00:00:00+00:00", build_seconds=1.0,
        cache_hit=False, log_path=None, registry_digest=registry_digest,
        pushed_ref="127.0.0.1:5000/qlc/tiny:0123456789ab" if registry_digest else None,
    )  # fmt: skip


def writes_manifest(request: ContainerRequest, status: str = "succeeded") -> None:
    """What the trainer records of the image: QLC_IMAGE_ID / QLC_IMAGE_DIGEST from its env."""
    out = Path(next(m.source for m in request.mounts if m.target == "/out"))
    env = request.environment
    (out / "adapter").mkdir(exist_ok=True)
    weights = out / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(b"weights")
    subject = {"name": "adapter/adapter_model.safetensors",
               "digest": {"sha256": hashlib.sha256(b"weights").hexdigest()}}  # fmt: skip
    statement = trainer_manifest(status, [subject] if status == "succeeded" else [],
                                 {"final_loss": 0.5})  # fmt: skip
    image = {"id": env.get("QLC_IMAGE_ID"), "digest": env.get("QLC_IMAGE_DIGEST"), "base": None}
    statement["predicate"]["image"] = image  # type: ignore[index]
    (out / "manifest.json").write_text(json.dumps(statement))


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (REFERENCE, REFERENCE),
        (f"ghcr.io/acme/qlc@{DIGEST}", f"ghcr.io/acme/qlc@{DIGEST}"),
        (DIGEST, None),  # no repository: nothing to pull from
        ("ghcr.io/acme/qlc:v1", None),
        (f"ghcr.io/acme/qlc@{DIGEST[:-1]}", None),
        (None, None),
    ],
)
def test_digest_reference(value: object, expected: str | None) -> None:
    assert digest_reference(value) == expected


def test_pull_verified_returns_the_recorded_image() -> None:
    engine = FakeEngine(registry={REFERENCE: image()})
    assert pull_verified(engine, REFERENCE, IMAGE_ID).id == IMAGE_ID
    assert engine.calls == [f"pull {REFERENCE}"]


def test_pull_verified_refuses_another_image_under_the_digest() -> None:
    other = "sha256:" + "9" * 64
    engine = FakeEngine(registry={REFERENCE: image(other)})
    with pytest.raises(ImageMismatch, match=f"is image {other}, but the record names"):
        pull_verified(engine, REFERENCE, IMAGE_ID)


def test_pull_verified_refuses_an_image_the_daemon_does_not_list_under_the_digest() -> None:
    class WrongDigests(FakeEngine):
        def pull(self, reference: str) -> ImageInfo:
            return ImageInfo(IMAGE_ID, (), {}, (f"127.0.0.1:5000/qlc/tiny@sha256:{'0' * 64}",), "")

    with pytest.raises(ImageMismatch, match="not the pushed image"):
        pull_verified(WrongDigests(), REFERENCE, IMAGE_ID)


def test_run_pulls_a_pushed_build_the_daemon_no_longer_has(tiny_project: Path) -> None:
    engine = FakeEngine(registry={REFERENCE: image()}, on_start=writes_manifest)
    result = run_container(
        pushed_record(tiny_project), tiny_inputs(tiny_project), engine=engine,
        console=QUIET, environ={},
    )  # fmt: skip
    assert result.status == "succeeded"
    assert f"pull {REFERENCE}" in engine.calls
    (request,) = engine.created
    assert request.image == IMAGE_ID
    assert request.environment["QLC_IMAGE_DIGEST"] == REFERENCE
    manifest = json.loads((result.run_dir / "manifest.json").read_text())
    assert manifest["predicate"]["image"] == {"id": IMAGE_ID, "digest": REFERENCE, "base": None}


def test_run_that_cannot_pull_says_how_to_fix(tiny_project: Path) -> None:
    refused = PullError(f"cannot pull {REFERENCE}: connection refused")
    engine = FakeEngine(pull_error=refused)
    with pytest.raises(PullError, match=r"not in the daemon and cannot pull .*\nfix: make"):
        run_container(
            pushed_record(tiny_project), tiny_inputs(tiny_project), engine=engine,
            console=QUIET, environ={},
        )  # fmt: skip
    assert engine.created == []


def test_run_refuses_a_pulled_image_that_is_not_the_build(tiny_project: Path) -> None:
    engine = FakeEngine(registry={REFERENCE: image("sha256:" + "9" * 64)})
    with pytest.raises(RunInputError, match="but the record names image"):
        run_container(
            pushed_record(tiny_project), tiny_inputs(tiny_project), engine=engine,
            console=QUIET, environ={},
        )  # fmt: skip
    assert engine.created == []


def test_unpushed_build_missing_from_the_daemon_is_not_pulled(tiny_project: Path) -> None:
    engine = FakeEngine(registry={REFERENCE: image()})
    with pytest.raises(RunInputError, match=r"is not in the daemon .*qlc build"):
        run_container(
            pushed_record(tiny_project, registry_digest=None), tiny_inputs(tiny_project),
            engine=engine, console=QUIET, environ={},
        )  # fmt: skip
    assert not [call for call in engine.calls if call.startswith("pull")]


def test_digest_reaches_the_manifest_after_push_spec_cache_hit_and_resume(
    tiny_project: Path,
) -> None:
    """build -> push -> `qlc run SPEC` (a cache hit keeps the push) -> `qlc run --resume`."""
    from qlc.runtime.build import build

    project = tiny_project.parents[1]
    engine = FakeEngine(on_start=lambda request: writes_manifest(request, "interrupted"))
    engine.exit_code = 143  # preempted: the run continues with --resume
    built = build(tiny_project, "qlc-base:bookworm", project_dir=project, engine=engine)
    records.record_push(project, "tiny", "127.0.0.1:5000/qlc/tiny:x", REFERENCE)
    with pytest.raises(RunFailed) as stopped:
        run(
            str(tiny_project), base_image="qlc-base:bookworm", project_dir=project,
            engine=engine, console=QUIET, environ={},
        )  # fmt: skip
    first = stopped.value.result
    engine.on_start, engine.exit_code = writes_manifest, 0
    assert len(engine.builds) == 1  # the spec's build was a cache hit
    assert records.last_build(project).registry_digest == REFERENCE
    resumed = run(
        None, project_dir=project, run_dir=first.run_dir, engine=engine, console=QUIET,
        environ={},
    )  # fmt: skip
    assert resumed.run_dir == first.run_dir
    for request in engine.created:
        assert request.environment["QLC_IMAGE_ID"] == built.image_id
        assert request.environment["QLC_IMAGE_DIGEST"] == REFERENCE
    manifest = json.loads((first.run_dir / "manifest.json").read_text())
    assert manifest["predicate"]["image"]["digest"] == REFERENCE


def test_a_rebuild_into_another_image_forgets_the_push(tiny_project: Path) -> None:
    project = tiny_project.parents[1]
    records.save_build(project, pushed_record(tiny_project))
    same = pushed_record(tiny_project, registry_digest=None)
    assert records.save_build(project, same).registry_digest == REFERENCE  # what build returns
    assert records.last_build(project).registry_digest == REFERENCE
    other = same.model_copy(update={"image_id": "sha256:" + "9" * 64})
    records.save_build(project, other)
    assert records.last_build(project).registry_digest is None
    assert records.job_build(project, "tiny") == other
