"""Write a build context where the person said (`qlc compile SPEC -o DIR`), replacing only a
context qlc wrote there before.

An existing directory is replaced when it is empty, or when it holds the context marker and
nothing qlc would not write there; anything else is refused and nothing in it is touched. The
new context is written into a sibling temporary directory and renamed into place; the old one
is moved aside and removed file by file (never as a whole tree). A place that cannot be
written (under a file, in /proc, a name too long, read-only) is refused with the path and the
fix, like a taken one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from qlc.contract import CONTEXT_MARKER
from qlc.userio import clip, output_problem

if TYPE_CHECKING:
    from qlc.compiler.context import BuildContext


class OutputRefused(Exception):
    """-o names a place qlc may not or cannot write; the message says why and what to do."""


def write_context(context: BuildContext, directory: Path) -> None:
    """Write the context's files and the marker into `directory` (see the module's rules);
    OutputRefused when the place is taken or cannot be written."""
    try:
        target = directory.resolve()
        if os.path.lexists(target):
            check_replaceable(target, directory, context)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".qlc-", dir=target.parent))
    except OSError as error:
        raise OutputRefused(output_problem(directory, error)) from None
    try:
        for name, data in context.files.items():
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            (staging / name).write_bytes(data)
        (staging / CONTEXT_MARKER).write_text(context.content_hash + "\n")
        replace_dir(staging, target)
    except OSError as error:
        shutil.rmtree(staging, ignore_errors=True)
        raise OutputRefused(output_problem(directory, error)) from None


def check_replaceable(target: Path, given: Path, context: BuildContext) -> None:
    """Refuse a directory qlc may not replace: a file, a folder without the context marker,
    or a context folder holding anything qlc did not write there."""
    where = f"-o {clip(str(given), 200)}"
    if not target.is_dir():
        raise OutputRefused(f"{where}: is a file, not a directory: give -o a new directory")
    if next(target.iterdir(), None) is None:
        return
    marker = target / CONTEXT_MARKER
    if marker.is_symlink() or not marker.is_file():  # looked at before walking a big folder
        raise OutputRefused(
            f"{where}: not empty, and not a build context qlc wrote (no {CONTEXT_MARKER} "
            "in it): qlc replaces only its own contexts; give -o a new or empty directory"
        )
    names = [*context.files, CONTEXT_MARKER]
    ours = {name: "file" for name in names} | {
        parent.as_posix(): "dir" for name in names for parent in Path(name).parents[:-1]
    }
    present = tree_entries(target)
    foreign = sorted(name for name, kind in present.items() if ours.get(name) != kind)
    if foreign:
        shown = ", ".join(clip(name) for name in foreign[:3])
        more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
        raise OutputRefused(
            f"{where}: holds files qlc did not write ({shown}{more}): move them "
            "away, or give -o another directory"
        )


def tree_entries(root: Path) -> dict[str, str]:
    """{relative path: "file" | "dir" | "other"} of everything under root; links not followed."""
    found: dict[str, str] = {}
    pending = [root]
    while pending:
        with os.scandir(pending.pop()) as entries:
            for entry in entries:
                name = Path(entry.path).relative_to(root).as_posix()
                if entry.is_dir(follow_symlinks=False):
                    found[name] = "dir"
                    pending.append(Path(entry.path))
                else:
                    found[name] = "file" if entry.is_file(follow_symlinks=False) else "other"
    return found


def replace_dir(staging: Path, target: Path) -> None:
    """Put staging where target is; the old target (already checked to hold only qlc's
    files) is moved aside first and removed file by file, never as a whole tree."""
    if not os.path.lexists(target):
        os.replace(staging, target)
        return
    aside = Path(tempfile.mkdtemp(prefix=".qlc-old-", dir=target.parent))
    os.replace(target, aside)
    try:
        os.replace(staging, target)
    except OSError:
        os.replace(aside, target)
        raise
    for name, kind in sorted(tree_entries(aside).items(), reverse=True):
        with contextlib.suppress(OSError):  # something new in it stays, in the aside folder
            if kind == "dir":
                (aside / name).rmdir()
            else:
                (aside / name).unlink()
    with contextlib.suppress(OSError):
        aside.rmdir()
