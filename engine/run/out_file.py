"""An output file written strictly front to back, sent to disk while it is being written.

Left alone, the kernel starts writing dirty pages back only once a large share of memory
is dirty (or after seconds), so a converter that writes gigabytes leaves the disk idle at
first and then waits for one long flush at the end. `OutFile` asks for write-back of
each 32 MB as soon as it is written (`sync_file_range(SYNC_FILE_RANGE_WRITE)`: start, do
not wait), so the disk works from the first megabytes and the final fsync finds little
left. bench/bench_writeback.py, 4.4 GB: 2.27 s median with write-behind, 2.79 s without,
2.83 s for `cp -r` + `sync`.

The bytes themselves are written with `write` or moved inside the kernel with
`copy_file_range`, as `cp` does.
"""

from __future__ import annotations

import ctypes
import os

from ..errors import ConvertError

Span = tuple[int, int, int]  # (open file descriptor, offset, length)

STEP = 32 << 20  # write-back is requested per this many bytes written, and writes are cut to it
_SYNC_FILE_RANGE_WRITE = 2


def _load_sync_file_range():  # Linux only; elsewhere write-back is left to the kernel
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (AttributeError, OSError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_sync_file_range = _load_sync_file_range()
_copy_file_range = getattr(os, "copy_file_range", None)  # Linux; elsewhere bytes go through a buffer


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing this range to disk; a hint, so failures are ignored."""
    if _sync_file_range is not None and length > 0:
        _sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


def pread_exact(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise ConvertError(
                f"{fd_path(fd)}: unexpected end of file at byte {offset + done}; was it truncated or "
                "replaced after the conversion was planned?"
            )
        done += n


def fd_path(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return f"file descriptor {fd}"


class OutFile:
    """Appends to `fd` from its current position, requesting write-back every STEP bytes."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.pos = self._flushed = os.lseek(fd, 0, os.SEEK_CUR)

    def write(self, data: memoryview | bytes) -> int:
        view = memoryview(data).cast("B")
        for i in range(0, len(view), STEP):
            part = view[i : i + STEP]
            done = 0
            while done < len(part):
                done += os.write(self.fd, part[done:])
            self._advance(len(part))
        return len(view)

    def copy(self, spans: list[Span]) -> int:
        """Append file ranges with copy_file_range (inside the kernel, as `cp` does)."""
        total = 0
        for src, offset, n in spans:
            done = 0
            while done < n:
                want = min(STEP, n - done)
                try:
                    k = _copy_file_range(src, self.fd, want, offset + done) if _copy_file_range else 0
                except OSError:  # a filesystem pair the kernel cannot copy between
                    k = 0
                if k <= 0:
                    buf = memoryview(bytearray(want))
                    pread_exact(src, buf, offset + done)
                    self.write(buf)
                else:
                    self._advance(k)
                done += k if k > 0 else want
            total += n
        return total

    def _advance(self, n: int) -> None:
        self.pos += n
        if self.pos - self._flushed >= STEP:
            self.flush_started()

    def flush_started(self) -> None:
        """Start write-back of everything not yet requested (a file's tail, when it is complete)."""
        start_writeback(self.fd, self._flushed, self.pos - self._flushed)
        self._flushed = self.pos
