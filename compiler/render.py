"""Render the build context's files from the plan through the Jinja templates."""

from __future__ import annotations

import json
from importlib import resources

from jinja2 import BaseLoader, Environment, StrictUndefined, TemplateNotFound

from qlc.compiler.plan import Plan

# Shipped verbatim beside train.py: the script imports them from its own directory.
VERBATIM = ("fast_engine.py", "model_card.py")


class _PackageLoader(BaseLoader):
    """Templates from the qlc.templates package, wherever it is installed."""

    def get_source(self, environment: Environment, template: str) -> tuple[str, str, None]:
        path = resources.files("qlc.templates").joinpath(template)
        if not path.is_file():
            raise TemplateNotFound(template)
        return path.read_text(encoding="utf-8"), template, None


def template_environment(ensure_ascii: bool = True) -> Environment:
    """The one Jinja environment for every template qlc ships (build context and job files):
    StrictUndefined, no autoescape, kept newlines, `tojson` with sorted keys; job files keep
    non-ASCII text readable (ensure_ascii=False), the build context is ASCII."""
    env = Environment(
        loader=_PackageLoader(),
        undefined=StrictUndefined,
        autoescape=False,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.policies["json.dumps_kwargs"] = {"sort_keys": True, "ensure_ascii": ensure_ascii}
    return env


def template_text(name: str) -> bytes:
    """A template file shipped verbatim (no rendering)."""
    return resources.files("qlc.templates").joinpath(name).read_bytes()


def plan_json(plan: Plan) -> bytes:
    """The plan as canonical JSON: sorted keys, ASCII, one trailing newline."""
    data = plan.model_dump(mode="json")
    return (json.dumps(data, sort_keys=True, indent=2, ensure_ascii=True) + "\n").encode()


def render_files(plan: Plan, spec_source: bytes, lock: bytes | None) -> dict[str, bytes]:
    """Every file of the build context, by name."""
    env = template_environment()
    python_major, python_minor = (int(part) for part in plan.stack.python.split("."))
    values = {
        "plan": plan,
        "python_version": [python_major, python_minor],
        "has_lock": lock is not None,
    }
    files = {name: template_text(name) for name in VERBATIM}
    files["train.py"] = env.get_template("train.py.j2").render(values).encode()
    files["plan.json"] = plan_json(plan)
    files["spec.toml"] = spec_source
    if lock is not None:
        files["requirements.lock"] = lock
    # Only what the Dockerfile copies may enter the build: an allow-list of the files above.
    values["files"] = sorted(files)
    files["Dockerfile"] = env.get_template("Dockerfile.j2").render(values).encode()
    files[".dockerignore"] = env.get_template("dockerignore.j2").render(values).encode()
    return {name: _normalize(data) for name, data in sorted(files.items())}


def _normalize(data: bytes) -> bytes:
    """LF line endings so a context is byte-identical on every platform."""
    return data.replace(b"\r\n", b"\n")
