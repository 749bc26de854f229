"""Object-store inputs against a real S3-API server started here on loopback (moto's server, as
s3fs's own tests run one), the objects uploaded through s3fs: a tiny run that reads its data
from s3://, and the errors that stop a run before any model loads (exit 2, never retried)."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from trainer_support import (
    ADAPTER,
    TINY_DATA,
    TINY_MODEL,
    assert_ok,
    compile_to,
    edited_spec,
    manifest,
    plan_of,
    run_train,
    sha256,
)

from qlc import contract
from qlc.trainer import fetch
from qlc.trainer.errors import UserError

BUCKET = "qlc-test"
DATA_URI = f"s3://{BUCKET}/tiny/data.jsonl"
MODEL_URI = f"s3://{BUCKET}/tiny/model"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "qlc-test-key", "AWS_SECRET_ACCESS_KEY": "qlc-test-secret"}
# The endpoint and region of the server; no shared files, no instance metadata service.
PLACE = {"AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
         "AWS_SHARED_CREDENTIALS_FILE": os.devnull, "AWS_CONFIG_FILE": os.devnull}  # fmt: skip


@pytest.fixture(scope="module")
def s3_server() -> Iterator[dict[str, str]]:
    """moto's S3 server on a free loopback port, the tiny data and model uploaded; the
    environment a run needs to reach it (the credentials the platform would give)."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    env = {**PLACE, **CREDENTIALS, "AWS_ENDPOINT_URL": f"http://{host}:{port}"}
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        store = fetch.filesystem(DATA_URI)
        store.mkdir(BUCKET)
        store.put_file(str(TINY_DATA), DATA_URI)
        store.put(str(TINY_MODEL), MODEL_URI, recursive=True)
        yield env
    finally:
        for name, value in saved.items():
            os.environ.pop(name, None) if value is None else os.environ.update({name: value})
        server.stop()


def s3_spec(data: str = DATA_URI, data_pin: str | None = None, model: str | None = None) -> bytes:
    """specs/tiny.toml reading its data (and model) from the server."""
    pin = f'\nsha256 = "{data_pin}"' if data_pin else ""
    edits = {'path = "tiny/data.jsonl"': f'path = "{data}"{pin}'}
    if model is not None:
        edits['path = "tiny/model"'] = f'path = "{model}"'
    return edited_spec("tiny.toml", edits)


def failed_run(tmp_path: Path, source: bytes, env: dict[str, str]) -> tuple[str, dict[str, Any]]:
    """A run that must stop on a user error before any model loads: its stderr, manifest."""
    context = compile_to("tiny.toml", tmp_path / "context", source)
    out = tmp_path / "run"
    result = run_train(context, out, timeout=300, **env)
    assert result.returncode == contract.EXIT_USER_ERROR, result.stdout[-2000:] + result.stderr
    record = manifest(out)["predicate"]
    assert record["status"] == "failed"
    assert record["inputs"] == {"model": {}, "data": {}}  # recorded once the model has loaded
    return result.stderr, record


@pytest.mark.slow
def test_a_tiny_run_reads_its_data_from_s3_and_records_it(
    s3_server: dict[str, str], tiny_run: tuple[Path, str], tmp_path: Path
) -> None:
    context = compile_to("tiny.toml", tmp_path / "context", s3_spec(data_pin=sha256(TINY_DATA)))
    out = tmp_path / "run"
    assert_ok(run_train(context, out, **s3_server))
    data = manifest(out)["predicate"]["inputs"]["data"]
    copy = out / contract.INPUTS_CACHE_DIR / "data" / "data.jsonl"
    assert data["uri"] == DATA_URI and data["path"] == str(copy)
    assert data["files"] == {"data.jsonl": sha256(TINY_DATA)}
    local_out, _ = tiny_run  # the same rows from a local file: the same adapter, bit for bit
    assert sha256(out / ADAPTER) == sha256(local_out / ADAPTER)


def test_a_data_file_that_is_not_the_pinned_one_stops_the_run(
    s3_server: dict[str, str], tmp_path: Path
) -> None:
    stderr, record = failed_run(tmp_path, s3_spec(data_pin="0" * 64), s3_server)
    assert f"data.path = '{DATA_URI}': sha256 {sha256(TINY_DATA)} is not data.sha256" in stderr
    assert "is not data.sha256 = " + "0" * 64 in record["error"]


def test_a_missing_object_stops_the_run(s3_server: dict[str, str], tmp_path: Path) -> None:
    missing = f"s3://{BUCKET}/tiny/gone.jsonl"
    stderr, _ = failed_run(tmp_path, s3_spec(data=missing), s3_server)
    assert f"data.path = '{missing}': no such object" in stderr


def test_missing_credentials_stop_the_run_and_say_where_they_come_from(
    s3_server: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in CREDENTIALS:
        monkeypatch.delenv(name)
    without = {k: v for k, v in s3_server.items() if k not in CREDENTIALS}
    stderr, _ = failed_run(tmp_path, s3_spec(), without)
    assert f"data.path = '{DATA_URI}': no credentials for s3:// (NoCredentialsError" in stderr
    assert "never from the spec: AWS credentials: the job's IAM role (IRSA" in stderr
    assert "qlc-test-secret" not in stderr


def test_a_model_folder_is_downloaded_whole_and_checked_against_its_pins(
    s3_server: dict[str, str], tmp_path: Path
) -> None:
    files = contract.hash_tree(TINY_MODEL)
    pins = "\n".join(f'"{name}" = "{digest}"' for name, digest in files.items())
    plan = plan_of("tiny.toml", s3_spec(model=MODEL_URI) + f"\n[model.sha256]\n{pins}\n".encode())
    assert plan.model.uri == MODEL_URI and plan.model.sha256 == files
    fetched = fetch.fetch_inputs(plan, tmp_path)
    assert contract.hash_tree(Path(fetched.model_dir or "")) == files
    assert fetched.data_file == str(tmp_path / "inputs" / "data" / "data.jsonl")
    wrong = plan.model_copy(update={"model": plan.model.model_copy(
        update={"sha256": {**files, "config.json": "1" * 64}})})  # fmt: skip
    with pytest.raises(UserError, match=r"config.json: sha256 [0-9a-f]{64}\): pin the files"):
        fetch.fetch_inputs(wrong, tmp_path)  # the copy is reused, the pins checked again
    gone = plan.model_copy(update={"model": plan.model.model_copy(
        update={"uri": f"s3://{BUCKET}/nothing-here"})})  # fmt: skip
    with pytest.raises(UserError, match=re.escape("nothing-here': no such object (nothing under")):
        fetch.fetch_inputs(gone, tmp_path / "other")
