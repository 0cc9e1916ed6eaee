"""Write a `torch.save`-compatible checkpoint one tensor at a time.

torch's checkpoint is a zip of stored (uncompressed) records: `<archive>/data/<key>` per
storage, `<archive>/data.pkl` (the pickled object, referring to storages by key) and a
few small records. We write each tensor's bytes as its own record as they are produced
(whole, in chunks, or copied from other files), so memory never holds the file, and
pickle the object last.

- Records are 64-byte aligned like torch's own, so `torch.load(..., mmap=True)` works;
  zip64 fields are used past 4 GiB.
- A record given as byte ranges of other files (`add_spans`) is moved with
  `copy_file_range`, inside the kernel, as `cp` does; `OutFile` sends each 32 MB to
  disk as soon as it is written.
- Each record's CRC32 is computed on a second thread while the main thread writes the
  same bytes (both release the GIL), and is stored in a data descriptor after the data
  (zip flag bit 3), so the file is written strictly front to back: no seeking back to
  patch headers whose pages writeback may already have flushed.
- torch itself is not imported: the pickle names torch's rebuild function and storage
  classes by their global names, exactly as `torch.save` does.
"""

from __future__ import annotations

import collections
import io
import mmap
import os
import pickle
import struct
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from isal.isal_zlib import crc32  # zlib's CRC-32, ~6x faster than the stdlib's here (SIMD)

from ..run.out_file import OutFile, Span, pread_exact

ALIGN = 64
ZIP32_LIMIT = 0xFFFFFFFF  # sizes and offsets from here on need zip64 fields (tests lower it)
_MARK = 0xFFFFFFFF  # "see the zip64 extra field"
_CHUNK = 16 << 20  # CRC pieces; of source files, mapped (and resident) only while summed
_CRC_CHUNK = 4 << 20  # small enough that the bytes just read are still in cache for the CRC
_DESCRIPTOR = 0x08  # general purpose flag bit 3: CRC and sizes follow the data

# torch dtype name -> (storage class name in the `torch` module, bytes per element)
STORAGES: dict[str, tuple[str, int]] = {
    "float64": ("DoubleStorage", 8),
    "float32": ("FloatStorage", 4),
    "float16": ("HalfStorage", 2),
    "bfloat16": ("BFloat16Storage", 2),
    "int64": ("LongStorage", 8),
    "int32": ("IntStorage", 4),
    "int16": ("ShortStorage", 2),
    "int8": ("CharStorage", 1),
    "uint8": ("ByteStorage", 1),
    "bool": ("BoolStorage", 1),
}


def dtype_name(dtype: object) -> str:
    """'bfloat16' for torch.bfloat16 or 'bfloat16'."""
    return str(dtype).removeprefix("torch.")


class _Global:
    """A global (module, name) pickled by name, without importing its module."""

    __slots__ = ("module", "name")

    def __init__(self, module: str, name: str) -> None:
        self.module, self.name = module, name

    def __call__(self, *args: object) -> None:  # pickle's save_reduce insists on a callable
        raise TypeError(f"{self.module}.{self.name} is only a name to pickle")


def torch_global(name: str) -> _Global:
    """`torch.<name>` (a dtype such as torch.bfloat16, as in Megatron's args.params_dtype), pickled by name."""
    return _Global("torch", name)


_REBUILD = _Global("torch._utils", "_rebuild_tensor_v2")
_ORDERED_DICT = collections.OrderedDict


class TensorRef:
    """Stands for a written tensor inside the object given to `finish`."""

    __slots__ = ("dtype", "key", "numel", "shape", "stride")

    def __init__(self, key: str, dtype: str, shape: tuple[int, ...]) -> None:
        self.key, self.dtype, self.shape = key, dtype, tuple(shape)
        self.numel = 1
        for s in shape:
            self.numel *= s
        stride, acc = [], 1
        for s in reversed(self.shape):
            stride.append(acc)
            acc *= max(s, 1)
        self.stride = tuple(reversed(stride))

    def __reduce__(self) -> tuple[Any, ...]:
        # what torch.Tensor.__reduce_ex__ gives for a plain contiguous CPU tensor
        return (_REBUILD, (_StorageRef(self), 0, self.shape, self.stride, False, _ORDERED_DICT()))


class _StorageRef:
    __slots__ = ("ref",)

    def __init__(self, ref: TensorRef) -> None:
        self.ref = ref


class _Pickler(pickle._Pickler):  # the pure-Python pickler: its dispatch table takes our _Global
    dispatch = dict(pickle._Pickler.dispatch)

    def save_by_name(self, obj: _Global) -> None:
        self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
        self.memoize(obj)

    dispatch[_Global] = save_by_name

    def persistent_id(self, obj: object) -> object:
        if isinstance(obj, _StorageRef):
            r = obj.ref
            return ("storage", _storage_global(r.dtype), r.key, "cpu", r.numel)
        return None


_STORAGE_GLOBALS: dict[str, _Global] = {}


def _storage_global(dtype: str) -> _Global:
    g = _STORAGE_GLOBALS.get(dtype)
    if g is None:
        g = _STORAGE_GLOBALS[dtype] = _Global("torch", STORAGES[dtype][0])
    return g


def pickle_checkpoint(obj: object) -> bytes:
    buf = io.BytesIO()
    _Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def _crc(view: memoryview, crc: int = 0) -> int:
    for i in range(0, len(view), _CHUNK):
        crc = crc32(view[i : i + _CHUNK], crc)
    return crc


def _crc_spans(spans: list[Span]) -> int:
    """CRC of file ranges, read through short-lived mappings of the page cache (no copy)."""
    try:
        return _crc_spans_mapped(spans)
    except (ValueError, OSError):  # a file that cannot be mapped: read it instead
        return _crc_spans_read(spans)


def _crc_spans_mapped(spans: list[Span]) -> int:
    crc = 0
    for fd, offset, n in spans:
        pos, end = offset, offset + n
        while pos < end:
            base = pos - pos % mmap.ALLOCATIONGRANULARITY
            length = min(end, base + _CHUNK) - base
            mm = mmap.mmap(fd, length, prot=mmap.PROT_READ, offset=base)
            try:
                with memoryview(mm) as whole, whole[pos - base : length] as view:
                    crc = crc32(view, crc)
            finally:
                mm.close()
            pos = base + length
    return crc


def _crc_spans_read(spans: list[Span]) -> int:
    crc, buf = 0, memoryview(bytearray(_CRC_CHUNK))
    for fd, offset, n in spans:
        for i in range(0, n, len(buf)):
            part = buf[: min(len(buf), n - i)]
            pread_exact(fd, part, offset + i)
            crc = crc32(part, crc)
    return crc


class StreamingCheckpointWriter:
    """`add_tensor` / `add_bytes` / `add_spans` for each tensor as it is produced, then `finish(obj)`."""

    def __init__(
        self, path: str | os.PathLike[str], archive_name: str = "model_optim_rng", *, fd: int | None = None
    ) -> None:
        """With `fd`, the archive is appended at that descriptor's position and the descriptor
        stays open (DCP packs one archive per tensor into a shared file)."""
        self.path = Path(path)
        self.prefix = archive_name + "/"
        self._owns_fd = fd is None
        self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644) if fd is None else fd
        self._out = OutFile(self._fd)
        self._start = self._out.pos  # offsets inside the archive count from its first byte
        self._entries: list[tuple[bytes, int, int, int, int]] = []  # name, offset, size, crc, flags
        self._next_key = 0
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="crc32")
        self.bytes_written = 0
        self.last_crc = 0  # the CRC-32 of the last storage record written

    # -- raw output ----------------------------------------------------------------------
    @property
    def _pos(self) -> int:
        return self._out.pos - self._start

    def _write(self, data: memoryview | bytes) -> None:
        self._out.write(data)

    def _copy(self, spans: list[Span]) -> None:
        self._out.copy(spans)

    # -- zip records -----------------------------------------------------------------------
    def _header(self, name: str, size: int, crc: int | None) -> tuple[bytes, int, int]:
        """Write a local header; crc None means it follows in a data descriptor."""
        full = (self.prefix + name).encode()
        offset = self._pos
        zip64 = size >= ZIP32_LIMIT
        flags = _DESCRIPTOR if crc is None else 0
        shown = 0 if crc is None else size  # with a descriptor, the header's CRC and sizes are zero
        z64 = struct.pack("<HHQQ", 1, 16, shown, shown) if zip64 else b""
        pad = -(offset + 30 + len(full) + len(z64) + 4) % ALIGN
        extra = z64 + struct.pack("<HH", 0x4246, pad) + b"Z" * pad
        s32 = _MARK if zip64 else shown
        version = 45 if zip64 else 20
        head = struct.pack(
            "<IHHHHHIIIHH", 0x04034B50, version, flags, 0, 0, 0x21, crc or 0, s32, s32, len(full), len(extra)
        )
        self._write(head + full + extra)
        return full, offset, flags

    def _record(self, name: str, data: memoryview | bytes) -> None:
        """A small in-memory record: CRC first, no descriptor."""
        view = memoryview(data).cast("B")
        crc = crc32(view)
        full, offset, flags = self._header(name, len(view), crc)
        self._write(view)
        self._entries.append((full, offset, len(view), crc, flags))

    def _data_record(self, size: int, write: Callable[[], int]) -> str:
        """A storage record whose bytes `write` appends, returning their CRC."""
        key = str(self._next_key)
        self._next_key += 1
        full, offset, flags = self._header(f"data/{key}", size, None)
        crc = write()
        if size >= ZIP32_LIMIT:
            self._write(struct.pack("<IIQQ", 0x08074B50, crc, size, size))
        else:
            self._write(struct.pack("<IIII", 0x08074B50, crc, size, size))
        self._entries.append((full, offset, size, crc, flags))
        self.bytes_written += size
        self.last_crc = crc
        return key

    def _central_directory(self) -> None:
        cd_start = self._pos
        for full, offset, size, crc, flags in self._entries:
            big_size, big_offset = size >= ZIP32_LIMIT, offset >= ZIP32_LIMIT
            # zip64 extra: uncompressed size, compressed size, offset; only those marked in the header
            z64_fields = [size, size] if big_size else []
            if big_offset:
                z64_fields.append(offset)
            extra = struct.pack(f"<HH{len(z64_fields)}Q", 1, 8 * len(z64_fields), *z64_fields) if z64_fields else b""
            s32 = _MARK if big_size else size
            o32 = _MARK if big_offset else offset
            version = 45 if z64_fields else 20
            fields = (version, version, flags, 0, 0, 0x21, crc, s32, s32, len(full), len(extra), 0, 0, 0, 0, o32)
            self._write(struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, *fields) + full + extra)
        cd_end = self._pos
        count, cd_size = len(self._entries), cd_end - cd_start
        if count >= 0xFFFF or cd_start >= ZIP32_LIMIT or cd_size >= ZIP32_LIMIT:
            self._write(struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, count, count, cd_size, cd_start))
            self._write(struct.pack("<IIQI", 0x07064B50, 0, cd_end, 1))
            count16, size32, start32 = 0xFFFF, _MARK, _MARK
        else:
            count16, size32, start32 = count, cd_size, cd_start
        self._write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, count16, count16, size32, start32, 0))

    def _write_chunks(self, chunks: Iterable[memoryview | bytes], size: int) -> int:
        """Each chunk written while the CRC thread sums it; a chunk is done with before the next is asked for."""
        crc, done = 0, 0
        for chunk in chunks:
            view = memoryview(chunk).cast("B")
            job = self._pool.submit(_crc, view, crc)
            self._write(view)
            crc = job.result()
            done += len(view)
        if done != size:
            raise ValueError(f"{done} bytes were given for a record of {size}")
        return crc

    def _copy_spans(self, spans: list[Span]) -> int:
        job = self._pool.submit(_crc_spans, spans)
        self._copy(spans)
        return job.result()

    # -- public API ----------------------------------------------------------------------
    def add_bytes(self, data: memoryview | bytes, dtype: object, shape: tuple[int, ...]) -> TensorRef:
        """A tensor given as its raw little-endian bytes (C order)."""
        view = memoryview(data).cast("B")
        return self.add_chunks([view], len(view), dtype, shape)

    def add_chunks(
        self, chunks: Iterable[memoryview | bytes], nbytes: int, dtype: object, shape: tuple[int, ...]
    ) -> TensorRef:
        """A tensor of `nbytes` given as consecutive pieces of its bytes, so it never has to be whole in memory."""
        name = dtype_name(dtype)
        ref = TensorRef("", name, shape)
        if nbytes != ref.numel * STORAGES[name][1]:
            raise ValueError(f"{nbytes} bytes are not a {name} tensor of shape {list(shape)}")
        ref.key = self._data_record(nbytes, lambda: self._write_chunks(chunks, nbytes))
        return ref

    def add_tensor(self, tensor: Any) -> TensorRef:
        """Write a torch tensor's bytes now, as a storage of its own."""
        t = tensor.detach().cpu().contiguous()
        flat = t.reshape(-1)
        data = flat.view(__import__("torch").uint8).numpy() if flat.numel() else b""
        return self.add_bytes(memoryview(data), t.dtype, tuple(t.shape))

    def add_spans(self, spans: list[Span], dtype: object, shape: tuple[int, ...]) -> TensorRef:
        """A tensor whose bytes are these ranges of other files, concatenated."""
        name = dtype_name(dtype)
        size = sum(n for _, _, n in spans)
        ref = TensorRef("", name, shape)
        if size != ref.numel * STORAGES[name][1]:
            raise ValueError(f"spans hold {size} bytes, not a {name} tensor of shape {list(shape)}")
        ref.key = self._data_record(size, lambda: self._copy_spans(spans))
        return ref

    def finish(self, obj: object, *, fsync: bool = True) -> None:
        """Pickle `obj` (TensorRefs standing for tensors) and close the archive.

        `fsync=False` leaves flushing to the caller (who may sync many files at once).
        """
        self._record("data.pkl", pickle_checkpoint(obj))
        self._record(".format_version", b"1")
        self._record(".storage_alignment", str(ALIGN).encode())
        self._record("byteorder", b"little")
        self._record("version", b"3\n")
        self._record(".data/serialization_id", b"0" * 40)
        self._central_directory()
        self._out.flush_started()
        if fsync and self._owns_fd:
            os.fsync(self._fd)
        self._close()

    def abort(self) -> None:
        self._close()

    def _close(self) -> None:
        if self._fd is not None:
            if self._owns_fd:
                os.close(self._fd)
            self._fd = None
        self._pool.shutdown(wait=True)

    def __enter__(self) -> StreamingCheckpointWriter:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is not None:
            self.abort()
