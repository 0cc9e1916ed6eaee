"""OutFile: exact bytes whatever path they take, and write-back requested for every byte once."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest

from engine.errors import ConvertError
from engine.run import out_file
from engine.run.out_file import OutFile


@pytest.fixture
def writebacks(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """Record the requested (offset, length) ranges with a small STEP."""
    calls: list[tuple[int, int]] = []
    monkeypatch.setattr(out_file, "STEP", 100)
    monkeypatch.setattr(out_file, "start_writeback", lambda fd, off, n: calls.append((off, n)))
    return calls


def _source(tmp_path: Path, n: int) -> tuple[int, bytes]:
    data = os.urandom(n)
    (tmp_path / "src").write_bytes(data)
    return os.open(tmp_path / "src", os.O_RDONLY), data


def test_writes_and_copies_exact_bytes_with_contiguous_writeback(
    tmp_path: Path, writebacks: list[tuple[int, int]]
) -> None:
    src, data = _source(tmp_path, 1000)
    fd = os.open(tmp_path / "out", os.O_WRONLY | os.O_CREAT)
    try:
        os.write(fd, b"xx")  # a shared file (DCP) is appended from its current position
        out = OutFile(fd)
        head = os.urandom(250)
        assert out.write(head) == 250
        assert out.copy([(src, 10, 333), (src, 900, 100)]) == 433
        out.write(b"tail")
        out.flush_started()
    finally:
        os.close(fd)
        os.close(src)
    assert (tmp_path / "out").read_bytes() == b"xx" + head + data[10:343] + data[900:] + b"tail"
    # every written byte is requested exactly once, in order, in steps of at least STEP
    assert writebacks[0][0] == 2
    assert all(a + n == b for (a, n), (b, _) in itertools.pairwise(writebacks))
    assert sum(n for _, n in writebacks) == 250 + 433 + 4
    assert all(n >= 100 for _, n in writebacks[:-1])


def test_copy_falls_back_to_read_and_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, writebacks: list[tuple[int, int]]
) -> None:
    def cannot(*_: object) -> int:
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(out_file, "_copy_file_range", cannot)
    src, data = _source(tmp_path, 777)
    fd = os.open(tmp_path / "out", os.O_WRONLY | os.O_CREAT)
    try:
        OutFile(fd).copy([(src, 0, 777)])
    finally:
        os.close(fd)
        os.close(src)
    assert (tmp_path / "out").read_bytes() == data
    assert sum(n for _, n in writebacks) == 700  # the last 77 bytes wait for flush_started / fsync


def test_truncated_source_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(out_file, "_copy_file_range", None)  # as where the call does not exist
    src, _ = _source(tmp_path, 50)
    fd = os.open(tmp_path / "out", os.O_WRONLY | os.O_CREAT)
    try:
        with pytest.raises(ConvertError, match=r"src: unexpected end of file at byte 50"):
            OutFile(fd).copy([(src, 0, 80)])
    finally:
        os.close(fd)
        os.close(src)


def test_writeback_request_is_harmless_on_any_file(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT)
    try:
        os.write(fd, b"abc")
        out_file.start_writeback(fd, 0, 3)  # the real call (Linux), or nothing elsewhere
        out_file.start_writeback(fd, 0, 0)
    finally:
        os.close(fd)
    assert (tmp_path / "f").read_bytes() == b"abc"
