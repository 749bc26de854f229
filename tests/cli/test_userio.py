"""qlc.userio: reading the files a person names, wording output failures, clipping echoes."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from qlc.userio import (
    FileTooLarge,
    UnreadableFile,
    clip,
    clip_words,
    is_dir,
    is_file,
    output_problem,
    read_optional_user_file,
    read_user_file,
)


def test_a_regular_file_is_read_whole(tmp_path: Path) -> None:
    path = tmp_path / "spec.toml"
    path.write_bytes(b"x" * 100)
    assert read_user_file(path, 100) == b"x" * 100


def test_a_file_over_the_limit_is_refused_by_its_size(tmp_path: Path) -> None:
    path = tmp_path / "big.toml"
    path.write_bytes(b"x" * 101)
    with pytest.raises(FileTooLarge) as caught:
        read_user_file(path, 100)
    assert caught.value.size == 101 and caught.value.exact


def test_a_file_without_a_size_is_read_only_to_the_limit() -> None:
    """/proc files say size 0: at most limit + 1 bytes are read, then it is refused."""
    path = Path("/proc/self/maps")
    assert path.stat().st_size == 0
    with pytest.raises(FileTooLarge) as caught:
        read_user_file(path, 10)
    assert caught.value.size == 11 and not caught.value.exact


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda p: os.mkfifo(p), "named pipe"),
        (lambda p: p.symlink_to("/dev/zero"), "character device"),
        (lambda p: p.mkdir(), "a directory"),
        (lambda p: None, "no such file"),
        (lambda p: p.symlink_to(p), "symbolic links"),
    ],
    ids=["fifo", "dev-zero", "directory", "missing", "link-loop"],
)
def test_what_is_not_a_readable_regular_file_is_refused_at_once(
    make, reason: str, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "input"
    make(path)
    with pytest.raises(UnreadableFile) as caught:
        read_user_file(path, 1 << 20)  # a FIFO would block here if it were opened for reading
    assert reason in caught.value.reason and caught.value.path == path


def test_a_read_that_fails_is_an_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "mem"
    path.symlink_to("/proc/self/mem")  # a regular file whose reads fail, even for root
    with pytest.raises(UnreadableFile, match="input/output error"):
        read_user_file(path, 100)


def test_an_optional_file_may_be_absent_but_not_unusable(tmp_path: Path) -> None:
    assert read_optional_user_file(tmp_path / "absent.lock", 10) is None
    os.mkfifo(tmp_path / "fifo.lock")
    with pytest.raises(UnreadableFile):
        read_optional_user_file(tmp_path / "fifo.lock", 10)


def test_is_file_and_is_dir_say_no_to_a_path_too_long_to_look_up(tmp_path: Path) -> None:
    long = tmp_path / ("n" * 300)
    with pytest.raises(OSError) as caught:
        long.is_file()  # what pathlib does: the reason for these two
    assert caught.value.errno == errno.ENAMETOOLONG
    assert not is_file(long) and not is_dir(long)
    assert is_dir(tmp_path) and not is_file(tmp_path)


def test_clip_keeps_the_start_and_gives_the_length() -> None:
    assert clip("short") == "short"
    assert clip("k" * 900_000) == "k" * 60 + "… (900,000 characters)"


def test_clip_words_clips_long_words_and_keeps_the_sentence() -> None:
    message = f"a spec may not set QLC_{'X' * 1000}: QLC_* variables are qlc's own"
    clipped = clip_words(message)
    assert clipped.endswith("(1,004 characters): QLC_* variables are qlc's own")
    assert clip_words("a/long/path/" * 15) == "a/long/path/" * 15  # 180 characters: whole
    assert len(clip_words(" ".join(["word"] * 10_000))) < 1100


def test_output_problem_names_the_file_in_the_way(tmp_path: Path) -> None:
    (tmp_path / "notes").write_text("x")
    target = tmp_path / "notes" / "sub"
    error = NotADirectoryError(errno.ENOTDIR, "Not a directory", str(target))
    text = output_problem(target, error)
    assert text == (
        f"-o {target}: cannot write there: {tmp_path / 'notes'} is a file, not a directory; "
        "choose another path with -o"
    )


def test_output_problem_in_proc_and_too_long() -> None:
    gone = FileNotFoundError(errno.ENOENT, "No such file or directory")
    assert "/proc is the kernel's virtual file system" in output_problem(Path("/proc/x"), gone)
    long = OSError(errno.ENAMETOOLONG, "File name too long")
    text = output_problem(Path("n" * 300), long)
    assert "the path is too long" in text and "(300 characters)" in text
