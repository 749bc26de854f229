from __future__ import annotations

import re
import threading
from pathlib import Path

import pytest
from rich.console import Console
from runtime_fakes import FakeEngine, copy_tiny_project

from qlc.compiler.load import SpecError
from qlc.runtime import records
from qlc.runtime.build import (
    BASE_LABEL,
    CONTEXT_LABEL,
    PLAN_LABEL,
    BuildFailure,
    build,
    compile_for_build,
    explain_build_error,
    image_key,
    image_tag,
)
from qlc.runtime.docker_engine import BuildError, DockerEngine, ImageInfo

QUIET = Console(quiet=True)


def test_tag_is_the_content_hash_and_the_override_changes_it() -> None:
    content = "sha256:" + "ab" * 32
    assert image_tag("tiny", image_key(content, None)) == "qlc/tiny:" + "ab" * 6
    assert image_key(content, "qlc-base:bookworm") != image_key(content, None)
    assert image_key(content, "a") != image_key(content, "b")


def test_build_writes_context_log_and_record(tiny_project: Path, fake_engine: FakeEngine) -> None:
    project = tiny_project.parents[1]
    record = build(
        tiny_project, "qlc-base:bookworm", project_dir=project, engine=fake_engine, console=QUIET
    )
    (call,) = fake_engine.builds
    assert call["buildargs"] == {"BASE_IMAGE": "qlc-base:bookworm"}
    plan = call["contents"]["plan.json"].decode()
    assert call["labels"] == {
        CONTEXT_LABEL: record.context_hash,
        BASE_LABEL: "qlc-base:bookworm",
        PLAN_LABEL: plan,  # the image carries its plan: `qlc run IMAGE` reads no spec
    }
    assert "Dockerfile" in call["files"] and "train.py" in call["files"]
    assert Path(record.context_dir).parent == project / ".qlc" / "contexts"
    assert Path(record.log_path).read_text().startswith("Step 1/1")
    assert record.base_image_overridden and not record.cache_hit
    assert records.last_build(project) == record
    assert records.job_build(project, "tiny") == record


def test_unchanged_spec_is_a_cache_hit_without_build_call(
    tiny_project: Path, fake_engine: FakeEngine
) -> None:
    project = tiny_project.parents[1]
    first = build(tiny_project, "b", project_dir=project, engine=fake_engine, console=QUIET)
    second = build(tiny_project, "b", project_dir=project, engine=fake_engine, console=QUIET)
    assert second.cache_hit and second.image_id == first.image_id and second.tag == first.tag
    assert [c for c in fake_engine.calls if c.startswith("build")] == [f"build {first.tag}"]


def test_tag_with_other_labels_is_rebuilt(tiny_project: Path, fake_engine: FakeEngine) -> None:
    project = tiny_project.parents[1]
    first = build(tiny_project, "b", project_dir=project, engine=fake_engine, console=QUIET)
    fake_engine.images[first.tag] = ImageInfo(first.image_id, (first.tag,), {}, (), "")
    second = build(tiny_project, "b", project_dir=project, engine=fake_engine, console=QUIET)
    assert not second.cache_hit and len(fake_engine.builds) == 2


def test_changed_training_value_gives_a_new_tag(
    tiny_project: Path, fake_engine: FakeEngine
) -> None:
    project = tiny_project.parents[1]
    first = build(tiny_project, None, project_dir=project, engine=fake_engine, console=QUIET)
    text, count = re.subn(
        r"(?m)^learning_rate = .*$", "learning_rate = 0.00123", tiny_project.read_text()
    )
    assert count == 1
    tiny_project.write_text(text)
    second = build(tiny_project, None, project_dir=project, engine=fake_engine, console=QUIET)
    assert second.tag != first.tag and not second.cache_hit


def test_context_edited_on_disk_is_replaced_by_the_compiled_one(
    tiny_project: Path, fake_engine: FakeEngine
) -> None:
    project = tiny_project.parents[1]
    first = build(tiny_project, None, project_dir=project, engine=fake_engine, console=QUIET)
    train = Path(first.context_dir) / "train.py"
    train.write_text("import os; os.system('echo pwned')\n")
    fake_engine.images.clear()  # force a real build of the (restored) context
    build(tiny_project, None, project_dir=project, engine=fake_engine, console=QUIET)
    compiled = compile_for_build(tiny_project, project).context
    assert train.read_bytes() == compiled.files["train.py"]


def test_build_sends_the_compiled_bytes_even_if_the_folder_changes_meanwhile(
    tiny_project: Path, fake_engine: FakeEngine
) -> None:
    project = tiny_project.parents[1]
    compiled = compile_for_build(tiny_project, project).context
    folder = project / ".qlc" / "contexts" / compiled.content_hash.removeprefix("sha256:")

    def tamper(line: str) -> None:  # runs inside engine.build, after the folder was checked
        (folder / "train.py").write_text("import os; os.system('echo pwned')\n")

    fake_engine.build_lines = ["Step 1/1 : FROM base"]
    original_build = fake_engine.build

    def build_then_tamper(files, tag, buildargs, labels, on_line):  # type: ignore[no-untyped-def]
        tamper("")
        return original_build(files, tag, buildargs, labels, on_line)

    fake_engine.build = build_then_tamper  # type: ignore[method-assign]
    build(tiny_project, None, project_dir=project, engine=fake_engine, console=QUIET)
    (call,) = fake_engine.builds
    assert call["contents"] == compiled.files


def test_spec_path_spelling_does_not_change_the_tag(
    tiny_project: Path, fake_engine: FakeEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    project = tiny_project.parents[1]
    monkeypatch.chdir(project)
    a = build(Path("specs/tiny.toml"), None, engine=fake_engine, console=QUIET)
    b = build(Path("./specs/../specs/tiny.toml"), None, engine=fake_engine, console=QUIET)
    c = build(tiny_project, None, engine=fake_engine, console=QUIET)
    assert a.tag == b.tag == c.tag


def test_concurrent_builds_of_one_project_keep_records_whole(tmp_path: Path) -> None:
    project = tmp_path / "p"
    spec = copy_tiny_project(project)
    errors: list[BaseException] = []

    def one() -> None:
        try:
            build(spec, None, project_dir=project, engine=FakeEngine(), console=QUIET)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=one) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert records.last_build(project).job == "tiny"
    assert len(list((project / ".qlc" / "contexts").iterdir())) == 1


def test_build_failure_names_pip(tiny_project: Path, fake_engine: FakeEngine) -> None:
    fake_engine.build_error = BuildError(
        "The command '/bin/sh -c python3 -m venv /opt/venv && pip install -r x' returned a "
        "non-zero code: 1",
        ["ERROR: THESE PACKAGES DO NOT MATCH THE HASHES FROM THE FILE"],
    )
    with pytest.raises(BuildFailure) as caught:
        build(
            tiny_project,
            None,
            project_dir=tiny_project.parents[1],
            engine=fake_engine,
            console=QUIET,
        )
    message = str(caught.value)
    assert message.startswith("pip install failed inside the image")
    assert "DO NOT MATCH THE HASHES" in message and "qlc lock" in message


def test_build_failure_names_the_base_image() -> None:
    error = BuildError("pull access denied for nvidia/cuda, repository does not exist", [])
    message = explain_build_error(error, "nvidia/cuda@sha256:" + "0" * 64, Path("x.log"))
    assert message.startswith("base image nvidia/cuda@sha256:")
    assert "--base-image" in message


def test_missing_spec_is_a_user_error(tmp_path: Path, fake_engine: FakeEngine) -> None:
    with pytest.raises(SpecError, match="cannot read the spec"):
        build(tmp_path / "nope.toml", None, project_dir=tmp_path, engine=fake_engine)


# --------------------------------------------------------------------------- real daemon


@pytest.mark.docker
def test_real_build_then_cache_hit(tiny_image: records.BuildRecord, tmp_path: Path) -> None:
    engine = DockerEngine()
    image = engine.find_image(tiny_image.tag)
    assert image is not None and image.id == tiny_image.image_id
    assert image.labels[CONTEXT_LABEL] == tiny_image.context_hash
    assert image.labels["qlc.job"] == "tiny"
    assert image.user == "10001:10001"
    project = tmp_path / "again"
    spec = copy_tiny_project(project)
    # The time a cache hit takes is a benchmark (bench/tooling.py), not a test.
    again = build(spec, tiny_image.base_image, project_dir=project, console=QUIET)
    assert again.cache_hit and again.image_id == tiny_image.image_id


@pytest.mark.docker
def test_real_rebuild_after_changing_a_training_value(
    tiny_image: records.BuildRecord, tmp_path: Path
) -> None:
    project = tmp_path / "changed"
    spec = copy_tiny_project(project)
    text, count = re.subn(
        r"(?m)^max_steps = (\d+)$", lambda m: f"max_steps = {int(m[1]) + 1}", spec.read_text()
    )
    assert count == 1
    spec.write_text(text)
    context = compile_for_build(spec, project).context
    tag = image_tag("tiny", image_key(context.content_hash, tiny_image.base_image))
    engine = DockerEngine()
    if engine.find_image(tag) is not None:  # built by an earlier session: start clean
        engine._api.remove_image(tag, force=True)
    changed = build(spec, tiny_image.base_image, project_dir=project, console=QUIET)
    assert changed.tag == tag and not changed.cache_hit
    assert changed.tag != tiny_image.tag and changed.image_id != tiny_image.image_id
    # Only the compiled files' layer is new: the locked stack is the session image's, reused
    # from the build cache (one install of the stack per session, whatever the tests build).
    layers = {
        ref: engine._api.inspect_image(ref)["RootFS"]["Layers"] for ref in (tag, tiny_image.tag)
    }
    assert len(set(layers[tag]) - set(layers[tiny_image.tag])) == 1, layers


@pytest.mark.docker
def test_real_failed_pip_install_is_named(docker_ready: str, tmp_path: Path) -> None:
    dockerfile = (
        f"FROM {docker_ready}\nRUN python3 -m pip install --no-cache-dir "
        "qlc-package-that-does-not-exist==0.0.1\n"
    )
    context = {"Dockerfile": dockerfile.encode()}
    with pytest.raises(BuildError) as caught:
        DockerEngine().build(context, "qlc-test/pip-fails:1", {}, {}, lambda line: None)
    message = explain_build_error(caught.value, docker_ready, tmp_path / "log")
    assert message.startswith("pip install failed inside the image")
    assert "qlc-package-that-does-not-exist" in message


@pytest.mark.docker
def test_real_unreachable_base_image_is_named(tiny_project: Path, docker_ready: str) -> None:
    with pytest.raises(BuildFailure) as caught:
        build(
            tiny_project,
            "localhost:1/qlc-missing/base:none",
            project_dir=tiny_project.parents[1],
            console=QUIET,
        )
    assert str(caught.value).startswith("base image localhost:1/qlc-missing/base:none is not")
