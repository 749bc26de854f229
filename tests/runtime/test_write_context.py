"""write_context: `qlc compile -o DIR` replaces its own contexts and nothing else."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from qlc.contract import CONTEXT_MARKER
from qlc.runtime.write_context import OutputRefused, write_context


@dataclass
class Context:
    """What write_context reads of a BuildContext: its files and their hash."""

    files: dict[str, bytes] = field(default_factory=dict)
    content_hash: str = "sha256:" + "1" * 64


NESTED = Context({"Dockerfile": b"FROM x\n", "qlc/trainer/__init__.py": b"", "qlc/x.py": b"1\n"})


def test_nested_files_are_written_and_replaced_as_its_own(tmp_path: Path) -> None:
    target = tmp_path / "ctx"
    write_context(NESTED, target)  # type: ignore[arg-type]
    assert (target / "qlc" / "trainer" / "__init__.py").is_file()
    assert (target / CONTEXT_MARKER).read_text() == NESTED.content_hash + "\n"
    changed = Context({**NESTED.files, "qlc/x.py": b"2\n"})
    write_context(changed, target)  # type: ignore[arg-type]
    assert (target / "qlc" / "x.py").read_bytes() == b"2\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ctx"], "an aside folder was left"


def test_a_file_in_a_nested_folder_of_its_own_is_foreign(tmp_path: Path) -> None:
    target = tmp_path / "ctx"
    write_context(NESTED, target)  # type: ignore[arg-type]
    (target / "qlc" / "trainer" / "notes.txt").write_text("mine\n")
    with pytest.raises(OutputRefused, match=r"holds files qlc did not write \(qlc/trainer/notes"):
        write_context(NESTED, target)  # type: ignore[arg-type]
    assert (target / "qlc" / "trainer" / "notes.txt").read_text() == "mine\n"


def test_a_linked_marker_does_not_make_a_folder_qlcs(tmp_path: Path) -> None:
    target = tmp_path / "mine"
    target.mkdir()
    (target / "Dockerfile").write_text("my own\n")
    (tmp_path / "marker").write_text("x\n")
    (target / CONTEXT_MARKER).symlink_to(tmp_path / "marker")
    with pytest.raises(OutputRefused, match="not a build context qlc wrote"):
        write_context(NESTED, target)  # type: ignore[arg-type]
    assert (target / "Dockerfile").read_text() == "my own\n"


def test_an_empty_folder_is_taken(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    write_context(NESTED, tmp_path / "empty")  # type: ignore[arg-type]
    assert (tmp_path / "empty" / "Dockerfile").read_bytes() == b"FROM x\n"
