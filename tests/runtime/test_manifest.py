from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from runtime_fakes import trainer_manifest

from qlc.runtime.manifest import (
    MANIFEST_DIGEST,
    HostView,
    check_subjects,
    finalize,
    manifest_edited,
)


def host(ended: str = "exited", exit_code: int | None = 0, oom: bool = False) -> HostView:
    return HostView(
        mode="container",
        exit_code=exit_code,
        oom_killed=oom,
        ended=ended,
        image_id="sha256:" + "1" * 64,
        image_tag="qlc/tiny:111111111111",
        base_image="qlc-base:bookworm",
        base_image_id=None,
        started_at="t0",
        finished_at="t1",
        duration_s=1.5,
        user="10001:10001",
        network="none",
        gpus_requested=0,
    )


def write_run(run_dir: Path, status: str, adapter: bytes | None = b"weights") -> dict[str, Any]:
    run_dir.mkdir(parents=True, exist_ok=True)
    subjects = []
    if adapter is not None:
        (run_dir / "adapter").mkdir()
        (run_dir / "adapter" / "adapter_model.safetensors").write_bytes(adapter)
        subjects = [
            {
                "name": "adapter/adapter_model.safetensors",
                "digest": {"sha256": hashlib.sha256(adapter).hexdigest()},
            }
        ]
    (run_dir / "metrics.jsonl").write_text(
        '{"event": "train", "step": 1, "loss": 2.0}\n{"event": "eval", "step": 2, '
        '"eval_loss": 1.9}\n{"event": "train", "step": 2, "loss": 1.5}\n{"step": 3, "lo'
    )
    manifest = trainer_manifest(status, subjects, {"final_loss": 1.5})
    (run_dir / "manifest.json").write_text(json.dumps(manifest))
    return manifest


def test_succeeded_run_gets_host_view_report_and_plot(tmp_path: Path) -> None:
    write_run(tmp_path, "succeeded")
    final = finalize(tmp_path, host())
    assert final.status == "succeeded" and final.problems == []
    data = json.loads((tmp_path / "manifest.json").read_text())
    assert data["predicate"]["host"]["exit_code"] == 0
    assert data["predicate"]["host"]["image_id"] == "sha256:" + "1" * 64
    assert len(data["subject"]) == 1
    assert (tmp_path / "loss.png").read_bytes().startswith(b"\x89PNG")
    report = (tmp_path / "report.md").read_text()
    assert "**succeeded**" in report and "adapter/adapter_model.safetensors" in report
    assert manifest_edited(tmp_path) is None


def test_run_killed_while_running_is_failed_without_adapter(tmp_path: Path) -> None:
    write_run(tmp_path, "running")
    final = finalize(tmp_path, host(exit_code=137))
    assert final.status == "failed" and final.data["subject"] == []
    assert "exit status 137" in final.data["predicate"]["error"]
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()  # nothing deleted


def test_interrupted_run_is_interrupted(tmp_path: Path) -> None:
    write_run(tmp_path, "running", adapter=None)
    assert finalize(tmp_path, host(ended="interrupted", exit_code=130)).status == "interrupted"


def test_oom_after_success_is_not_a_success(tmp_path: Path) -> None:
    write_run(tmp_path, "succeeded")
    final = finalize(tmp_path, host(ended="oom-killed", exit_code=137, oom=True))
    assert final.status == "failed" and final.data["subject"] == []


def test_adapter_changed_after_the_script_hashed_it(tmp_path: Path) -> None:
    write_run(tmp_path, "succeeded")
    (tmp_path / "adapter" / "adapter_model.safetensors").write_bytes(b"other")
    final = finalize(tmp_path, host())
    assert final.status == "failed"
    assert final.problems == [
        "subject adapter/adapter_model.safetensors: sha256 differs from the file's"
    ]


def test_no_manifest_at_all_gets_a_failed_one(tmp_path: Path) -> None:
    final = finalize(tmp_path, host(ended="not-started", exit_code=None))
    assert final.status == "failed" and final.data["subject"] == []
    assert json.loads((tmp_path / "manifest.json").read_text())["predicate"]["status"] == "failed"


def test_subject_outside_the_run_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "secret").write_bytes(b"x")
    data = {
        "subject": [{"name": "../secret", "digest": {"sha256": hashlib.sha256(b"x").hexdigest()}}]
    }
    assert check_subjects(tmp_path / "run", data) == [
        f"subject ../secret: no such file in {tmp_path / 'run'}"
    ]


def test_hand_edit_is_detected(tmp_path: Path) -> None:
    write_run(tmp_path, "succeeded")
    finalize(tmp_path, host())
    path = tmp_path / "manifest.json"
    path.write_text(path.read_text().replace('"final_loss": 1.5', '"final_loss": 0.5'))
    assert "changed after the run" in (manifest_edited(tmp_path) or "")
    (tmp_path / MANIFEST_DIGEST).unlink()
    assert "missing" in (manifest_edited(tmp_path) or "")


def test_links_left_by_the_run_are_replaced_not_followed(tmp_path: Path) -> None:
    """The container can write /out: a link it leaves must not redirect a host write."""
    run_dir = tmp_path / "run"
    write_run(run_dir, "succeeded")
    victim = tmp_path / "victim.txt"
    victim.write_text("host file\n")
    for name in ("report.md", "loss.png", MANIFEST_DIGEST, "run.log"):
        (run_dir / name).symlink_to(victim)
    (run_dir / "metrics.jsonl").unlink()
    (run_dir / "metrics.jsonl").symlink_to(victim)
    finalize(run_dir, host())
    from qlc.runtime.supervise import open_log

    with open_log(run_dir / "run.log") as log:
        log.write("line\n")
    assert victim.read_text() == "host file\n"
    for name in ("report.md", MANIFEST_DIGEST, "run.log"):
        assert not (run_dir / name).is_symlink()


def test_manifest_link_to_a_host_file_is_not_read(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    outside = tmp_path / "outside.json"
    outside.write_text('{"predicate": {"status": "succeeded"}, "subject": []}')
    (run_dir / "manifest.json").symlink_to(outside)
    final = finalize(run_dir, host())
    assert final.status == "failed"  # no manifest from the script: nothing claimed
    assert not (run_dir / "manifest.json").is_symlink()


def _disk_full(*args: object, **kwargs: object) -> None:
    import errno
    import os

    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_full_disk_records_the_run_as_failed_in_place(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import qlc.runtime.manifest as manifest_module

    write_run(tmp_path, "running")
    monkeypatch.setattr(manifest_module, "write_manifest", _disk_full)
    final = finalize(tmp_path, host(exit_code=1))
    assert final.write_error is not None and final.manifest_updated
    data = json.loads((tmp_path / "manifest.json").read_text())
    assert data["predicate"]["status"] == final.status == "failed" and data["subject"] == []
    assert "No space left on device" in data["predicate"]["error"]
    assert data["predicate"]["host"]["exit_code"] == 1
    assert manifest_edited(tmp_path) is None  # the digest matches what is on disk


def test_a_succeeded_run_whose_manifest_cannot_be_written_is_not_claimed(
    tmp_path: Path, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    import qlc.runtime.manifest as manifest_module

    write_run(tmp_path, "succeeded")
    (tmp_path / MANIFEST_DIGEST).write_text("stale  manifest.json\n")
    monkeypatch.setattr(manifest_module, "write_atomic", _disk_full)
    final = finalize(tmp_path, host())
    data = json.loads((tmp_path / "manifest.json").read_text())
    assert final.status == data["predicate"]["status"] == "failed" and data["subject"] == []
    assert not (tmp_path / MANIFEST_DIGEST).exists()  # a stale digest would read as an edit


def test_manifest_that_cannot_be_rewritten_at_all_is_reported(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import qlc.runtime.manifest as manifest_module

    write_run(tmp_path, "running")
    for name in ("write_manifest", "write_in_place"):
        monkeypatch.setattr(manifest_module, name, _disk_full)
    final = finalize(tmp_path, host(exit_code=1))
    assert final.write_error is not None and not final.manifest_updated
    assert final.status == "failed"


def test_report_names_the_image_and_its_pushed_digest(tmp_path: Path) -> None:
    manifest = write_run(tmp_path, "succeeded")
    reference = "127.0.0.1:5000/qlc/tiny@sha256:" + "2" * 64
    manifest["predicate"]["image"] = {"id": "sha256:" + "1" * 64, "digest": reference}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    finalize(tmp_path, host())
    report = (tmp_path / "report.md").read_text()
    assert (
        f"- image: qlc/tiny:111111111111 (sha256:{'1' * 64}), pushed as {reference}, "
        "base qlc-base:bookworm\n"
    ) in report


def test_report_of_a_local_run_says_it_ran_without_an_image(tmp_path: Path) -> None:
    write_run(tmp_path, "succeeded")
    local = replace(
        host(), mode="local", image_id=None, image_tag=None, base_image=None, network=None
    )
    finalize(tmp_path, local)
    report = (tmp_path / "report.md").read_text()
    assert "- image: none (ran locally with --local, in the Python that ran qlc)\n" in report
    assert "image: None" not in report and "base None" not in report


def test_every_record_the_run_wrote_is_certified(tmp_path: Path) -> None:
    """metrics.jsonl (the trainer's record) and report.md (the runtime's) carry hashes in the
    manifest: an edited metric no longer passes the integrity check."""
    manifest = write_run(tmp_path, "succeeded")
    metrics = tmp_path / "metrics.jsonl"
    manifest["predicate"]["records"] = {
        "metrics.jsonl": hashlib.sha256(metrics.read_bytes()).hexdigest()
    }
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    final = finalize(tmp_path, host())
    assert final.status == "succeeded"
    records = final.data["predicate"]["records"]
    assert set(records) == {"metrics.jsonl", "report.md", "loss.png"}
    assert check_subjects(tmp_path, final.data) == []
    metrics.write_text(metrics.read_text().replace('"loss": 2.0', '"loss": 0.2'))
    assert check_subjects(tmp_path, final.data) == [
        "record metrics.jsonl: sha256 differs from the file's"
    ]


def test_a_manifest_of_another_schema_is_not_trusted(tmp_path: Path) -> None:
    manifest = write_run(tmp_path, "succeeded")
    manifest["predicateType"] = "urn:qlc:manifest:v1"
    del manifest["predicate"]["records"]
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    final = finalize(tmp_path, host())
    assert final.status == "failed" and final.data["subject"] == []
    error = final.data["predicate"]["error"]
    assert "does not follow the qlc manifest schema" in error and "predicateType" in error
