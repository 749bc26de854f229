"""Render the build context's files from the plan: the recipe (train.py) and the Dockerfile
through the Jinja templates, and the trainer package shipped verbatim beside them (only the
modules the plan's engine needs)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources

from jinja2 import BaseLoader, Environment, StrictUndefined, TemplateNotFound

from qlc import contract
from qlc.compiler.plan import Plan
from qlc.contract import LOCK_FILE, PLAN_FILE, SCRIPT_FILE, SPEC_FILE

# What the trainer imports besides its own package, as (package, module file) under qlc/.
SUPPORT_MODULES = (
    ("qlc", "__init__.py"),
    ("qlc", "contract.py"),
    ("qlc.compiler", "__init__.py"),
    ("qlc.compiler", "plan.py"),
)
TRAINER_PACKAGE = "qlc.trainer"
# Modules of one engine only: shipped when the plan runs that engine.
ENGINE_MODULES = {"reference": ("reference.py",), "fast": ()}
FAST_PACKAGE = "qlc.trainer.fast"


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


def plan_json(plan: Plan) -> bytes:
    """The plan as canonical JSON: sorted keys, ASCII, one trailing newline."""
    data = plan.model_dump(mode="json")
    return (json.dumps(data, sort_keys=True, indent=2, ensure_ascii=True) + "\n").encode()


def _python_files(package: str) -> list[str]:
    return sorted(p.name for p in resources.files(package).iterdir() if p.name.endswith(".py"))


def trainer_modules(plan: Plan) -> list[str]:
    """Context paths (qlc/...) of the trainer modules the plan's engine runs: the package
    without the other engines' modules, and what it imports from qlc."""
    other = {n for engine, names in ENGINE_MODULES.items() if engine != plan.engine.name
             for n in names}  # fmt: skip
    modules = [*SUPPORT_MODULES]
    modules += [(TRAINER_PACKAGE, n) for n in _python_files(TRAINER_PACKAGE) if n not in other]
    if plan.engine.name == "fast":
        modules += [(FAST_PACKAGE, name) for name in _python_files(FAST_PACKAGE)]
    return sorted(f"{package.replace('.', '/')}/{name}" for package, name in modules)


def module_bytes(context_path: str) -> bytes:
    package, name = context_path.rsplit("/", 1)
    return resources.files(package.replace("/", ".")).joinpath(name).read_bytes()


MAX_LINE = 100


@dataclass(frozen=True)
class LiteralRow:
    name: str
    literal: str  # a Python literal made here (py_literal), so no user text becomes code
    source: str

    @property
    def inline(self) -> bool:
        """Whether `"name": literal,  # source` fits one line of train.py."""
        return len(f'    "{self.name}": {self.literal},  # {self.source}') <= MAX_LINE


def py_literal(value: object) -> str:
    """A JSON value as Python source: strings as escaped ASCII literals, never raw text."""
    if value is None or isinstance(value, bool | int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value) if value.isascii() else ascii(value)
    if isinstance(value, list):
        return "[" + ", ".join(py_literal(item) for item in value) + "]"
    raise TypeError(f"no Python literal for a setting of type {type(value).__name__}")


def setting_literals(plan: Plan) -> list[LiteralRow]:
    return [LiteralRow(row.name, py_literal(row.value), row.source) for row in plan.settings()]


def render_files(plan: Plan, spec_source: bytes, lock: bytes | None) -> dict[str, bytes]:
    """Every file of the build context, by name."""
    env = template_environment()
    python_major, python_minor = (int(part) for part in plan.stack.python.split("."))
    modules = trainer_modules(plan)
    values = {
        "plan": plan,
        "python_version": [python_major, python_minor],
        "has_lock": lock is not None,
        "settings": setting_literals(plan),
        "c": contract,  # protocol names and the container user, from their one place
    }
    files = {path: module_bytes(path) for path in modules}
    files[SCRIPT_FILE] = env.get_template("train.py.j2").render(values).encode()
    files[PLAN_FILE] = plan_json(plan)
    files[SPEC_FILE] = spec_source
    if lock is not None:
        files[LOCK_FILE] = lock
    # Only what the Dockerfile copies may enter the build: an allow-list of the files above.
    values["files"] = sorted(files)
    files["Dockerfile"] = env.get_template("Dockerfile.j2").render(values).encode()
    files[".dockerignore"] = env.get_template("dockerignore.j2").render(values).encode()
    return {name: _normalize(data) for name, data in sorted(files.items())}


def template_text(name: str) -> bytes:
    """A template file shipped verbatim (no rendering)."""
    return resources.files("qlc.templates").joinpath(name).read_bytes()


def _normalize(data: bytes) -> bytes:
    """LF line endings so a context is byte-identical on every platform."""
    return data.replace(b"\r\n", b"\n")
