"""explain, schema and the generated spec reference."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import jsonschema
import pytest

from qlc.compiler.context import plan_spec
from qlc.compiler.explain import explain, settings_lines
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


def test_explain_settings_are_the_plan_s_with_their_spec_keys() -> None:
    plan, _ = plan_spec((ROOT / "specs/guanaco.toml").read_bytes(), "specs/guanaco.toml")
    values = {row.name: row.value for row in plan.settings()}
    assert values["examples_per_step"] == 4 and values["lora_scale"] == 0.25
    assert values["base_matmul_dtype"] == "float16"  # quantization.compute_dtype as written
    assert values["adapter_compute_dtype"] == "float32"  # mixed_precision = "no"
    assert values["optimizer"] == "paged_adamw_32bit" and values["optimizer_state_bits"] == 32
    lines = settings_lines(plan)
    assert "substitutions: none (everything trains as the spec wrote it)" in lines


def test_explain_names_every_substitution_and_why() -> None:
    text = (
        (ROOT / "specs/guanaco.toml")
        .read_text()
        .replace(
            'optimizer = "paged_adamw_32bit"', 'optimizer = "paged_adamw_32bit"\nmemory = "lean"'
        )
        .replace("gradient_checkpointing = true", "gradient_checkpointing = false")
    )
    plan, _ = plan_spec(text.encode(), "lean.toml")
    subs = {s.key: s for s in plan.substitutions}
    assert subs["train.optimizer"].written == "paged_adamw_32bit"
    assert subs["train.optimizer"].effective == "paged_adamw_8bit"
    assert "lean" in subs["train.optimizer"].why
    assert subs["train.gradient_checkpointing"].effective is True
    shown = "\n".join(settings_lines(plan))
    assert 'train.optimizer: "paged_adamw_32bit" -> "paged_adamw_8bit"' in shown


def test_explain_cli_json_matches_the_spec() -> None:
    result = qlc("explain", "specs/guanaco.toml", "--json")
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    source = tomllib.loads((ROOT / "specs/guanaco.toml").read_text())
    for section, values in source.items():
        for key, value in values.items():
            assert shown["spec"][f"{section}.{key}"] == {"value": value, "source": "spec"}
    plan, _ = plan_spec((ROOT / "specs/guanaco.toml").read_bytes(), "specs/guanaco.toml")
    assert shown["settings"] == {
        r.name: {"value": r.value, "source": r.source} for r in plan.settings()
    }
    assert shown["substitutions"] == []


def test_explain_cli_plain_text() -> None:
    result = qlc("explain", "specs/guanaco.toml")
    assert result.returncode == 0
    lines = result.stdout.splitlines()
    assert any(line.startswith("  lora.r ") and line.endswith("64  (spec)") for line in lines)
    assert any(line.startswith("  job.deterministic ") and "(default)" in line for line in lines)
    assert any(line.startswith("  engine ") and "(train.engine)" in line for line in lines)


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
