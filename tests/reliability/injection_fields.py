"""Every free string field of the spec, found from the pydantic models, and specs that set one.

A field is "free" when a user can type text into it: `str` (optionally `| None`), lists of
strings, and both keys and values of string tables, whatever their pattern or length limit
(a pattern that rejects a payload is a pass; the test still tries it). Literals are not free.
A new string field in compiler/spec.py is covered without touching this file.
"""

from __future__ import annotations

import json
import tomllib
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel
from reliability_support import TINY_SPEC

from qlc.compiler.spec import Spec


@dataclass(frozen=True)
class StringField:
    key: str  # dotted, e.g. "data.text_field"
    shape: Literal["str", "list", "dict-key", "dict-value"]


def _string_shapes(annotation: Any) -> set[str]:
    """Which ways a string can sit in this annotation."""
    origin = typing.get_origin(annotation)
    if annotation is str:
        return {"str"}
    if origin is typing.Annotated:
        return _string_shapes(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return set().union(*(_string_shapes(a) for a in typing.get_args(annotation)))
    if origin is list:
        return {"list"} if _string_shapes(typing.get_args(annotation)[0]) else set()
    if origin is dict:
        key, value = typing.get_args(annotation)
        return ({"dict-key"} if _string_shapes(key) else set()) | (
            {"dict-value"} if _string_shapes(value) else set()
        )
    return set()


def free_string_fields(model: type[BaseModel] = Spec, prefix: str = "") -> list[StringField]:
    found: list[StringField] = []
    for name, info in model.model_fields.items():
        annotation = info.annotation
        inner = (
            typing.get_args(annotation)[0]
            if typing.get_origin(annotation) is typing.Annotated
            else annotation
        )
        if isinstance(inner, type) and issubclass(inner, BaseModel):
            found.extend(free_string_fields(inner, f"{prefix}{name}."))
            continue
        shapes = _string_shapes(annotation)
        # str | list[str] (e.g. target_modules) is tried both ways.
        found.extend(StringField(f"{prefix}{name}", shape) for shape in sorted(shapes))  # type: ignore[arg-type]
    return found


def tiny_document() -> dict[str, dict[str, Any]]:
    return tomllib.loads(TINY_SPEC.read_text())


def _set(document: dict[str, dict[str, Any]], field: StringField, value: str) -> None:
    section, _, name = field.key.partition(".")
    table = document.setdefault(section, {})
    if field.key in ("model.id", "model.revision"):
        table.pop("path", None)
        table["id"] = "org/model"
    if field.key in ("data.id", "data.revision"):
        table.pop("path", None)
        table.pop("eval_fraction", None)
        table["id"] = "org/data"
        table["eval_split"] = "test"
    if field.key == "data.eval_split":
        table.pop("eval_fraction", None)
    if field.key == "data.path":
        value += ".jsonl"  # past the suffix check, so the payload itself is what is tested
    if field.shape == "str":
        table[name] = value
    elif field.shape == "list":
        table[name] = [value]
    elif field.shape == "dict-key":
        table[name] = {value: "1"}
    else:
        table[name] = {"PAYLOAD": value}


def toml_string(value: str) -> str:
    """A TOML basic string: JSON's escapes are TOML's (astral characters stay literal)."""
    return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(value)


def to_toml(document: dict[str, dict[str, Any]]) -> bytes:
    lines: list[str] = []
    for section, table in document.items():
        lines.append(f"[{section}]")
        tables = {k: v for k, v in table.items() if isinstance(v, dict)}
        for key, value in table.items():
            if key not in tables:
                lines.append(f"{toml_string(key)} = {_toml_value(value)}")
        for key, sub in tables.items():
            lines.append(f"[{section}.{toml_string(key)}]")
            lines.extend(f"{toml_string(k)} = {_toml_value(v)}" for k, v in sub.items())
    return ("\n".join(lines) + "\n").encode()


def spec_with(field: StringField, value: str) -> bytes:
    """The tiny spec with one free string field set to value (and what that field needs)."""
    document = tiny_document()
    _set(document, field, value)
    return to_toml(document)


PLAN_NAMES = {"id": "hub_id", "path": "local_path"}  # spec key -> the plan's name for it


def spec_value(plan: dict[str, Any], field: StringField) -> Any:
    """Read a field back from plan.json, in the shape it was set."""
    section, _, name = field.key.partition(".")
    if section in ("model", "data"):
        name = PLAN_NAMES.get(name, name)
    value = plan[section][name]
    if field.shape == "list":
        return value[0]
    if field.shape == "dict-key":
        return next(iter(value))
    if field.shape == "dict-value":
        return value["PAYLOAD"]
    return value
