"""The generated train.py (templates/train.py.j2): the recipe, for every spec in specs/. It
compiles, passes ruff with the repository's configuration, names every setting of the plan with
the spec key it came from, and user strings reach it only as JSON-escaped docstring text."""

from __future__ import annotations

import ast
import json
import py_compile
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from qlc.compiler.context import BuildContext, compile_spec

REPO = Path(__file__).resolve().parents[2]
SPECS = REPO / "specs"
SPEC_NAMES = sorted(p.name for p in SPECS.glob("*.toml"))
HOSTILE = 'x"""\nimport os; os.system("echo pwned") #\\'


def compiled(spec_name: str, source: bytes | None = None, name: str | None = None) -> BuildContext:
    path = SPECS / spec_name
    lock = path.with_suffix(".lock")
    return compile_spec(
        path.read_bytes() if source is None else source,
        name or f"specs/{spec_name}",
        lock.read_bytes() if source is None else None,
        require_lock=False,
    )


def script_of(context: BuildContext) -> str:
    return context.files["train.py"].decode("ascii")  # the build context is ASCII


def settings_node(tree: ast.Module) -> ast.Dict:
    for node in tree.body:
        if isinstance(node, ast.Assign) and [ast.unparse(t) for t in node.targets] == ["SETTINGS"]:
            assert isinstance(node.value, ast.Dict)
            return node.value
    raise AssertionError("train.py has no SETTINGS")


@pytest.mark.parametrize("spec_name", SPEC_NAMES)
def test_the_script_compiles_and_passes_ruff(spec_name: str, tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_bytes(compiled(spec_name).files["train.py"])
    py_compile.compile(str(script), doraise=True)
    for command in (["check"], ["format", "--check"]):
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "ruff",
                *command,
                "--config",
                str(REPO / "pyproject.toml"),
                str(script),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("spec_name", SPEC_NAMES)
def test_every_setting_is_a_literal_named_with_its_spec_key(spec_name: str) -> None:
    context = compiled(spec_name)
    text = script_of(context)
    lines = text.splitlines()
    node = settings_node(ast.parse(text))
    rows = context.plan.settings()
    keys = [ast.literal_eval(key) for key in node.keys if key is not None]
    assert keys == [row.name for row in rows]
    for row, key, value in zip(rows, node.keys, node.values, strict=True):
        assert ast.literal_eval(value) == row.value, row.name
        assert key is not None
        line = lines[key.lineno - 1]
        comment = f"# {row.source}"
        assert line.endswith(f",  {comment}") or lines[key.lineno - 2].strip() == comment, line
    plan = json.loads(context.files["plan.json"])
    assert plan["spec_name"] == f"specs/{spec_name}" and plan["version"] == 2


def test_substitutions_are_listed_under_the_settings() -> None:
    source = (SPECS / "guanaco.toml").read_text().replace("[train]\n", '[train]\nmemory = "lean"\n')
    text = script_of(compiled("guanaco.toml", source.encode()))
    assert "# Substitutions (asked for by the spec):\n" in text
    assert '#   train.optimizer: "paged_adamw_32bit" -> "paged_adamw_8bit"\n#     (' in text
    assert "Substitutions" not in script_of(compiled("tiny.toml"))


def docstring_and_code(text: str) -> tuple[str, list[Any]]:
    tree = ast.parse(text)
    first = tree.body[0]
    assert isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
    return str(first.value.value), tree.body[1:]


def strings_in(nodes: list[Any]) -> list[str]:
    return [
        node.value
        for top in nodes
        for node in ast.walk(top)
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
    ]


def test_a_hostile_model_path_stays_json_escaped_inside_the_docstring() -> None:
    tiny = (SPECS / "tiny.toml").read_text()
    source = tiny.replace('path = "tiny/model"', f"path = {json.dumps(HOSTILE)}")
    context = compiled("tiny.toml", source.encode())
    text = script_of(context)
    assert HOSTILE not in text and json.dumps(HOSTILE) in text  # the model's name, escaped
    doc, code = docstring_and_code(text)
    assert doc.startswith(f'QLoRA fine-tuning of "{HOSTILE}", compiled by qlc')  # all of it
    assert not any("pwned" in s for s in strings_in(code))
    _, benign = docstring_and_code(script_of(compiled("tiny.toml")))
    assert [ast.dump(n) for n in code] == [ast.dump(n) for n in benign]  # the same program
    assert json.loads(context.files["plan.json"])["model"]["local_path"] == HOSTILE


def test_a_hostile_spec_name_stays_inside_the_docstring() -> None:
    name = 'evil"""; import os #\\.toml'
    text = script_of(compiled("tiny.toml", (SPECS / "tiny.toml").read_bytes(), name))
    doc, code = docstring_and_code(text)
    assert f"spec:   {json.dumps(name)}" in text and f'spec:   "{name}"' in doc
    assert not any("evil" in s for s in strings_in(code))
    assert isinstance(code[0], ast.Import) and [a.name for a in code[0].names] == ["sys"]
