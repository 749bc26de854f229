from __future__ import annotations

from pathlib import Path

from qlc.runtime.reproduce import (
    compare_files,
    hardware_verdict,
    hash_tree,
    manifest_verdict,
    metric_verdict,
    output_verdicts,
)


def manifest(adapter_sha: str, final_loss: float, gpus: list[str]) -> dict:
    return {
        "subject": [
            {"name": "adapter/adapter_model.safetensors", "digest": {"sha256": adapter_sha}}
        ],
        "predicate": {
            "metrics": {"final_loss": final_loss},
            "environment": {"gpus": gpus, "torch": "2.13.0"},
        },
    }


def test_identical_adapters_are_bit_identical() -> None:
    old, new = manifest("a" * 64, 1.0, []), manifest("a" * 64, 1.0, [])
    adapter, metrics, hardware = output_verdicts(old, new)
    assert adapter.ok and adapter.detail == "bit-identical (1 files)"
    assert metrics.ok and hardware.ok


def test_model_card_with_timings_is_not_the_adapter() -> None:
    old, new = manifest("a" * 64, 1.0, []), manifest("a" * 64, 1.0, [])
    old["subject"].append({"name": "adapter/README.md", "digest": {"sha256": "1" * 64}})
    new["subject"].append({"name": "adapter/README.md", "digest": {"sha256": "2" * 64}})
    adapter, card, *_ = output_verdicts(old, new)
    assert adapter.ok and adapter.detail == "bit-identical (1 files)"
    assert card.item == "model card" and card.detail.startswith("differs")


def test_different_adapter_within_tolerance_names_the_file() -> None:
    adapter, metrics, _ = output_verdicts(
        manifest("a" * 64, 1.0, []), manifest("b" * 64, 1.005, [])
    )
    assert not adapter.ok
    assert adapter.detail == (
        "changed: adapter/adapter_model.safetensors: sha256 aaaaaaaaaaaa -> bbbbbbbbbbbb"
    )
    assert metrics.ok and "within 1%" in metrics.detail


def test_metrics_outside_tolerance() -> None:
    verdict = metric_verdict({"final_loss": 1.0}, {"final_loss": 1.2})
    assert not verdict.ok and "final_loss 1 -> 1.2" in verdict.detail


def test_hardware_change_is_named() -> None:
    verdict = hardware_verdict(
        manifest("a", 1, ["NVIDIA H100"])["predicate"],
        manifest("a", 1, ["NVIDIA A100"])["predicate"],
    )
    assert not verdict.ok and verdict.detail == "gpus: ['NVIDIA H100'] -> ['NVIDIA A100']"


def test_compare_files_names_changed_added_removed() -> None:
    verdict = compare_files(
        "data hash", {"a": "1" * 64, "b": "2" * 64}, {"a": "3" * 64, "c": "4" * 64}
    )
    assert not verdict.ok
    assert verdict.detail == (
        "changed: a: sha256 111111111111 -> 333333333333; c: added; b: removed"
    )


def test_hash_tree_matches_the_training_scripts_layout(tmp_path: Path) -> None:
    (tmp_path / "m" / ".cache").mkdir(parents=True)
    (tmp_path / "m" / "config.json").write_text("{}")
    (tmp_path / "m" / ".cache" / "x").write_text("skip")
    (tmp_path / "d.jsonl").write_text("{}\n")
    assert list(hash_tree(tmp_path / "m")) == ["config.json"]
    assert list(hash_tree(tmp_path / "d.jsonl")) == ["d.jsonl"]


def _run_dir_with_manifest(tmp_path: Path, recorded_sha: str) -> Path:
    """A run dir whose manifest.sha256 matches its manifest (as if rewritten together)."""
    import hashlib
    import json

    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_model.safetensors").write_bytes(b"weights")
    text = json.dumps(manifest(recorded_sha, 1.0, []))
    (tmp_path / "manifest.json").write_text(text)
    digest = hashlib.sha256(text.encode()).hexdigest()
    (tmp_path / "manifest.sha256").write_text(f"{digest}  manifest.json\n")
    return tmp_path


def test_manifest_whose_subjects_match_the_files_passes(tmp_path: Path) -> None:
    import hashlib
    import json

    run_dir = _run_dir_with_manifest(tmp_path, hashlib.sha256(b"weights").hexdigest())
    data = json.loads((run_dir / "manifest.json").read_text())
    assert manifest_verdict(run_dir, data) is None


def test_manifest_rewritten_with_its_digest_is_caught_by_the_subjects(tmp_path: Path) -> None:
    import json

    run_dir = _run_dir_with_manifest(tmp_path, "0" * 64)
    data = json.loads((run_dir / "manifest.json").read_text())
    verdict = manifest_verdict(run_dir, data)
    assert verdict is not None and verdict.item == "manifest" and not verdict.ok
    assert "subject adapter/adapter_model.safetensors: sha256 differs" in verdict.detail
