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
    if "$ref" in schema:
        return "table"
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
        lines += [f"## [{section}]", "", field.description or "", ""]
        lines += _table(model, schema)
        for name, sub in model.model_fields.items():
            listed, single = _table_of_list(sub.annotation), _optional_table(sub.annotation)
            if listed is not None:
                lines += [f"### [[{section}.{name}]]", "", listed.__doc__ or "", ""]
                lines += _table(listed, schema)
            elif single is not None:
                lines += [f"### [{section}.{name}]", "", sub.description or "", ""]
                lines += _table(single, schema)
    return "\n".join(lines)


def _table(model: type[BaseModel], schema: dict[str, Any]) -> list[str]:
    properties = schema["$defs"][model.__name__]["properties"]
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for name, sub in model.model_fields.items():
        kind = _type(properties[name])
        lines.append(f"| `{name}` | {kind} | {_default(model, name)} | {sub.description} |")
    return [*lines, ""]


def _table_of_list(annotation: Any) -> type[BaseModel] | None:
    """The table type of an array-of-tables key (list[Model]), else None."""
    args = getattr(annotation, "__args__", ())
    if getattr(annotation, "__origin__", None) is list and len(args) == 1:
        item = args[0]
        if isinstance(item, type) and issubclass(item, BaseModel):
            return item
    return None


def _optional_table(annotation: Any) -> type[BaseModel] | None:
    """The table type of an optional sub-table key (Model | None), else None."""
    tables = [
        arg
        for arg in getattr(annotation, "__args__", ())
        if isinstance(arg, type) and issubclass(arg, BaseModel)
    ]
    return tables[0] if len(tables) == 1 else None


if __name__ == "__main__":
    TARGET.parent.mkdir(exist_ok=True)
    TARGET.write_text(reference())
    sys.stdout.write(f"wrote {TARGET}\n")
