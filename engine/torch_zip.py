"""Write a `torch.save`-compatible checkpoint one tensor at a time.

torch's checkpoint is a zip of stored (uncompressed) records: `<archive>/data/<key>` per
storage, `<archive>/data.pkl` (the pickled object, referring to storages by key) and a
few small records. We write each tensor's bytes as its own record the moment it is
ready, so memory holds one tensor, not the file, and pickle the object last. Records
are 64-byte aligned like torch's own (so `torch.load(..., mmap=True)` works), zip64 is
used past 4 GiB, and each record's CRC32 is computed on a second thread while the main
thread writes the same bytes (both release the GIL), so checksumming costs no wall time.

A record can also be given as byte ranges of other files (`add_spans`): those bytes are
moved with `copy_file_range`, inside the kernel, as `cp` does; no user-space copy.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

ALIGN = 64
ZIP32_LIMIT = 0xFFFFFFFF  # sizes and offsets from here on need zip64 fields (tests lower it)
_MARK = 0xFFFFFFFF  # "see the zip64 extra field"
_CHUNK = 64 << 20


class TensorRef:
    """Stands for a written tensor inside the object given to `finish`."""

    __slots__ = ("dtype", "key", "numel", "shape", "stride")

    def __init__(self, key: str, dtype: torch.dtype, shape: tuple[int, ...], numel: int) -> None:
        self.key, self.dtype, self.shape, self.numel = key, dtype, shape, numel
        stride, acc = [], 1
        for s in reversed(shape):
            stride.append(acc)
            acc *= max(s, 1)
        self.stride = tuple(reversed(stride))

    def __reduce__(self) -> tuple[Any, ...]:
        # exactly what torch.Tensor.__reduce_ex__ gives for a plain contiguous CPU tensor
        return (
            torch._utils._rebuild_tensor_v2,
            (_StorageRef(self), 0, self.shape, self.stride, False, collections.OrderedDict()),
        )


class _StorageRef:
    __slots__ = ("ref",)

    def __init__(self, ref: TensorRef) -> None:
        self.ref = ref


def _storage_class(dtype: torch.dtype) -> type:
    return getattr(torch, torch.storage._dtype_to_storage_type_map()[dtype])


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj: object) -> object:
        if isinstance(obj, _StorageRef):
            r = obj.ref
            return ("storage", _storage_class(r.dtype), r.key, "cpu", r.numel)
        return None


def _crc(view: memoryview) -> int:
    crc = 0
    for i in range(0, len(view), _CHUNK):
        crc = zlib.crc32(view[i : i + _CHUNK], crc)
    return crc


Span = tuple[int, int, int]  # (open file descriptor, offset, length)


def _pread_exact(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise OSError(f"unexpected end of file (fd {fd}) at offset {offset + done}")
        done += n


def _crc_spans(spans: list[Span]) -> int:
    crc, buf = 0, memoryview(bytearray(min(_CHUNK, max((n for _, _, n in spans), default=0))))
    for fd, offset, n in spans:
        for i in range(0, n, len(buf)):
            part = buf[: min(len(buf), n - i)]
            _pread_exact(fd, part, offset + i)
            crc = zlib.crc32(part, crc)
    return crc


class StreamingCheckpointWriter:
    """`add_tensor` for each tensor as it is produced, then `finish(obj)` once."""

    def __init__(self, path: str | os.PathLike[str], archive_name: str = "model_optim_rng") -> None:
        self.path = Path(path)
        self.prefix = archive_name + "/"
        self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self._pos = 0
        self._entries: list[tuple[str, int, int, int]] = []  # name, header offset, size, crc
        self._next_key = 0
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="crc32")
        self.bytes_written = 0

    # -- raw output ----------------------------------------------------------------------
    def _write(self, data: memoryview | bytes) -> None:
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            done += os.write(self._fd, view[done:])
        self._pos += len(view)

    def _copy(self, spans: list[Span]) -> None:
        for src, offset, n in spans:
            done = 0
            while done < n:
                try:
                    k = os.copy_file_range(src, self._fd, n - done, offset + done)
                except OSError:  # e.g. a filesystem pair the kernel cannot copy between
                    k = 0
                if k <= 0:
                    buf = memoryview(bytearray(min(_CHUNK, n - done)))
                    _pread_exact(src, buf, offset + done)
                    os.write(self._fd, buf)  # lseek position advances like copy_file_range's
                    k = len(buf)
                done += k
            self._pos += n

    # -- zip records -------------------------------------------------------------------
    def _begin(self, name: str, size: int) -> tuple[int, str]:
        """Write a local header with a CRC to be patched; return its offset."""
        full = (self.prefix + name).encode()
        offset = self._pos
        zip64 = size >= ZIP32_LIMIT
        z64 = struct.pack("<HHQQ", 1, 16, size, size) if zip64 else b""
        pad = -(offset + 30 + len(full) + len(z64) + 4) % ALIGN
        extra = z64 + struct.pack("<HH", 0x4246, pad) + b"Z" * pad
        self._write(self._local_header(full, extra, 0, size, zip64))
        return offset, self.prefix + name

    def _end(self, offset: int, name: str, size: int, crc: int) -> None:
        os.pwrite(self._fd, struct.pack("<I", crc), offset + 14)
        self._entries.append((name, offset, size, crc))

    def _record(self, name: str, data: memoryview | bytes) -> None:
        view = memoryview(data).cast("B")
        offset, full = self._begin(name, len(view))
        crc_job = self._pool.submit(_crc, view) if len(view) > _CHUNK else None
        self._write(view)
        self._end(offset, full, len(view), crc_job.result() if crc_job else zlib.crc32(view))

    @staticmethod
    def _local_header(name: bytes, extra: bytes, crc: int, size: int, zip64: bool) -> bytes:
        s32 = _MARK if zip64 else size
        head = struct.pack(
            "<IHHHHHIIIHH", 0x04034B50, 45 if zip64 else 20, 0, 0, 0, 0x21, crc, s32, s32, len(name), len(extra)
        )
        return head + name + extra

    def _central_directory(self) -> None:
        cd_start = self._pos
        for name, offset, size, crc in self._entries:
            full = name.encode()
            big_size, big_offset = size >= ZIP32_LIMIT, offset >= ZIP32_LIMIT
            # zip64 extra: uncompressed size, compressed size, offset; only those marked in the header
            z64_fields = [size, size] if big_size else []
            if big_offset:
                z64_fields.append(offset)
            extra = struct.pack(f"<HH{len(z64_fields)}Q", 1, 8 * len(z64_fields), *z64_fields) if z64_fields else b""
            s32 = _MARK if big_size else size
            o32 = _MARK if big_offset else offset
            version = 45 if z64_fields else 20
            self._write(
                struct.pack(
                    "<IHHHHHHIIIHHHHHII",
                    0x02014B50,
                    version,
                    version,
                    0,
                    0,
                    0,
                    0x21,
                    crc,
                    s32,
                    s32,
                    len(full),
                    len(extra),
                    0,
                    0,
                    0,
                    0,
                    o32,
                )
                + full
                + extra
            )
        cd_end = self._pos
        count, cd_size = len(self._entries), cd_end - cd_start
        if count >= 0xFFFF or cd_start >= ZIP32_LIMIT or cd_size >= ZIP32_LIMIT:
            self._write(struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, count, count, cd_size, cd_start))
            self._write(struct.pack("<IIQI", 0x07064B50, 0, cd_end, 1))
            count16, size32, start32 = 0xFFFF, _MARK, _MARK
        else:
            count16, size32, start32 = count, cd_size, cd_start
        self._write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, count16, count16, size32, start32, 0))

    # -- public API ----------------------------------------------------------------------
    def add_tensor(self, tensor: torch.Tensor) -> TensorRef:
        """Write the tensor's bytes now, as a storage of its own."""
        t = tensor.detach().cpu().contiguous()
        key = str(self._next_key)
        self._next_key += 1
        flat = t.reshape(-1)
        data = flat.view(torch.uint8).numpy() if flat.numel() else b""
        self._record(f"data/{key}", memoryview(data))
        self.bytes_written += t.numel() * t.element_size()
        return TensorRef(key, t.dtype, tuple(t.shape), t.numel())

    def add_spans(self, spans: list[Span], dtype: torch.dtype, shape: tuple[int, ...]) -> TensorRef:
        """A tensor whose bytes are these ranges of other files, concatenated."""
        size = sum(n for _, _, n in spans)
        numel = 1
        for d in shape:
            numel *= d
        if size != numel * torch.empty((), dtype=dtype).element_size():
            raise ValueError(f"spans hold {size} bytes, not a {dtype} tensor of shape {list(shape)}")
        key = str(self._next_key)
        self._next_key += 1
        offset, full = self._begin(f"data/{key}", size)
        crc_job = self._pool.submit(_crc_spans, spans)
        self._copy(spans)
        self._end(offset, full, size, crc_job.result())
        self.bytes_written += size
        return TensorRef(key, dtype, tuple(shape), numel)

    def finish(self, obj: object, *, fsync: bool = True) -> None:
        """Pickle `obj` (TensorRefs standing for tensors) and close the archive.

        `fsync=False` leaves flushing to the caller (who may sync many files at once).
        """
        buf = io.BytesIO()
        _Pickler(buf, protocol=2).dump(obj)
        self._record("data.pkl", buf.getvalue())
        self._record(".format_version", b"1")
        self._record(".storage_alignment", str(ALIGN).encode())
        self._record("byteorder", b"little")
        self._record("version", b"3\n")
        self._record(".data/serialization_id", b"0" * 40)
        self._central_directory()
        if fsync:
            os.fsync(self._fd)
        self._close()

    def abort(self) -> None:
        self._close()

    def _close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._pool.shutdown(wait=True)

    def __enter__(self) -> StreamingCheckpointWriter:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is not None:
            self.abort()
