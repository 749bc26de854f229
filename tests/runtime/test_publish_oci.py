"""qlc publish --to oci:, qlc pull, qlc generate oci:...: a run as an ORAS-style OCI artifact on
a real registry (Debian's docker-registry on loopback), pushed by digest and pulled back
bit-identical, or refused with nothing pushed or kept."""

from __future__ import annotations

import hashlib
import json
import shutil
import urllib.request
from pathlib import Path

import pytest
from registry_fixture import local_registry  # noqa: F401  (pytest fixture)
from tiny_runs import TINY, call_cli

from qlc.runtime.oci_artifact import (
    ARTIFACT_TYPE,
    EMPTY_CONFIG,
    TITLE,
    artifact_manifest,
    push_files,
)
from qlc.runtime.oci_registry import OCI_MANIFEST, HttpRegistry
from qlc.runtime.publish import RunFile

pytestmark = pytest.mark.slow
RUN_RECORDS = ("manifest.json", "manifest.sha256", "report.md", "plan.json")


def copy_run(run_dir: Path, target: Path) -> Path:
    return Path(shutil.copytree(run_dir, target, ignore=shutil.ignore_patterns("checkpoints")))


def published_names(run_dir: Path) -> list[str]:
    adapter = [p.relative_to(run_dir).as_posix() for p in (run_dir / "adapter").rglob("*")]
    return sorted([*adapter, *RUN_RECORDS])


def get(url: str, accept: str = OCI_MANIFEST) -> tuple[bytes, dict[str, str]]:
    request = urllib.request.Request(url, headers={"Accept": accept})
    with urllib.request.urlopen(request, timeout=10) as answer:
        return answer.read(), dict(answer.headers)


def repositories(registry: str) -> list[str]:
    body, _ = get(f"http://{registry}/v2/_catalog", "application/json")
    return list(json.loads(body)["repositories"])


def test_push_by_digest_then_pull_back_bit_identical(
    trained_tiny_run: Path,
    local_registry: str,  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    run = copy_run(trained_tiny_run, tmp_path / "run")
    target = f"oci:{local_registry}/qlc/tiny-adapter:v1"
    code, printed, err = call_cli(["publish", str(run), "--to", target], capsys)
    assert code == 0, err
    reference = printed.split()[0]
    repository, _, digest = reference.partition("@")
    assert repository == f"{local_registry}/qlc/tiny-adapter"
    recorded = json.loads((run / "published.json").read_text())
    assert recorded[-1] == {**recorded[-1], "target": target, "where": reference}

    body, headers = get(f"http://{local_registry}/v2/qlc/tiny-adapter/manifests/v1")
    assert "sha256:" + hashlib.sha256(body).hexdigest() == digest
    assert headers["Docker-Content-Digest"] == digest
    document = json.loads(body)
    assert document["mediaType"] == OCI_MANIFEST and document["artifactType"] == ARTIFACT_TYPE
    assert document["config"] == EMPTY_CONFIG
    titles = [layer["annotations"][TITLE] for layer in document["layers"]]
    assert titles == published_names(run)
    for layer in document["layers"]:
        data = (run / layer["annotations"][TITLE]).read_bytes()
        assert layer["digest"] == "sha256:" + hashlib.sha256(data).hexdigest()
        assert layer["size"] == len(data)

    code, again, err = call_cli(["publish", str(run), "--to", target.rsplit(":", 1)[0]], capsys)
    assert code == 0, err
    assert again.split()[0] == reference  # the same run is the same artifact

    pulled = tmp_path / "pulled"
    code, printed, err = call_cli(["pull", f"oci:{reference}", "-o", str(pulled)], capsys)
    assert code == 0, err
    got = sorted(p.relative_to(pulled).as_posix() for p in pulled.rglob("*") if p.is_file())
    assert got == published_names(run)
    for name in got:
        assert (pulled / name).read_bytes() == (run / name).read_bytes(), name

    import oras.client  # an independent ORAS client reads the same files

    by_oras = tmp_path / "by-oras"
    client = oras.client.OrasClient(hostname=local_registry, insecure=True)
    files = [Path(f) for f in client.pull(target=reference, outdir=str(by_oras))]
    assert sorted(f.relative_to(by_oras).as_posix() for f in files) == published_names(run)
    for path in files:
        assert path.read_bytes() == (run / path.relative_to(by_oras)).read_bytes()


def test_generate_runs_from_the_pulled_artifact(
    trained_tiny_run: Path,
    local_registry: str,  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    run = copy_run(trained_tiny_run, tmp_path / "run")  # publishing writes published.json
    target = f"oci:{local_registry}/qlc/generate"
    code, printed, err = call_cli(["publish", str(run), "--to", target], capsys)
    assert code == 0, err
    reference = "oci:" + printed.split()[0]
    ask = ["--prompt", "<s>[INST] Hello [/INST]", "--max-new-tokens", "8"]
    model = ["--model", str(TINY / "model")]
    code, local, err = call_cli(["generate", str(run), *ask, *model], capsys)
    assert code == 0, err
    monkeypatch.chdir(tmp_path)
    code, pulled, err = call_cli(["generate", reference, *ask, *model], capsys)
    assert code == 0, err
    assert pulled == local
    cached = tmp_path / ".qlc" / "pulled" / reference.rsplit("@", 1)[1].replace(":", "-")
    assert (cached / "adapter" / "adapter_model.safetensors").is_file()


def test_a_tampered_run_pushes_nothing(
    trained_tiny_run: Path,
    local_registry: str,  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    run = copy_run(trained_tiny_run, tmp_path / "run")
    weights = run / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    target = f"oci:{local_registry}/qlc/tampered"
    code, _, err = call_cli(["publish", str(run), "--to", target], capsys)
    assert code == 2 and "sha256 differs" in err
    assert "qlc/tampered" not in repositories(local_registry)

    for bad in ("oci:Upper/Case", "oci:host/repo@sha256:" + "0" * 64):
        code, _, err = call_cli(["publish", str(trained_tiny_run), "--to", bad], capsys)
        assert code == 2, (bad, err)


def test_pull_refuses_what_its_records_do_not_certify(
    trained_tiny_run: Path,
    local_registry: str,  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Artifacts pushed around qlc's own checks: a changed file, a path escaping the run."""
    repository = f"{local_registry}/qlc/forged"
    registry = HttpRegistry(repository)
    run = copy_run(trained_tiny_run, tmp_path / "run")
    (run / "report.md").write_text("# a different report\n")
    names = published_names(run)
    files = [
        RunFile(n, run / n, hashlib.sha256((run / n).read_bytes()).hexdigest(), len(data))
        for n in names
        for data in [(run / n).read_bytes()]
    ]
    forged = push_files(registry, repository, files, None, None)
    out = tmp_path / "out"
    out.mkdir()
    code, _, err = call_cli(["pull", f"oci:{forged.reference}", "-o", str(out / "a")], capsys)
    assert code == 2 and "does not verify" in err and "report.md" in err
    assert list(out.iterdir()) == []

    escaping = json.loads(artifact_manifest(files, None))
    escaping["layers"][0]["annotations"][TITLE] = "../outside.md"
    body = json.dumps(escaping).encode()
    digest = registry.put_manifest("sha256:" + hashlib.sha256(body).hexdigest(), OCI_MANIFEST, body)
    code, _, err = call_cli(["pull", f"oci:{repository}@{digest}", "-o", str(out / "b")], capsys)
    assert code == 2 and "not a plain relative path" in err
    assert list(out.iterdir()) == [] and not (tmp_path / "outside.md").exists()

    code, _, err = call_cli(["pull", f"oci:{repository}:latest", "-o", str(out / "c")], capsys)
    assert code == 2 and "@sha256:<64 hex>" in err
    missing = f"oci:{repository}@sha256:" + "0" * 64
    code, _, err = call_cli(["pull", missing, "-o", str(out / "d")], capsys)
    assert code == 1 and "404" in err
    assert list(out.iterdir()) == []
