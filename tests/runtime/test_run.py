from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from rich.console import Console
from runtime_fakes import FakeEngine, tiny_inputs, trainer_manifest

from qlc.runtime import records
from qlc.runtime.docker_engine import ContainerRequest, EngineError, ImageInfo, host_config_kwargs
from qlc.runtime.run import (
    RunFailed,
    RunInputError,
    container_user,
    run,
    run_container,
)
from qlc.runtime.run_local import lock_differences

QUIET = Console(quiet=True)
IMAGE_ID = "sha256:" + "e" * 64
SECRET = "hf_s3cr3t-token-value"


def record_for(spec: Path) -> records.BuildRecord:
    return records.BuildRecord(
        job="tiny",
        tag="qlc/tiny:0123456789ab",
        image_id=IMAGE_ID,
        image_key="0" * 64,
        context_hash="sha256:" + "c" * 64,
        context_dir="/ctx",
        spec_path=str(spec),
        spec_sha256="s" * 64,
        lock_sha256=None,
        base_image="qlc-base:bookworm",
        base_image_overridden=True,
        base_image_id=None,
        base_image_digests=[],
        qlc_version="0",
        built_at="2026-01-01T00:00:00+00:00",
        build_seconds=1.0,
        cache_hit=False,
        log_path=None,
    )


def engine_with_image() -> FakeEngine:
    engine = FakeEngine()
    engine.images[IMAGE_ID] = ImageInfo(IMAGE_ID, ("qlc/tiny:0123456789ab",), {}, (), "10001:10001")
    return engine


def edit_spec(spec: Path, section: str, line: str) -> None:
    text = spec.read_text()
    text, count = re.subn(rf"(?m)^\[{section}\]$", f"[{section}]\n{line}", text)
    assert count == 1
    spec.write_text(text)


def use_gpus(spec: Path, gpus: int) -> None:
    """The tiny spec on GPUs (the GPU base image brings its own Python)."""
    text = spec.read_text().replace("gpus = 0", f"gpus = {gpus}")
    spec.write_text(text.replace('python = "3.11"\n', ""))


def out_dir(request: ContainerRequest) -> Path:
    return Path(next(m.source for m in request.mounts if m.target == "/out"))


def script_writes(status: str, with_adapter: bool = True) -> Callable[[ContainerRequest], None]:
    """What train.py would leave in /out: an adapter and a manifest with `status`."""

    def write(request: ContainerRequest) -> None:
        out = out_dir(request)
        subjects = []
        if with_adapter:
            (out / "adapter").mkdir()
            data = b"weights"
            (out / "adapter" / "adapter_model.safetensors").write_bytes(data)
            subjects = [
                {
                    "name": "adapter/adapter_model.safetensors",
                    "digest": {"sha256": hashlib.sha256(data).hexdigest()},
                }
            ]
        (out / "metrics.jsonl").write_text(
            "".join(
                json.dumps({"event": "train", "step": s, "loss": 3.0 / s}) + "\n"
                for s in range(1, 5)
            )
        )
        manifest = trainer_manifest(status, subjects, {"final_loss": 0.75})
        (out / "manifest.json").write_text(json.dumps(manifest))

    return write


def test_gpu_count_becomes_a_device_request(tiny_project: Path) -> None:
    edit_spec(tiny_project, "runtime", "")
    use_gpus(tiny_project, 2)
    engine = engine_with_image()
    engine.on_start = script_writes("succeeded")
    run_container(
        record_for(tiny_project),
        tiny_inputs(tiny_project),
        engine=engine,
        console=QUIET,
        environ={},
    )
    (request,) = engine.created
    assert request.gpus == 2
    (device,) = host_config_kwargs(request)["device_requests"]
    assert device["Count"] == 2 and device["Capabilities"] == [["gpu"]]


def test_cpu_spec_and_smoke_request_no_gpu(tiny_project: Path) -> None:
    use_gpus(tiny_project, 1)
    engine = engine_with_image()
    engine.on_start = script_writes("succeeded")
    run_container(
        record_for(tiny_project),
        tiny_inputs(tiny_project),
        smoke=True,
        engine=engine,
        console=QUIET,
        environ={},
    )
    (request,) = engine.created
    assert host_config_kwargs(request)["device_requests"] == []
    assert request.environment["QLC_SMOKE"] == "1"


def test_container_is_isolated_with_read_only_inputs(tiny_project: Path) -> None:
    engine = engine_with_image()
    engine.on_start = script_writes("succeeded")
    result = run_container(
        record_for(tiny_project),
        tiny_inputs(tiny_project),
        engine=engine,
        console=QUIET,
        environ={},
    )
    (request,) = engine.created
    mounts = {m.target: m for m in request.mounts}
    assert mounts["/inputs/model"].read_only and mounts["/inputs/data/data.jsonl"].read_only
    assert not mounts["/out"].read_only and Path(mounts["/out"].source) == result.run_dir
    assert Path(mounts["/inputs/model"].source) == tiny_project.parent / "tiny" / "model"
    assert request.network == "none" and request.cap_drop == ("ALL",)
    assert request.security_opt == ("no-new-privileges",)
    assert request.user is not None and not request.user.startswith("0")
    env = request.environment
    assert env["QLC_OUTPUT_DIR"] == "/out" and env["QLC_MODEL_PATH"] == "/inputs/model"
    assert env["QLC_DATA_PATH"] == "/inputs/data/data.jsonl" and env["QLC_IMAGE_ID"] == IMAGE_ID
    assert env["PYTHONHASHSEED"] == "0"  # the tiny spec is deterministic
    assert result.run_dir.parent == tiny_project.parent / "runs" / "tiny"
    assert engine.calls[-1] == "remove"


def test_hub_spec_gets_a_network(tiny_project: Path) -> None:
    text = tiny_project.read_text().replace('path = "tiny/model"', 'id = "org/model"')
    tiny_project.write_text(text)
    engine = engine_with_image()
    engine.on_start = script_writes("succeeded")
    run_container(
        record_for(tiny_project),
        tiny_inputs(tiny_project),
        engine=engine,
        console=QUIET,
        environ={},
    )
    assert engine.created[0].network == "bridge"
    assert "QLC_MODEL_PATH" not in engine.created[0].environment


@pytest.mark.parametrize(
    ("track", "network", "secrets"),
    [
        ('[track]\nwandb = { mode = "offline", project = "p" }\n', "none", []),
        (
            '[track]\nmlflow = { uri = "http://mlflow:5000", token = "MLFLOW_T" }\n',
            "bridge",
            ["MLFLOW_T"],
        ),
        ('[track]\nwandb = { mode = "online", project = "p" }\n', "bridge", ["WANDB_API_KEY"]),
    ],
)
def test_a_tracker_with_a_server_gets_a_network_and_its_secret(
    tiny_project: Path, track: str, network: str, secrets: list[str]
) -> None:
    tiny_project.write_text(tiny_project.read_text() + track)
    engine = engine_with_image()
    engine.on_start = script_writes("succeeded")
    environ = {"MLFLOW_T": SECRET, "WANDB_API_KEY": SECRET}
    run_container(record_for(tiny_project), tiny_inputs(tiny_project), engine=engine,
                  console=QUIET, environ=environ)  # fmt: skip
    (request,) = engine.created
    assert request.network == network
    assert {k: v for k, v in request.environment.items() if v == SECRET} == dict.fromkeys(
        secrets, SECRET
    )


def test_secrets_reach_the_container_only(tiny_project: Path) -> None:
    edit_spec(tiny_project, "runtime", 'secrets = ["HF_TOKEN"]')
    engine = engine_with_image()
    engine.log_lines = [f"token is {SECRET}", "done"]
    engine.on_start = script_writes("succeeded")
    project = tiny_project.parents[1]
    records.save_build(project, record_for(tiny_project))
    result = run_container(
        record_for(tiny_project),
        tiny_inputs(tiny_project),
        engine=engine,
        console=QUIET,
        environ={"HF_TOKEN": SECRET},
    )
    assert engine.created[0].environment["HF_TOKEN"] == SECRET
    assert "token is ***" in (result.run_dir / "run.log").read_text()
    for path in project.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path


def test_missing_secret_is_warned_not_invented(tiny_project: Path) -> None:
    edit_spec(tiny_project, "runtime", 'secrets = ["HF_TOKEN"]')
    engine = engine_with_image()
    engine.on_start = script_writes("succeeded")
    run_container(
        record_for(tiny_project),
        tiny_inputs(tiny_project),
        engine=engine,
        console=QUIET,
        environ={},
    )
    assert "HF_TOKEN" not in engine.created[0].environment


def test_exit_failure_is_reported_and_no_adapter_claimed(tiny_project: Path) -> None:
    engine = engine_with_image()
    engine.exit_code = 1
    engine.log_lines = ["Traceback (most recent call last):", "ValueError: boom"]
    engine.on_start = script_writes("running")
    with pytest.raises(RunFailed) as caught:
        run_container(
            record_for(tiny_project),
            tiny_inputs(tiny_project),
            engine=engine,
            console=QUIET,
            environ={},
        )
    message, result = str(caught.value), caught.value.result
    assert "exited with status 1" in message and "ValueError: boom" in message
    manifest = json.loads((result.run_dir / "manifest.json").read_text())
    assert manifest["predicate"]["status"] == "failed" and manifest["subject"] == []
    assert manifest["predicate"]["host"]["exit_code"] == 1
    assert (result.run_dir / "adapter" / "adapter_model.safetensors").is_file()  # kept
    assert "remove" in engine.calls


def test_oom_kill_is_named(tiny_project: Path) -> None:
    engine = engine_with_image()
    engine.exit_code, engine.oom_killed = 137, True
    engine.on_start = script_writes("running", with_adapter=False)
    with pytest.raises(RunFailed, match="lack of memory"):
        run_container(
            record_for(tiny_project),
            tiny_inputs(tiny_project),
            engine=engine,
            console=QUIET,
            environ={},
        )


def test_ctrl_c_stops_the_container_and_records_interrupted(tiny_project: Path) -> None:
    engine = engine_with_image()
    engine.exit_code = 130
    engine.log_lines = ["step 1", "step 2", "step 3"]
    engine.interrupt_after = 1
    engine.on_start = script_writes("running", with_adapter=False)
    with pytest.raises(RunFailed, match="interrupted") as caught:
        run_container(
            record_for(tiny_project),
            tiny_inputs(tiny_project),
            engine=engine,
            console=QUIET,
            environ={},
        )
    assert "stop" in engine.calls and engine.calls[-1] == "remove"
    result = caught.value.result
    assert result.status == "interrupted" and result.ended == "interrupted"


def test_gpu_start_failure_explains_the_toolkit(tiny_project: Path) -> None:
    use_gpus(tiny_project, 1)
    engine = engine_with_image()
    engine.start_error = EngineError('could not select device driver "" with capabilities: [[gpu]]')
    with pytest.raises(RunFailed) as caught:
        run_container(
            record_for(tiny_project),
            tiny_inputs(tiny_project),
            engine=engine,
            console=QUIET,
            environ={},
        )
    assert "NVIDIA Container Toolkit" in str(caught.value)
    manifest = caught.value.result.manifest.data
    assert manifest["predicate"]["status"] == "failed" and manifest["subject"] == []


def test_missing_model_directory_is_a_user_error(tiny_project: Path) -> None:
    tiny_project.write_text(tiny_project.read_text().replace("tiny/model", "tiny/absent"))
    with pytest.raises(RunInputError, match=r"model\.path"):
        tiny_inputs(tiny_project)


@pytest.mark.skipif(os.getuid() != 0, reason="only root can hand files to another user")
def test_inputs_the_container_cannot_read_are_refused(tiny_project: Path) -> None:
    (tiny_project.parent / "tiny" / "model" / "config.json").chmod(0o600)
    with pytest.raises(RunInputError, match="cannot read"):
        run_container(
            record_for(tiny_project),
            tiny_inputs(tiny_project),
            engine=engine_with_image(),
            console=QUIET,
            environ={},
        )


def test_run_without_a_build_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(RunInputError, match="qlc build SPEC"):
        run(None, project_dir=tmp_path, engine=FakeEngine(), console=QUIET)


def test_empty_target_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(RunInputError, match="target is empty"):
        run("", project_dir=tmp_path, engine=FakeEngine(), console=QUIET)


def test_unknown_image_target_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(RunInputError, match="not a spec file"):
        run("someone/else:latest", project_dir=tmp_path, engine=FakeEngine(), console=QUIET)


def test_container_user_is_never_root() -> None:
    assert container_user("10001:10001") != "0:0"
    assert not container_user("").startswith("0:")
    assert not container_user("root").startswith("0:")


def test_lock_differences_names_each_package() -> None:
    lock = (
        "# qlc-lock-input: sha256:" + "0" * 64 + "\n"
        "pytest==0.0.1 \\\n    --hash=sha256:" + "a" * 64 + "\n"
        "qlc-absent-package==1.0 \\\n    --hash=sha256:" + "b" * 64 + "\n"
    )
    differences = lock_differences(lock)
    assert differences[0].startswith("pytest: lock 0.0.1, installed ")
    assert differences[1] == "qlc-absent-package: lock 1.0, installed none"


@pytest.mark.slow
def test_local_run_uses_this_python(tiny_project: Path) -> None:
    project = tiny_project.parents[1]
    ran = subprocess.run(
        [str(Path(sys.executable).parent / "qlc"), "run", "specs/tiny.toml", "--local"],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "installed packages match the lock" in ran.stderr or "differ from the lock" in ran.stderr
    (run_dir,) = sorted((project / "specs" / "runs" / "tiny").glob("*"))
    predicate = json.loads((run_dir / "manifest.json").read_text())["predicate"]
    assert predicate["status"] == "succeeded" and predicate["host"]["mode"] == "local"
    assert predicate["environment"]["python"] == ".".join(map(str, sys.version_info[:3]))


def test_full_disk_is_a_run_failure_that_says_how_to_resume(
    tiny_project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    import qlc.runtime.manifest as manifest_module

    def disk_full(*args: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(manifest_module, "write_manifest", disk_full)
    engine = engine_with_image()
    engine.exit_code = 1
    engine.log_lines = ["OSError: [Errno 28] No space left on device"]
    engine.on_start = script_writes("running")
    with pytest.raises(RunFailed) as caught:
        run_container(
            record_for(tiny_project),
            tiny_inputs(tiny_project),
            engine=engine,
            console=QUIET,
            environ={},
        )
    message, result = str(caught.value), caught.value.result
    assert "the disk is full (No space left on device)" in message
    assert f"--resume {result.run_dir}" in message and "records the run as failed" in message
    manifest = json.loads((result.run_dir / "manifest.json").read_text())
    assert manifest["predicate"]["status"] == "failed"
    assert "remove" in engine.calls


def test_run_log_that_cannot_be_written_warns_once_and_streams_on(tmp_path: Path) -> None:
    from rich.console import Console

    from qlc.runtime.supervise import stream_lines

    console = Console(record=True, width=200)
    tail, ended = stream_lines(
        iter(["one", "two", "three"]),
        Path("/dev/full"),  # every write: ENOSPC
        lambda line: line,
        console,
        "t",
        on_interrupt=lambda: None,
    )
    assert tail == ["one", "two", "three"] and ended == "exited"
    text = console.export_text()
    assert text.count("warning: cannot write /dev/full: No space left on device") == 1


# ---------------------------------------------------------------------------------------------
# One contract: what was built is what runs; run directories are never someone else's.


def built_project(tiny_project: Path, engine: FakeEngine) -> tuple[Path, records.BuildRecord]:
    from qlc.runtime.build import build

    project = tiny_project.parents[1]
    record = build(tiny_project, "qlc-base:bookworm", project_dir=project, engine=engine,
                   console=QUIET)  # fmt: skip
    return project, record


def test_run_image_runs_the_built_plan_not_the_spec_file_as_it_is_now(tiny_project: Path) -> None:
    engine = FakeEngine(on_start=script_writes("succeeded"))
    project, record = built_project(tiny_project, engine)
    edit_spec(tiny_project, "runtime", 'env = { CHANGED = "after the build" }')
    edit_spec(tiny_project, "job", 'output_dir = "elsewhere"')
    result = run(record.tag, project_dir=project, engine=engine, console=QUIET, environ={})
    (request,) = engine.created
    assert "CHANGED" not in request.environment  # the image's plan, built before the edit
    assert result.run_dir.parent == tiny_project.parent / "runs" / "tiny"
    assert len(engine.builds) == 1


def test_run_spec_that_changed_rebuilds_and_says_so(tiny_project: Path) -> None:
    from rich.console import Console

    engine = FakeEngine(on_start=script_writes("succeeded"))
    project, _ = built_project(tiny_project, engine)
    edit_spec(tiny_project, "runtime", 'env = { CHANGED = "yes" }')
    console = Console(record=True, width=300)
    run(str(tiny_project), base_image="qlc-base:bookworm", project_dir=project, engine=engine,
        console=console, environ={})  # fmt: skip
    assert len(engine.builds) == 2
    assert "changed since the last build of tiny" in console.export_text()
    assert engine.created[-1].environment["CHANGED"] == "yes"


def test_an_image_without_a_plan_is_refused(tiny_project: Path) -> None:
    engine = engine_with_image()
    records.save_build(tiny_project.parents[1], record_for(tiny_project))
    with pytest.raises(RunInputError, match="carries no qlc plan"):
        run(None, project_dir=tiny_project.parents[1], engine=engine, console=QUIET)


def test_env_given_at_run_time_reaches_the_trainer_and_a_spec_cannot_set_it(
    tiny_project: Path,
) -> None:
    from qlc.compiler.load import SpecError, load_spec
    from qlc.runtime.launch import LaunchError, parse_env_options

    engine = engine_with_image()
    engine.on_start = script_writes("succeeded")
    extra = parse_env_options(["PYTHONPATH=/mine", "HF_ENDPOINT=https://mirror"])
    run_container(record_for(tiny_project), tiny_inputs(tiny_project), engine=engine,
                  console=QUIET, environ={}, extra_env=extra)  # fmt: skip
    env = engine.created[0].environment
    assert env["PYTHONPATH"] == "/mine" and env["HF_ENDPOINT"] == "https://mirror"
    with pytest.raises(LaunchError, match="set by qlc itself"):
        parse_env_options(["QLC_OUTPUT_DIR=/tmp"])
    for name in ("PYTHONPATH", "LD_PRELOAD", "HF_ENDPOINT", "QLC_DATA_PATH", "PYTHONSTARTUP"):
        text = tiny_project.read_text().replace("[runtime]", f'[runtime]\nenv = {{ {name} = "x" }}')
        with pytest.raises(SpecError, match=f"a spec may not set {name}"):
            load_spec(text.encode(), "t.toml")


def test_resume_refuses_a_directory_that_is_not_this_plan_s_unfinished_run(
    tiny_project: Path, tmp_path: Path
) -> None:
    engine = engine_with_image()
    engine.on_start = script_writes("succeeded")
    inputs = tiny_inputs(tiny_project)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(RunInputError, match="not a qlc run directory"):
        run_container(record_for(tiny_project), inputs, run_dir=foreign, engine=engine,
                      console=QUIET, environ={})  # fmt: skip
    assert (foreign / "notes.txt").read_text() == "keep me" and engine.created == []
    finished = run_container(record_for(tiny_project), inputs, engine=engine, console=QUIET,
                             environ={}).run_dir  # fmt: skip
    before = (finished / "manifest.json").read_bytes()
    with pytest.raises(RunInputError, match="finished run"):
        run_container(record_for(tiny_project), inputs, run_dir=finished, engine=engine,
                      console=QUIET, environ={})  # fmt: skip
    assert (finished / "manifest.json").read_bytes() == before
    edit_spec(tiny_project, "train", "weight_decay = 0.5")
    (finished / "manifest.json").write_text(before.decode().replace('"succeeded"', '"failed"'))
    with pytest.raises(RunInputError, match="another plan"):
        run_container(record_for(tiny_project), tiny_inputs(tiny_project), run_dir=finished,
                      engine=engine, console=QUIET, environ={})  # fmt: skip


def test_a_trainer_user_error_is_a_user_error(tiny_project: Path) -> None:
    engine = engine_with_image()
    engine.exit_code = 2
    engine.log_lines = ["error: data file tiny/data.jsonl:3: not a JSON line"]
    engine.on_start = script_writes("failed", with_adapter=False)
    with pytest.raises(RunFailed) as caught:
        run_container(record_for(tiny_project), tiny_inputs(tiny_project), engine=engine,
                      console=QUIET, environ={})  # fmt: skip
    assert caught.value.user_error and "reported a problem to fix" in str(caught.value)
