"""The user's side of qlc's input and output: the files a person names, the paths they give for
output, and their own text echoed back in messages.

- `read_user_file`: every file the user names (a spec, a lock, a prompts file, a model config)
  is read here: regular files only (a FIFO would block forever, /dev/zero never ends) and at
  most `limit + 1` bytes, whatever the file claims to hold.
- `output_problem`: an `OSError` from writing where the user pointed, worded with the path
  and the fix (a file in the way, /proc, a name too long, a read-only place).
- `clip` / `clip_words`: a value the user wrote, shortened for a message: its start, an
  ellipsis and its length (a 900 KB key must not become a 900 KB diagnostic).

Standard library only: the compiler uses it too.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from pathlib import Path

CLIP_CHARS = 60  # one echoed value (a key, a name)
CLIP_WORD_CHARS = 240  # one word of a message (a long path stays whole)
CLIP_MESSAGE_CHARS = 1000  # a whole message line
KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)
VIRTUAL = ("proc", "sys")  # where nothing qlc writes can live
WORDS = {  # errno -> what it means for a path the user named
    errno.ENOENT: "no such file or directory",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENAMETOOLONG: "the path is too long (a name over 255 bytes, or over 4096 in all)",
    errno.ENOTDIR: "a part of the path is a file, not a directory",
    errno.ELOOP: "too many levels of symbolic links",
    errno.EROFS: "the file system is read-only",
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "the disk quota is exhausted",
    errno.EISDIR: "it is a directory",
    errno.EEXIST: "something is already in the way",
    errno.EIO: "input/output error: the system could not read it",
}


class UnreadableFile(Exception):
    """A file the user named that qlc will not read; `reason` says why, for a message."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class FileTooLarge(UnreadableFile):
    """A regular file over the limit: `size` bytes (at least; `exact` when the file said so)."""

    def __init__(self, path: Path, size: int, limit: int, exact: bool) -> None:
        shown = f"{size / 1e6:.1f} MB" if size >= 10**6 else f"{size:,} bytes"
        super().__init__(path, f"it is {'' if exact else 'over '}{shown}; at most {limit:,} "
                         "bytes are read")  # fmt: skip
        self.size, self.limit, self.exact = size, limit, exact


def read_user_file(path: Path, limit: int) -> bytes:
    """The bytes of the regular file at `path` (links followed), if it holds at most `limit`.

    Nothing but a regular file is opened: a FIFO, a device or a directory is refused from its
    status, which is checked again on the opened file (the path may have changed between)."""
    try:
        _refuse_irregular(path, os.stat(path).st_mode)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as error:
        raise UnreadableFile(path, os_reason(error)) from None
    except ValueError as error:  # a NUL byte in the path
        raise UnreadableFile(path, str(error)) from None
    try:
        status = os.fstat(fd)
        _refuse_irregular(path, status.st_mode)
        if status.st_size > limit:
            raise FileTooLarge(path, status.st_size, limit, exact=True)
        data = _read_at_most(fd, limit + 1)
    except OSError as error:
        raise UnreadableFile(path, os_reason(error)) from None
    finally:
        os.close(fd)
    if len(data) > limit:  # it grew, or it is a file whose size the system does not know
        raise FileTooLarge(path, len(data), limit, exact=False)
    return data


def read_optional_user_file(path: Path, limit: int) -> bytes | None:
    """Like read_user_file, but None when nothing is at `path` (an optional lock)."""
    try:
        os.lstat(path)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        pass  # read_user_file words it
    return read_user_file(path, limit)


def is_file(path: Path) -> bool:
    """Path.is_file, but False (not an exception) for a path the system cannot even look up,
    such as a name over 255 bytes: what the user named is then simply not a file."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False


def is_dir(path: Path) -> bool:
    """Path.is_dir, False for a path the system cannot look up (see is_file)."""
    try:
        return stat.S_ISDIR(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False


def _refuse_irregular(path: Path, mode: int) -> None:
    if stat.S_ISREG(mode):
        return
    kind = next((name for test, name in KINDS if test(mode)), "not a regular file")
    raise UnreadableFile(path, f"it is {kind}, not a regular file")


def _read_at_most(fd: int, size: int) -> bytes:
    chunks, left = [], size
    while left > 0:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def os_reason(error: OSError) -> str:
    """An OSError's cause in words (the errno's, or the error's own text)."""
    if error.errno is not None and error.errno in WORDS:
        return WORDS[error.errno]
    text = error.strerror or str(error)
    return text[:1].lower() + text[1:]


# ---------------------------------------------------------------------------------------------
# Output paths.


def output_problem(path: Path, error: OSError, option: str = "-o") -> str:
    """Why qlc could not write at `path` (given as `option`), and what to do instead."""
    blocker = _file_in_the_way(path)
    virtual = _virtual_root(path)
    if blocker is not None:
        why = f"{clip(str(blocker), 200)} is a file, not a directory"
    elif virtual is not None:
        why = f"{virtual} is the kernel's virtual file system, not a place for files"
    else:
        why = os_reason(error)
    return (
        f"{option} {clip(str(path), 200)}: cannot write there: {why}; "
        f"choose another path with {option}"
    )


def _file_in_the_way(path: Path) -> Path | None:
    """The first existing part of `path` that is not a directory (a file where a folder
    must go), if any."""
    for part in [*reversed(path.parents), path]:
        try:
            if os.path.lexists(part) and not part.is_dir():
                return part
        except (OSError, ValueError):  # a name too long to look at: not a file in the way
            return None
    return None


def _virtual_root(path: Path) -> str | None:
    absolute = Path(os.path.abspath(path))
    return next((f"/{root}" for root in VIRTUAL if absolute.parts[1:2] == (root,)), None)


# ---------------------------------------------------------------------------------------------
# Echoed text.


def clip(text: str, limit: int = CLIP_CHARS) -> str:
    """`text` when it has at most `limit` characters; else its start, an ellipsis and how
    long it is."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… ({len(text):,} characters)"


LONG_WORD = re.compile(rf"\S{{{CLIP_WORD_CHARS + 1},}}")


def _clip_word(match: re.Match[str]) -> str:
    word = match.group(0)
    end = word[-1] if word[-1] in ":;,.)" else ""  # the sentence's punctuation stays
    return clip(word[: len(word) - len(end)], CLIP_CHARS) + end


def clip_words(text: str, limit: int = CLIP_MESSAGE_CHARS) -> str:
    """A message with every overlong word (a key, a quoted value) clipped, and the whole
    clipped to `limit` characters per line."""
    lines = []
    for line in text.split("\n"):
        line = LONG_WORD.sub(_clip_word, line)
        lines.append(clip(line, limit))
    return "\n".join(lines)
