"""Load a TOML spec into a `Spec`, or fail once listing every problem as FILE:LINE:COL: key: msg."""

from __future__ import annotations

import difflib
import json
import re
import tomllib
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from pydantic import BaseModel, ValidationError

from qlc.compiler.locate import KeyPath, key_positions, locate
from qlc.compiler.spec import (
    CONFIG_NAME,
    ENV_NAME,
    FORMAT_KEYS,
    HUB_ID,
    JOB_NAME,
    REVISION,
    SHA256,
    RuleError,
    Spec,
)
from qlc.userio import (
    CLIP_CHARS,
    FileTooLarge,
    UnreadableFile,
    clip,
    clip_words,
    read_optional_user_file,
    read_user_file,
)

MAX_SPEC_BYTES = 1 << 20
TOML_TYPES = {
    str: "string",
    bool: "boolean",
    int: "integer",
    float: "float",
    list: "array",
    dict: "table",
}
EXPECTED = {
    "string_type": "a string",
    "int_type": "an integer",
    "float_type": "a number",
    "bool_type": "a boolean (true or false)",
    "list_type": "an array",
    "dict_type": "a table",
    "model_type": "a table",
    "model_attributes_type": "a table",
    "none_required": "absent",
}
BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
PYDANTIC_TAG = re.compile(  # validator/union tags pydantic puts into an error's location
    r"(function-(after|before|wrap|plain)|tagged-union|union|literal|list|dict|tuple|set"
    r"|nullable|lax-or-strict|json-or-python|chain|is-instance|constrained-[a-z]+)\[.*\]",
    re.S,
)
PATTERNS = {
    HUB_ID: 'a hub id like "org/name"',
    ENV_NAME: "an environment variable name (A-Z, 0-9 and _, not starting with a digit)",
    JOB_NAME: "lowercase letters, digits, '.', '_' or '-' (at most 63, starting with a letter "
    "or digit)",
    REVISION: "a commit sha, tag or branch name",
    r"^\d+\.\d+$": 'a version like "12.8"',
    r"^\d+[kmgKMG]?$": 'a size like "16g"',
    r"^\d+\.\d+(\.\d+)?$": 'a version like "2.13" or "2.13.0"',
    r"^3\.\d+$": 'a Python version like "3.11"',
    r"^[A-Za-z0-9_.-]{1,64}$": "a split name: letters, digits, '_', '.' or '-' (at most 64)",
    r"^[A-Za-z0-9_.]{1,128}$": "a module name: letters, digits, '_' or '.' (at most 128)",
    SHA256: "a sha256 in hex: 64 characters 0-9 and a-f",
    CONFIG_NAME: "a dataset configuration name: letters, digits, '_', '.' or '-' (at most 128, "
    "starting with a letter or digit)",
}
BOUNDS = {
    "greater_than": ("gt", "greater than"),
    "greater_than_equal": ("ge", "at least"),
    "less_than": ("lt", "less than"),
    "less_than_equal": ("le", "at most"),
}


@dataclass(frozen=True)
class Diagnostic:
    file: str
    line: int
    column: int
    key: str
    message: str

    def __str__(self) -> str:
        """One line; a key or value the user wrote is clipped, however long it was."""
        where = f"{clip_words(self.file, 300)}:{self.line}:{self.column}"
        key = ".".join(clip(part, CLIP_CHARS) for part in self.key.split("."))
        message = clip_words(self.message)
        return f"{where}: {key}: {message}" if self.key else f"{where}: {message}"


class SpecError(Exception):
    """A spec that cannot be used; carries every problem found."""

    def __init__(self, diagnostics: list[Diagnostic]) -> None:
        self.diagnostics = diagnostics
        super().__init__("\n".join(str(d) for d in diagnostics))


class LoadedSpec(NamedTuple):
    spec: Spec
    warnings: list[Diagnostic]


def load_spec_file(path: str | Path) -> LoadedSpec:
    """Read and load a spec file; unreadable files are spec errors too."""
    return load_spec(read_spec_file(Path(path)), str(path))


def read_spec_and_lock(path: Path) -> tuple[bytes, bytes | None]:
    """A spec's bytes and those of its lock beside it (None when there is none); a SpecError
    naming the file when either cannot be read (not a regular file, too large, no access)."""
    from qlc.compiler.context import lock_name  # context builds on this module
    from qlc.compiler.lockfile import MAX_LOCK_BYTES

    source = read_spec_file(path)
    lock_path = Path(lock_name(str(path)))
    try:
        return source, read_optional_user_file(lock_path, MAX_LOCK_BYTES)
    except UnreadableFile as err:
        problem = Diagnostic(str(lock_path), 1, 1, "", f"cannot read the lock: {err.reason}")
        raise SpecError([problem]) from None


def read_spec_file(path: Path) -> bytes:
    """A spec's bytes (a regular file of at most MAX_SPEC_BYTES), or a SpecError saying why not."""
    try:
        return read_user_file(path, MAX_SPEC_BYTES)
    except FileTooLarge as err:
        raise SpecError([_too_large(str(path), err.size, err.exact)]) from None
    except UnreadableFile as err:
        problem = Diagnostic(str(path), 1, 1, "", f"cannot read the spec: {err.reason}")
        raise SpecError([problem]) from None


def load_spec(source: bytes, filename: str) -> LoadedSpec:
    """Parse and validate spec bytes. Raises SpecError listing all problems at once."""
    text = _decode(source, filename)
    document = _parse(text, filename)
    positions = key_positions(text)
    try:
        spec = Spec.model_validate(document)
    except ValidationError as err:
        diagnostics = [_diagnostic(e, positions, filename) for e in err.errors()]
        unique = list(dict.fromkeys(diagnostics))
        raise SpecError(sorted(unique, key=lambda d: (d.line, d.column, d.key))) from None
    return LoadedSpec(spec, _warnings(spec, positions, filename))


def _decode(source: bytes, filename: str) -> str:
    if len(source) > MAX_SPEC_BYTES:
        raise SpecError([_too_large(filename, len(source), exact=True)])
    try:
        text = source.decode("utf-8")
    except UnicodeDecodeError as err:
        line = source[: err.start].count(b"\n") + 1
        column = err.start - (source.rfind(b"\n", 0, err.start) + 1) + 1
        message = f"not UTF-8 text (byte 0x{source[err.start]:02x}); a spec is a TOML text file"
        raise SpecError([Diagnostic(filename, line, column, "", message)]) from None
    if "\x00" in text:
        index = text.index("\x00")
        line = text.count("\n", 0, index) + 1
        column = index - (text.rfind("\n", 0, index) + 1) + 1
        raise SpecError([Diagnostic(filename, line, column, "", "NUL byte: a spec is a text file")])
    return text.removeprefix("\ufeff")


def _too_large(filename: str, size: int, exact: bool) -> Diagnostic:
    shown = f"{'' if exact else 'over '}{size / 1e6:.1f} MB"
    return Diagnostic(filename, 1, 1, "", f"spec is {shown}; specs are at most 1 MiB")


def _parse(text: str, filename: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        message = str(err)
        match = re.search(r"\(at line (\d+), column (\d+)\)", message)
        line, column = (int(match.group(1)), int(match.group(2))) if match else (1, 1)
        if "end of document" in message:
            line, column = text.count("\n") + 1, 1
        reason = re.sub(r"\s*\(at (line \d+, column \d+|end of document)\)", "", message)
        raise SpecError(
            [Diagnostic(filename, line, column, "", f"TOML syntax: {reason}")]
        ) from None
    except RecursionError:
        raise SpecError([Diagnostic(filename, 1, 1, "", "TOML nested too deeply")]) from None


def _clean_loc(loc: tuple[int | str, ...]) -> KeyPath:
    """Drop pydantic's internal parts ('[key]', tags such as 'function-after[...]') and
    stringify list indexes; a user's key that merely contains '[' stays."""
    return tuple(
        str(part) for part in loc if part != "[key]" and not PYDANTIC_TAG.fullmatch(str(part))
    )


def _key_text(loc: KeyPath) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if part.isdigit() else (f".{part}" if text else part)
    return text


def _shown(value: Any) -> str:
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    text = (
        _printable(json.dumps(value, ensure_ascii=False))
        if isinstance(value, str | bool)
        else (str(value))
    )
    text = clip(text)
    return f"{TOML_TYPES.get(type(value), type(value).__name__)} {text}"


def _printable(text: str) -> str:
    """Escape control and line-separator characters so a diagnostic stays on one line."""
    return "".join(
        f"\\u{ord(ch):04x}" if unicodedata.category(ch)[0] in "CZ" and ch != " " else ch
        for ch in text
    )


def _model_at(loc: KeyPath) -> type[BaseModel] | None:
    model: type[BaseModel] = Spec
    for part in loc:
        field = model.model_fields.get(part)
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model


def _unknown_key(loc: KeyPath) -> str:
    model = _model_at(loc[:-1]) if loc else None
    if model is None:
        return "unknown key"
    known = sorted(model.model_fields)
    close = difflib.get_close_matches(loc[-1], known, n=1, cutoff=0.6)
    if close:
        return f'unknown key; did you mean "{close[0]}"?'
    return f"unknown key; expected one of: {', '.join(known)}"


def _message(error: Any, loc: KeyPath) -> tuple[KeyPath, str]:
    kind, ctx, value = error["type"], error.get("ctx") or {}, error.get("input")
    if kind == "missing":
        return loc, "required key is missing"
    if kind == "extra_forbidden":
        return loc, _unknown_key(loc)
    if kind == "value_error" and isinstance(ctx.get("error"), RuleError):
        rule = ctx["error"]
        return loc + tuple(k for k in rule.key.split(".") if k), str(rule)
    if kind in BOUNDS:
        name, words = BOUNDS[kind]
        return loc, f"must be {words} {ctx[name]} (got {value})"
    if kind == "literal_error":
        expected = str(ctx["expected"]).replace("'", '"')
        return loc, f"must be one of {expected} (got {_shown(value)})"
    if kind == "string_pattern_mismatch":
        wanted = PATTERNS.get(ctx["pattern"])
        if wanted is None:
            return loc, f"must match the pattern {ctx['pattern']} (got {_shown(value)})"
        return loc, f"must be {wanted} (got {_shown(value)})"
    if kind in EXPECTED:
        return loc, f"must be {EXPECTED[kind]} (got {_shown(value)})"
    message = str(error["msg"]).removeprefix("Value error, ")
    return loc, f"{message[0].lower()}{message[1:]}" if message else kind


def _diagnostic(error: Any, positions: dict[KeyPath, tuple[int, int]], filename: str) -> Diagnostic:
    loc, message = _message(error, _clean_loc(error["loc"]))
    line, column = locate(positions, loc)
    bare = next((i for i, part in enumerate(loc) if not BARE_KEY.fullmatch(part)), len(loc))
    if bare < len(loc):  # a quoted key (" ", "a.b"): name it in the message, as TOML spells it
        rest = ".".join(p if BARE_KEY.fullmatch(p) else json.dumps(p, ensure_ascii=False)
                        for p in loc[bare:])  # fmt: skip
        loc, message = loc[:bare], f"{rest}: {message}"
    return Diagnostic(filename, line, column, _printable(_key_text(loc)), _printable(message))


def _warnings(
    spec: Spec, positions: dict[KeyPath, tuple[int, int]], filename: str
) -> list[Diagnostic]:
    found: list[tuple[KeyPath, str]] = []
    scale = spec.lora.alpha / spec.lora.r
    if not 0.25 <= scale <= 4:
        found.append(
            (
                ("lora", "alpha"),
                f"LoRA scale alpha/r = {scale:g} is unusual (most "
                "recipes use 0.25 to 4); check lora.alpha and lora.r",
            )
        )
    if spec.model.id is not None and spec.model.revision is None:
        found.append(
            (
                ("model", "id"),
                "no 'revision': the hub may change this model under you; "
                "pin a commit sha for a reproducible run",
            )
        )
    if spec.data.id is not None and spec.data.revision is None:
        found.append(
            (
                ("data", "id"),
                "no 'revision': the hub may change this dataset under you; "
                "pin a commit sha for a reproducible run",
            )
        )
    if spec.train.save_steps is None:
        found.append((("train",), "no 'save_steps': an interrupted run restarts from step 0"))
    reads = ", ".join(f"data.{key}" for key in FORMAT_KEYS[spec.data.format]) or "no other key"
    found += [
        (("data", key), f'does not apply to data.format = "{spec.data.format}" (which reads '
         f"{reads}): remove it, or change the format")
        for key in spec.data.inapplicable_keys()
    ]  # fmt: skip
    diagnostics = []
    for key, message in found:
        line, column = locate(positions, key)
        diagnostics.append(Diagnostic(filename, line, column, _key_text(key), message))
    return diagnostics
