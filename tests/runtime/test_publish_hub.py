"""qlc publish --to hf:ORG/NAME: the exact commit, planned offline with huggingface_hub's own
operations, or a refusal that sends nothing.

No Hub is reachable here: the plan (CommitOperationAdd list: paths, bytes, sha256) and the
card are asserted, and a stand-in Hub (the `Hub` seam) records what a real upload would be
handed. The card passes huggingface_hub's offline parsing (ModelCard strict, the Hub's YAML
block regex, ModelCardData); `RepoCard.validate` needs the Hub's validate-yaml endpoint.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("huggingface_hub")
pytest.importorskip("peft")

from huggingface_hub import CommitOperationAdd, ModelCard
from tiny_runs import call_cli

from qlc.runtime import publish_hub
from qlc.runtime.publish import PublishError
from qlc.runtime.publish_hub import check_card, check_repo_id, planned_upload

SECRET = "hf_qlcTestTokenThatMustNeverBePrinted"
RUN_RECORDS = ("manifest.json", "manifest.sha256", "report.md")


class RecordingHub:
    """Stands in for the Hub: records the calls a publish makes."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def create_repo(self, repo_id: str, private: bool, token: str) -> None:
        self.calls.append(("create_repo", {"repo_id": repo_id, "private": private}))

    def create_commit(
        self, repo_id: str, operations: list[Any], message: str, description: str, token: str
    ) -> str:
        self.calls.append(
            ("create_commit", {"repo_id": repo_id, "operations": operations, "token": token})
        )
        return f"https://hub.example/{repo_id}/commit/0123"


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> RecordingHub:
    recording = RecordingHub()
    monkeypatch.setattr(publish_hub, "HfHub", lambda: recording)
    return recording


def copy_run(run_dir: Path, target: Path) -> Path:
    return Path(shutil.copytree(run_dir, target, ignore=shutil.ignore_patterns("checkpoints")))


def expected_files(run_dir: Path) -> dict[str, Path]:
    """Repository path -> run file: the adapter directory at the root, then the records."""
    adapter = {p.name: p for p in sorted((run_dir / "adapter").iterdir()) if p.is_file()}
    return {**adapter, **{name: run_dir / name for name in RUN_RECORDS}}


def operation_bytes(op: CommitOperationAdd) -> bytes:
    source = op.path_or_fileobj
    return source if isinstance(source, bytes) else Path(str(source)).read_bytes()


@pytest.mark.slow
def test_the_plan_is_exactly_the_adapter_card_manifest_and_report(trained_tiny_run: Path) -> None:
    manifest = json.loads((trained_tiny_run / "manifest.json").read_text())
    subjects = {s["name"]: s["digest"]["sha256"] for s in manifest["subject"]}
    with planned_upload(trained_tiny_run, "acme/tiny-adapter") as plan:
        assert plan.private is True and plan.repo_id == "acme/tiny-adapter"
        ops = {op.path_in_repo: op for op in plan.operations}
        expected = expected_files(trained_tiny_run)
        assert sorted(ops) == sorted(expected)
        for name, path in expected.items():
            data = path.read_bytes()
            assert operation_bytes(ops[name]) == data
            assert ops[name].upload_info.sha256.hex() == hashlib.sha256(data).hexdigest()
            assert ops[name].upload_info.size == len(data)
        for name, digest in subjects.items():  # every subject adapter/X is the repo's X
            assert ops[name.removeprefix("adapter/")].upload_info.sha256.hex() == digest
        card = ModelCard(operation_bytes(ops["README.md"]).decode(), ignore_metadata_errors=False)
        assert card.data.library_name == "peft"
        assert card.data.pipeline_tag == "text-generation"
        # the tiny run's base is a local folder, which is no Hub id: the card names none
        assert "qlc" in card.data.tags and card.data.base_model is None
        assert not any(tag.startswith("base_model:") for tag in card.data.tags)
        printed = plan.lines()
    assert printed[0].startswith("hf:acme/tiny-adapter (private), one commit")
    assert sorted(line.split()[0] for line in printed[1:]) == sorted(expected)


@pytest.mark.slow
def test_dry_run_prints_the_plan_and_needs_no_token(
    trained_tiny_run: Path,
    hub: RecordingHub,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("HF_TOKEN", raising=False)
    args = ["publish", str(trained_tiny_run), "--to", "hf:acme/tiny", "--dry-run"]
    code, printed, err = call_cli(args, capsys)
    assert code == 0, err
    listed = [line.split()[0] for line in printed.splitlines() if line.startswith("  ")]
    assert sorted(listed) == sorted(expected_files(trained_tiny_run))
    assert "nothing was uploaded" in printed
    assert hub.calls == []


@pytest.mark.slow
def test_publish_commits_the_plan_once_private_by_default(
    trained_tiny_run: Path,
    tmp_path: Path,
    hub: RecordingHub,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    run = copy_run(trained_tiny_run, tmp_path / "run")
    monkeypatch.setenv("HF_TOKEN", SECRET)
    code, printed, err = call_cli(["publish", str(run), "--to", "hf:acme/tiny"], capsys)
    assert code == 0, err
    assert [name for name, _ in hub.calls] == ["create_repo", "create_commit"]
    assert hub.calls[0][1] == {"repo_id": "acme/tiny", "private": True}
    commit = hub.calls[1][1]
    assert commit["token"] == SECRET
    assert sorted(op.path_in_repo for op in commit["operations"]) == sorted(expected_files(run))
    assert SECRET not in printed + err
    recorded = json.loads((run / "published.json").read_text())
    assert recorded[-1]["target"] == "hf:acme/tiny"
    assert recorded[-1]["where"] == "https://hub.example/acme/tiny/commit/0123"

    code, _, err = call_cli(["publish", str(run), "--to", "hf:acme/tiny", "--public"], capsys)
    assert code == 0, err
    assert hub.calls[2][1] == {"repo_id": "acme/tiny", "private": False}


@pytest.mark.slow
def test_refusals_upload_nothing(
    trained_tiny_run: Path,
    tmp_path: Path,
    hub: RecordingHub,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("HF_TOKEN", raising=False)
    code, _, err = call_cli(["publish", str(trained_tiny_run), "--to", "hf:acme/tiny"], capsys)
    assert code == 2 and "no Hugging Face token: set HF_TOKEN" in err

    monkeypatch.setenv("HF_TOKEN", SECRET)
    cases = {
        "adapter/adapter_config.json": "sha256 differs from the manifest's subject",
        "report.md": "differs from the manifest's records",
        "manifest.json": "was changed after the run",
    }
    for index, (name, message) in enumerate(cases.items()):
        run = copy_run(trained_tiny_run, tmp_path / f"run{index}")
        with open(run / name, "a", encoding="utf-8") as handle:
            handle.write(" ")
        code, printed, err = call_cli(["publish", str(run), "--to", "hf:acme/tiny"], capsys)
        assert code == 2, (name, err)
        assert message in err, (name, err)
        assert SECRET not in printed + err
        assert not (run / "published.json").exists()

    run = copy_run(trained_tiny_run, tmp_path / "extra")
    (run / "adapter" / "notes.txt").write_text("not part of the run")
    code, _, err = call_cli(["publish", str(run), "--to", "hf:acme/tiny"], capsys)
    assert code == 2 and "notes.txt" in err

    for bad in ("hf:acme/bad--name", "hf:no-namespace", "s3://bucket/x"):
        code, _, err = call_cli(["publish", str(trained_tiny_run), "--to", bad], capsys)
        assert code == 2, (bad, err)
    assert hub.calls == []


CARD_BODY = "\n# A card\n"


def test_card_check_uses_huggingface_hubs_parsing() -> None:
    good = '---\nbase_model: "org/base"\nlibrary_name: "peft"\ntags:\n- "qlc"\n---\n' + CARD_BODY
    assert check_card(good).data.base_model == "org/base"
    refused = {
        CARD_BODY: "no YAML metadata block",
        "---\n- a\n- b\n---\n" + CARD_BODY: "metadata is not valid",
        '---\nbase_model: "/home/me/models/llama"\n---\n' + CARD_BODY: "not a Hub model id",
        "---\nmodel-index: [{}]\n---\n" + CARD_BODY: "metadata is not valid",
    }
    for text, message in refused.items():
        with pytest.raises(PublishError, match=message):
            check_card(text)


def test_repo_ids_are_checked_by_huggingface_hub() -> None:
    assert check_repo_id("acme/tiny-adapter.v2") == "acme/tiny-adapter.v2"
    for bad in ("acme/tiny--x", "acme/x.git", "a/b/c", "tiny", "acme/" + "x" * 100):
        with pytest.raises(PublishError):
            check_repo_id(bad)


@pytest.mark.slow
def test_merged_dry_run_plans_the_verified_merge_with_its_own_card(
    trained_tiny_run: Path, hub: RecordingHub, capsys: pytest.CaptureFixture[str]
) -> None:
    with planned_upload(trained_tiny_run, "acme/tiny-merged", merged=True) as plan:
        ops = {op.path_in_repo: op for op in plan.operations}
        assert "adapter_config.json" not in ops and "adapter_model.safetensors" not in ops
        assert {"config.json", "merge.json", "README.md", *RUN_RECORDS} <= set(ops)
        assert any(name.endswith(".safetensors") for name in ops)
        record = json.loads(operation_bytes(ops["merge.json"]))
        for name, digest in record["files"].items():  # what the merge verified is what goes
            assert ops[name].upload_info.sha256.hex() == digest
        for name in RUN_RECORDS:
            assert operation_bytes(ops[name]) == (trained_tiny_run / name).read_bytes()
        card = ModelCard(operation_bytes(ops["README.md"]).decode(), ignore_metadata_errors=False)
        assert card.data.library_name == "transformers"
        assert "merged-lora" in card.data.tags and card.data.base_model is None
        assert f"{record['max_abs_diff']:.4g}" in card.text
    assert hub.calls == []


def test_the_real_client_reports_an_unreachable_hub_without_the_token(tmp_path: Path) -> None:
    """huggingface_hub's own HTTP calls, against a loopback port nothing listens on."""
    from registry_fixture import free_loopback_port

    hub = publish_hub.HfHub(endpoint=f"http://127.0.0.1:{free_loopback_port()}")
    card = tmp_path / "README.md"
    card.write_text('---\nlibrary_name: "peft"\n---\n')
    operations = [CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card)]
    with pytest.raises(publish_hub.HubError, match="cannot create hf:acme/tiny") as raised:
        hub.create_repo("acme/tiny", True, SECRET)
    assert SECRET not in str(raised.value)
    with pytest.raises(publish_hub.HubError, match="the commit to hf:acme/tiny failed") as raised:
        hub.create_commit("acme/tiny", operations, "message", "description", SECRET)
    assert SECRET not in str(raised.value)
