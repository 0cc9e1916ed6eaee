"""Every byte read from a rank file is checked against its zip record's CRC-32 first.

A torch checkpoint stores each storage as a zip record with a CRC-32 in the central
directory. A flipped bit on disk or in a copy would otherwise go straight into the
output. The check is made once per record, on its first use (so the bytes are then hot in
the page cache for the copy that follows), whatever reads it: kernel copies, bands,
mapped rows, verify. Each `Record` is shared by every TensorMeta that lies in it, so all
readers of one plan, on any thread, see one check.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

from isal.isal_zlib import crc32  # zlib's CRC-32, several times faster (SIMD)

from ..errors import ConvertError
from ..run.out_file import pread_exact

_CHUNK = 1 << 20  # read and summed a piece at a time: stays in cache, and memory stays flat


def crc_of(fd: int, start: int, size: int) -> int:
    """CRC-32 of a file range, read with pread (a file cut short is an error, not a SIGBUS as under mmap)."""
    buf = memoryview(bytearray(min(size, _CHUNK)))
    crc = 0
    for i in range(0, size, len(buf)):
        part = buf[: min(len(buf), size - i)]
        pread_exact(fd, part, start + i)
        crc = crc32(part, crc)
    return crc


@dataclass(eq=False)
class Record:
    """One stored zip record of a rank file: its data's place and the CRC-32 the archive declares."""

    file: Path
    name: str  # e.g. "model_optim_rng/data/3"
    start: int  # absolute offset of its first data byte
    size: int
    crc: int
    checked: bool = False
    _error: str | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def ensure(self, fd: int) -> None:
        """Raise ConvertError unless the record's bytes (read through `fd`) match its CRC-32; once."""
        if self.checked:
            return
        with self._lock:
            if self._error is None and not self.checked:
                self._judge(crc_of(fd, self.start, self.size))
            if self._error is not None:
                raise ConvertError(self._error)

    def confirm(self, actual: int) -> None:
        """The CRC-32 of the whole record, summed by whoever copied it (a torch zip writer sums what it
        copies anyway): the same check as `ensure`, without reading the bytes a second time."""
        with self._lock:
            if self._error is None and not self.checked:
                self._judge(actual)
            if self._error is not None:
                raise ConvertError(self._error)

    def _judge(self, actual: int) -> None:
        if actual == self.crc:
            self.checked = True
        else:
            self._error = (
                f"{self.file}: record {self.name} is damaged: its {self.size} bytes have CRC-32 "
                f"{actual:08x}, the archive says {self.crc:08x}; the file changed after it was "
                "written (copy it again from a good source)"
            )


def read_back_problem(path: Path) -> str | None:
    """Read a rank file just written back from the disk: each zip record's data against the CRC-32 its
    central directory declares (None when all agree). A part of a split job does this before it moves a
    file among the finished ones, so what the last part finds there has been read back whole once."""
    import struct
    import zipfile

    with zipfile.ZipFile(path) as z:
        infos = z.infolist()
    fd = os.open(path, os.O_RDONLY)
    try:
        for info in infos:
            head = bytearray(30)
            pread_exact(fd, memoryview(head), info.header_offset)
            name_len, extra_len = struct.unpack("<HH", head[26:30])
            start = info.header_offset + 30 + name_len + extra_len
            if info.compress_type != zipfile.ZIP_STORED:
                return f"record {info.filename} is compressed; torch writes stored records"
            got = crc_of(fd, start, info.file_size)
            if got != info.CRC:
                return f"record {info.filename} reads back with CRC-32 {got:08x}, its directory says {info.CRC:08x}"
    finally:
        os.close(fd)
    return None
