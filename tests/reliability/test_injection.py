"""Injection: hostile text in every free string field of the spec (and in the spec's file name).

Each payload is either refused with a spec error naming the field, or compiled into files that
carry it only as data: the Dockerfile's instructions are those of a benign spec, train.py's AST
is the benign one apart from string constants, plan.json gives the payload back exactly, the
spec copy is the spec's bytes. Then the compiled train.py is imported and its data functions run
on payload field names (and one whole smoke run), and canary files show nothing executed.
"""

from __future__ import annotations

import ast
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from dockerfile_parse import DockerfileParser
from injection_fields import StringField, free_string_fields, spec_value, spec_with
from reliability_support import REPO, SPECS, TINY_LOCK

from qlc.compiler.context import BuildContext, compile_spec
from qlc.compiler.load import SpecError

CANARY_DIR = Path("/tmp/qlc-pw")  # short: data.*_field names hold at most 128 characters
CANARY = str(CANARY_DIR / "x")
PAYLOADS = [
    '"',
    "'",
    '"""',
    "'''",
    "\\",
    '\\\\"',
    "\n",
    "\r\n",
    "\r",
    "\t",
    "{{ 7*7 }}",
    "{% raw %}",
    "{% endraw %}{{ 7*7 }}{% raw %}",
    "{# ",
    "{{ cycler.__init__ }}",
    f"$(touch {CANARY})",
    f"`touch {CANARY}`",
    "${HOME}",
    "$HOME",
    "\x00",
    "a\x00b",
    "\u2028",
    "\u2029",
    "\x85",
    "\x1b[31mred",
    "\ufeff",
    f"\"); __import__('os').system('touch {CANARY}') #",
    f"'''); __import__('os').system('touch {CANARY}') #",
    f'"""\nimport os; os.system("touch {CANARY}")\n"""',
    f"\nRUN touch {CANARY}\n",
    f"\\\nRUN touch {CANARY}",
    'x" \\\n  evil="1',
    "</script><!--",
    "%(x)s {0} %s",
    "../../../../etc/passwd",
    "-rf /",
    "ключ 名前 🚀",
]
FIELDS = free_string_fields()
LOCK = TINY_LOCK.read_bytes()


def _id(field: StringField) -> str:
    return f"{field.key}[{field.shape}]"


def compiled_or_refused(source: bytes, spec_name: str = "t.toml") -> BuildContext | SpecError:
    try:
        return compile_spec(source, spec_name, LOCK)
    except SpecError as error:
        return error


def normalized_dockerfile(text: str) -> list[tuple[str, str]]:
    parser = DockerfileParser(fileobj=io.BytesIO(), cache_content=True)  # never ./Dockerfile
    parser.content = re.sub(r"[0-9a-f]{64}", "HEX", text)
    return [
        (i["instruction"], i["value"]) for i in parser.structure if i["instruction"] != "COMMENT"
    ]


class _Strings(ast.NodeTransformer):
    def visit_Constant(self, node: ast.Constant) -> ast.Constant:
        return ast.Constant("S") if isinstance(node.value, str) else node


def code_shape(source: bytes) -> str:
    return ast.dump(_Strings().visit(ast.parse(source)))


@pytest.fixture(scope="module")
def benign() -> dict[str, BuildContext]:
    found = {}
    for field in FIELDS:
        result = compiled_or_refused(spec_with(field, "benign"))
        if isinstance(result, BuildContext):
            found[_id(field)] = result
    return found


def assert_carried_as_data(
    context: BuildContext, reference: BuildContext, field: StringField, payload: str, source: bytes
) -> None:
    files = context.files
    assert files["spec.toml"] == source
    assert files[".dockerignore"] == reference.files[".dockerignore"]
    modules = {n: d for n, d in files.items() if n.startswith("qlc/")}
    assert modules == {n: d for n, d in reference.files.items() if n.startswith("qlc/")}
    assert normalized_dockerfile(files["Dockerfile"].decode()) == normalized_dockerfile(
        reference.files["Dockerfile"].decode()
    ), "the Dockerfile's instructions changed"
    assert code_shape(files["train.py"]) == code_shape(reference.files["train.py"])
    plan = json.loads(files["plan.json"])
    expected = payload + ".jsonl" if field.key == "data.path" else payload
    assert spec_value(plan, field) == expected, "plan.json does not round-trip"


@pytest.mark.parametrize("field", FIELDS, ids=_id)
def test_every_string_field_refuses_or_carries_payloads_as_data(
    field: StringField, benign: dict[str, BuildContext], tally
) -> None:
    reference = benign.get(_id(field))
    for payload in PAYLOADS:
        tally()
        source = spec_with(field, payload)
        result = compiled_or_refused(source)
        if isinstance(result, SpecError):
            message = str(result)
            assert re.search(rf"^t\.toml:\d+:\d+: {re.escape(field.key)}", message, re.M), (
                payload,
                message,
            )
            words = message.split("(got", 1)[0]
            assert "^" not in words and "must be match" not in words, (
                f"a raw pattern instead of words: {message!r}"  # regression: load.PATTERNS
            )
            assert "\n" not in message.strip() or all(
                line.startswith("t.toml:") for line in message.strip().splitlines()
            ), f"a diagnostic spans several lines: {message!r}"
            continue
        assert reference is not None, f"{field.key} takes {payload!r} but refuses 'benign'"
        try:
            assert_carried_as_data(result, reference, field, payload, source)
        except AssertionError:  # a template edited since the reference was compiled: redo both
            reference = compile_spec(spec_with(field, "benign"), "t.toml", LOCK)
            assert_carried_as_data(
                compile_spec(source, "t.toml", LOCK), reference, field, payload, source
            )


@pytest.mark.parametrize("payload", PAYLOADS)
def test_spec_file_name_is_carried_as_data(payload: str, tally) -> None:
    tally()
    source = (SPECS / "tiny.toml").read_bytes()
    reference = compile_spec(source, "specs/tiny.toml", LOCK)
    result = compiled_or_refused(source, spec_name=f"specs/{payload}.toml")
    if isinstance(result, SpecError):
        return
    assert normalized_dockerfile(result.files["Dockerfile"].decode()) == normalized_dockerfile(
        reference.files["Dockerfile"].decode()
    )
    assert len(result.files["Dockerfile"].splitlines()) == len(
        reference.files["Dockerfile"].splitlines()
    ), "the spec name broke a Dockerfile comment into several lines"
    assert code_shape(result.files["train.py"]) == code_shape(reference.files["train.py"])
    assert json.loads(result.files["plan.json"])["spec_name"] == f"specs/{payload}.toml"


# ---------------------------------------------------------------------------------------------
# The compiled script on payload field names: data as data, nothing executes.

DATA_FIELDS = {
    "text": ["text_field"],
    "instruction": ["prompt_field", "input_field", "response_field"],
    "chat": ["messages_field"],
}
SCRIPT_PAYLOADS = [p for p in PAYLOADS if "\x00" not in p]  # NUL: refused by the spec (below)


def _row(data_format: str, names: dict[str, str], text: str) -> dict[str, Any]:
    if data_format == "text":
        return {names["text_field"]: f"<s>[INST] {text} [/INST] answer {text} </s>"}
    if data_format == "instruction":
        return {
            names["prompt_field"]: f"do {text}",
            names["input_field"]: text,
            names["response_field"]: f"done {text}",
        }
    return {
        names["messages_field"]: [
            {"role": "user", "content": f"hi {text}"},
            {"role": "assistant", "content": f"ok {text}"},
        ]
    }


@pytest.mark.parametrize("data_format", sorted(DATA_FIELDS))
def test_compiled_script_loads_payload_named_fields_as_data(
    data_format: str, tmp_path: Path, tally
) -> None:
    from qlc.trainer.examples import prepare
    from qlc.trainer.model import ModelSource, load_tokenizer
    from qlc.trainer.rows import load_rows

    CANARY_DIR.mkdir(exist_ok=True)
    Path(CANARY).unlink(missing_ok=True)
    context = compile_spec((SPECS / "tiny.toml").read_bytes(), "specs/tiny.toml", LOCK)
    base = context.plan
    source = ModelSource(str(SPECS / "tiny" / "model"), None, local=True)
    tokenizer = load_tokenizer(base, source)
    every = ("text_field", "prompt_field", "input_field", "response_field", "messages_field")
    for payload in SCRIPT_PAYLOADS:
        tally()
        names = {key: f"{key}:{payload}" for key in DATA_FIELDS[data_format]}
        data = base.data.model_copy(
            update={"format": data_format, "loss": "all", "eval_fraction": 0.0, **names}
        )
        plan = base.model_copy(update={"data": data})
        rows = [_row(data_format, {**{k: k for k in every}, **names}, payload) for _ in range(3)]
        data_file = tmp_path / f"{data_format}.jsonl"
        data_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
        loaded = load_rows(plan, str(data_file), None)
        assert loaded.train == rows, "rows did not come back as written"
        prepared = prepare(loaded.train, plan.data, tokenizer, str(data_file), "train")
        assert prepared.report["examples"] == 3
        if data_format != "chat" and payload.strip():  # values are stripped when rendered
            assert all(payload.strip() in r.text for r in prepared.rendered), payload
    assert not Path(CANARY).exists(), "a payload executed"


@pytest.mark.parametrize(
    "key",
    [
        "data.text_field",
        "data.prompt_field",
        "data.input_field",
        "data.response_field",
        "data.messages_field",
        "runtime.env",
    ],
)
def test_nul_in_field_names_and_env_values_is_a_spec_error(key: str, tally) -> None:
    """Regression: Arrow cut column names at NUL (a crash in datasets) and no process
    environment can hold one; the spec now refuses both with the key and line."""
    tally()
    field = StringField(key, "dict-value" if key == "runtime.env" else "str")
    with pytest.raises(SpecError) as caught:
        compile_spec(spec_with(field, "a\x00b"), "t.toml", LOCK)
    assert re.search(rf"^t\.toml:\d+:\d+: {re.escape(key)}.*NUL", str(caught.value), re.M)


@pytest.mark.slow
def test_whole_smoke_run_with_a_payload_field_name_executes_nothing(tmp_path: Path, tally) -> None:
    """train.py end to end (smoke mode) with hostile text as the field name and in the data."""
    tally()
    CANARY_DIR.mkdir(exist_ok=True)
    Path(CANARY).unlink(missing_ok=True)
    payload = (
        f"\"\"\"'''\n{{{{ 7*7 }}}}{{% raw %}}$(touch {CANARY})`touch {CANARY}`\u2028"
        f"\"); __import__('os').system('touch {CANARY}') #"
    )
    field = StringField("data.text_field", "str")
    context = compile_spec(spec_with(field, payload), "t.toml", LOCK)
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    for name, data in context.files.items():
        (ctx / name).parent.mkdir(parents=True, exist_ok=True)
        (ctx / name).write_bytes(data)
    rows = [{payload: f"<s>[INST] q{i} {payload} [/INST] a{i} {payload} </s>"} for i in range(16)]
    data_file = tmp_path / "data.jsonl"
    data_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith("QLC_")}
    env.update(
        QLC_OUTPUT_DIR=str(out),
        QLC_SMOKE="1",
        QLC_DATA_PATH=str(data_file),
        QLC_MODEL_PATH=str(SPECS / "tiny" / "model"),
        TOKENIZERS_PARALLELISM="false",
    )
    done = subprocess.run(
        [sys.executable, str(ctx / "train.py")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["predicate"]["status"] == "succeeded"
    assert not Path(CANARY).exists(), "a payload executed"
    assert "49" not in re.findall(r"\d+", payload)
