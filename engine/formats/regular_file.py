"""Open only regular files: a FIFO would block forever, a link to /dev/zero would never end.

Links are followed (a model directory of links into a cache is common), and what they
lead to is checked on the open descriptor itself, so nothing can be swapped in between
the check and the read. FIFOs are opened with O_NONBLOCK, which returns at once even
with no writer, so they are refused instead of waited on.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from ..errors import ConvertError

_KINDS = {
    stat.S_IFDIR: "a directory",
    stat.S_IFIFO: "a FIFO (named pipe)",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
}


def open_regular(path: Path | str) -> int:
    """A read-only descriptor of `path`, refused unless it is (or links to) a regular file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ConvertError(f"{path}: missing") from None
    except OSError as e:
        raise ConvertError(f"{path}: cannot open ({e.strerror})") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = _KINDS.get(stat.S_IFMT(mode), "not a regular file")
            raise ConvertError(f"{path}: is {kind}; only regular files are read (a link must lead to one)")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_regular(path: Path | str, limit: int, what: str) -> bytes:
    """The whole of a small regular file (config.json, an index), refused past `limit` bytes."""
    fd = open_regular(path)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise ConvertError(f"{path}: {size} bytes, larger than the {limit // 1_000_000} MB limit for {what}")
        chunks, total = [], 0
        while total <= limit:  # never more than the limit, even if the file grows meanwhile
            chunk = os.read(fd, min(1 << 20, limit + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > limit:
            raise ConvertError(f"{path}: larger than the {limit // 1_000_000} MB limit for {what}")
        return b"".join(chunks)
    except OSError as e:
        raise ConvertError(f"{path}: cannot read ({e.strerror})") from None
    finally:
        os.close(fd)
