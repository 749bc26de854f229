"""explain, schema and the generated spec reference."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import jsonschema
import pytest

from qlc.compiler.explain import derived, explain
from qlc.compiler.load import load_spec_file
from qlc.compiler.spec import Spec

ROOT = Path(__file__).resolve().parents[2]
SPECS = sorted((ROOT / "specs").glob("*.toml"))


def qlc(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "qlc", *args], cwd=ROOT, capture_output=True, text=True, timeout=60
    )


def leaf_keys(model: type, prefix: str = "") -> set[str]:
    keys: set[str] = set()
    for name, field in model.model_fields.items():  # type: ignore[attr-defined]
        annotation = field.annotation
        if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
            keys |= leaf_keys(annotation, f"{prefix}{name}.")
        else:
            keys.add(f"{prefix}{name}")
    return keys


def test_explain_lists_every_field_with_its_source() -> None:
    spec, _ = load_spec_file(ROOT / "specs/guanaco.toml")
    rows = {row.key: row for row in explain(spec)}
    assert set(rows) == leaf_keys(Spec)
    assert rows["lora.r"].value == 64 and rows["lora.r"].source == "spec"
    deterministic = rows["job.deterministic"]
    assert deterministic.value is False and deterministic.source == "default"
    assert rows["train.warmup_ratio"].value == 0.03
    assert all(row.description for row in rows.values())


def test_explain_derived_values() -> None:
    spec, _ = load_spec_file(ROOT / "specs/guanaco.toml")
    values = {row.key: row.value for row in derived(spec)}
    assert values["derived.examples_per_optimizer_step"] == 4
    assert values["derived.lora_scale"] == 0.25


def test_explain_cli_json_matches_the_spec() -> None:
    result = qlc("explain", "specs/guanaco.toml", "--json")
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    source = tomllib.loads((ROOT / "specs/guanaco.toml").read_text())
    for section, values in source.items():
        for key, value in values.items():
            assert shown[f"{section}.{key}"] == {"value": value, "source": "spec"}


def test_explain_cli_plain_text() -> None:
    result = qlc("explain", "specs/guanaco.toml")
    assert result.returncode == 0
    lines = result.stdout.splitlines()
    assert any(line.startswith("lora.r ") and line.endswith("64  (spec)") for line in lines)
    assert any(line.startswith("job.deterministic ") and "(default)" in line for line in lines)


@pytest.mark.parametrize("spec", SPECS, ids=lambda p: p.name)
def test_schema_validates_shipped_specs(spec: Path) -> None:
    result = qlc("schema")
    assert result.returncode == 0
    jsonschema.validate(tomllib.loads(spec.read_text()), json.loads(result.stdout))


def test_schema_rejects_an_unknown_key() -> None:
    schema = Spec.model_json_schema()
    document = tomllib.loads((ROOT / "specs/guanaco.toml").read_text())
    document["lora"]["rank"] = 8
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(document, schema)


def test_spec_reference_has_not_drifted() -> None:
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        from spec_reference import reference
    finally:
        sys.path.pop(0)
    committed = (ROOT / "docs" / "spec.md").read_text()
    assert committed == reference(), "docs/spec.md is stale: run python tools/spec_reference.py"
