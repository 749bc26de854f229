"""Write docs/spec.md, the spec language reference, from the pydantic models.

Run `python tools/spec_reference.py` after changing compiler/spec.py; a test fails when the
committed reference drifts from the models.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from qlc.compiler.spec import Spec

TARGET = Path(__file__).resolve().parents[1] / "docs" / "spec.md"


def _type(schema: dict[str, Any]) -> str:
    if "enum" in schema:
        return " \\| ".join(json.dumps(v) for v in schema["enum"])
    if "const" in schema:
        return json.dumps(schema["const"])
    if "anyOf" in schema:
        return " \\| ".join(_type(s) for s in schema["anyOf"])
    if schema.get("type") == "array":
        return f"array of {_type(schema.get('items', {}))}"
    if schema.get("type") == "object":
        return "table"
    return str(schema.get("type", "any"))


def _default(model: type[BaseModel], name: str) -> str:
    field = model.model_fields[name]
    if field.default is PydanticUndefined:
        return "**required**"
    value = field.default
    if isinstance(value, BaseModel):
        return "(table)"
    return f"`{json.dumps(value)}`"


def reference() -> str:
    schema = Spec.model_json_schema()
    lines = [
        "# The qlc spec language",
        "",
        "Generated from `compiler/spec.py` by `tools/spec_reference.py`; do not edit by hand.",
        "Unknown keys are errors. Paths in `model` and `data` are relative to the spec file.",
        "",
    ]
    for section, field in Spec.model_fields.items():
        model = field.annotation
        assert isinstance(model, type) and issubclass(model, BaseModel)
        properties = schema["$defs"][model.__name__]["properties"]
        lines += [f"## [{section}]", "", field.description or "", ""]
        lines += ["| key | type | default | meaning |", "|---|---|---|---|"]
        for name, sub in model.model_fields.items():
            kind = _type(properties[name])
            lines.append(f"| `{name}` | {kind} | {_default(model, name)} | {sub.description} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    TARGET.parent.mkdir(exist_ok=True)
    TARGET.write_text(reference())
    sys.stdout.write(f"wrote {TARGET}\n")
