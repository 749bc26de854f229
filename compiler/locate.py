"""Find where each key of a TOML document stands, so errors can name FILE:LINE:COL.

tomllib gives values but no positions; this scanner walks the source once and records the
line and column of every table header and key. It understands comments, basic and literal
strings (also multi-line), dotted and quoted keys, inline tables and multi-line arrays, which
is all a position lookup needs; the values themselves always come from tomllib.
"""

from __future__ import annotations

import re

Position = tuple[int, int]
KeyPath = tuple[str, ...]

_BARE = re.compile(r"[A-Za-z0-9_-]+")


def _skip_string(text: str, i: int) -> int:
    """Index just past the string starting at text[i] (a quote)."""
    quote = text[i]
    if text.startswith(quote * 3, i):
        end = text.find(quote * 3, i + 3)
        if end < 0:
            return len(text)
        end += 3
        while end < len(text) and text[end] == quote:  # up to two extra quotes belong inside
            end += 1
        return end
    j = i + 1
    while j < len(text) and text[j] != "\n":
        if text[j] == "\\" and quote == '"':
            j += 2
            continue
        if text[j] == quote:
            return j + 1
        j += 1
    return j


def _read_key(text: str, i: int) -> tuple[list[str], int]:
    """Parse a (dotted, possibly quoted) key at text[i]; return its parts and the end index."""
    parts: list[str] = []
    while i < len(text):
        while i < len(text) and text[i] in " \t":
            i += 1
        if i < len(text) and text[i] in "\"'":
            end = _skip_string(text, i)
            raw = text[i + 1 : end - 1]
            parts.append(raw.encode().decode("unicode_escape") if text[i] == '"' else raw)
            i = end
        else:
            match = _BARE.match(text, i)
            if not match:
                return parts, i
            parts.append(match.group())
            i = match.end()
        while i < len(text) and text[i] in " \t":
            i += 1
        if i < len(text) and text[i] == ".":
            i += 1
            continue
        return parts, i
    return parts, i


class _Scanner:
    def __init__(self, text: str) -> None:
        self.text = text
        self.positions: dict[KeyPath, Position] = {}
        self.line_starts = [0] + [m.end() for m in re.finditer("\n", text)]

    def position(self, index: int) -> Position:
        lo, hi = 0, len(self.line_starts) - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.line_starts[mid] <= index:
                lo = mid
            else:
                hi = mid - 1
        return lo + 1, index - self.line_starts[lo] + 1

    def record(self, path: KeyPath, index: int) -> None:
        self.positions.setdefault(path, self.position(index))

    def skip_space(self, i: int, newlines: bool) -> int:
        while i < len(self.text):
            ch = self.text[i]
            if ch == "#":
                while i < len(self.text) and self.text[i] != "\n":
                    i += 1
            elif ch in " \t\r" or (newlines and ch == "\n"):
                i += 1
            else:
                break
        return i

    def value(self, i: int, path: KeyPath) -> int:
        """Skip a value at text[i], recording keys inside inline tables."""
        ch = self.text[i] if i < len(self.text) else ""
        if ch in "\"'":
            return _skip_string(self.text, i)
        if ch == "[":
            return self.container(i + 1, "]", path, inline_table=False)
        if ch == "{":
            return self.container(i + 1, "}", path, inline_table=True)
        while i < len(self.text) and self.text[i] not in ",]}\n#":
            i += 1
        return i

    def container(self, i: int, close: str, path: KeyPath, inline_table: bool) -> int:
        index = 0
        while i < len(self.text):
            i = self.skip_space(i, newlines=True)
            if i >= len(self.text):
                return i
            if self.text[i] == close:
                return i + 1
            if self.text[i] == ",":
                i += 1
                continue
            if inline_table:
                start = i
                parts, i = _read_key(self.text, i)
                if not parts:
                    return i
                self.record((*path, *parts), start)
                i = self.skip_space(i, newlines=False)
                if i < len(self.text) and self.text[i] == "=":
                    i = self.skip_space(i + 1, newlines=False)
                    i = self.value(i, (*path, *parts))
            else:
                self.record((*path, str(index)), i)
                i = self.value(i, (*path, str(index)))
                index += 1
        return i

    def scan(self) -> dict[KeyPath, Position]:
        table: KeyPath = ()
        i = 0
        while i < len(self.text):
            i = self.skip_space(i, newlines=True)
            if i >= len(self.text):
                break
            start = i
            if self.text[i] == "[":
                array = self.text.startswith("[[", i)
                parts, i = _read_key(self.text, i + (2 if array else 1))
                table = tuple(parts)
                self.record(table, start)
                i = self.text.find("\n", i)
                i = len(self.text) if i < 0 else i
                continue
            parts, i = _read_key(self.text, i)
            if not parts:
                nl = self.text.find("\n", i)
                i = len(self.text) if nl < 0 else nl + 1
                continue
            self.record((*table, *parts), start)
            i = self.skip_space(i, newlines=False)
            if i < len(self.text) and self.text[i] == "=":
                i = self.skip_space(i + 1, newlines=False)
                i = self.value(i, (*table, *parts))
        return self.positions


def key_positions(text: str) -> dict[KeyPath, Position]:
    """Map every key path (tables, keys, array items as '0', '1', ...) to its (line, column)."""
    return _Scanner(text).scan()


def locate(positions: dict[KeyPath, Position], path: KeyPath) -> Position:
    """The position of the longest prefix of `path` that the document spells out."""
    for end in range(len(path), 0, -1):
        if path[:end] in positions:
            return positions[path[:end]]
    return (1, 1)
