"""Read a safetensors header without touching tensor data.

The format is an 8-byte little-endian header length, a JSON header mapping names to
dtype / shape / data_offsets, then raw bytes. The header alone is enough to plan, so it
is checked as strictly as the safetensors library checks it (`Metadata::validate`):
dims and offsets are whole numbers >= 0, each tensor's dtype x shape is its byte range,
and the ranges, in data order, tile the data from its first byte to the file's end with
no gap or overlap; the header is at most 100 MB of UTF-8 JSON. Beyond the library, a
key given twice is refused (it keeps the last), and the header's objects are counted
before it is parsed, so an absurd one is refused in bounded time and memory.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ConvertError, short
from .regular_file import open_regular
from .strict_json import parse_json

if TYPE_CHECKING:
    import numpy as np

    from ..source.hf_source import TensorReader
    from .record_check import Record

# safetensors dtype string -> (torch dtype name, bytes per element)
DTYPES: dict[str, tuple[str, int]] = {
    "F64": ("float64", 8),
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "I64": ("int64", 8),
    "I32": ("int32", 4),
    "I16": ("int16", 2),
    "I8": ("int8", 1),
    "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
    "F8_E4M3": ("float8_e4m3fn", 1),  # DeepSeek-V3's block-quantised weights (engine/source/fp8.py)
}

MAX_HEADER_BYTES = 100_000_000  # the safetensors crate's own limit (MAX_HEADER_SIZE)
# Tensors one file may name. Real shards hold thousands at most; the bound keeps an absurd
# header (a 95 MB one with 1.6 M junk entries) from being parsed at all: it is counted first.
MAX_TENSORS = 1 << 18
_MAX_VALUES = 16 * MAX_TENSORS  # JSON values (bounded by commas): a tensor's entry has about 6


@dataclass(frozen=True, slots=True)
class TensorMeta:
    """Where one tensor's bytes live. `begin` is an absolute file offset.

    `record` is the zip record of a Megatron rank file the bytes lie in (its CRC-32 is
    checked before the first read, engine/formats/record_check.py); None for safetensors.
    """

    name: str
    dtype: str  # torch dtype name, e.g. "bfloat16"
    shape: tuple[int, ...]
    file: Path
    begin: int
    nbytes: int
    record: Record | None = None

    @property
    def itemsize(self) -> int:
        return _itemsize(self.dtype)

    @property
    def numel(self) -> int:
        return _numel(self.shape)


@dataclass(frozen=True, slots=True)
class ViewMeta(TensorMeta):
    """A tensor shown converted from the stored tensor `raw` (dequantised FP8, cast, transposed).

    Planning, splitting and fusing see an ordinary tensor of `dtype` and `shape`; only `fill` knows how
    its bytes are made from `raw`'s, a band at a time, so memory stays bounded whatever the conversion.
    """

    raw: TensorMeta | None = None

    def fill(self, reader: TensorReader, r0: int, r1: int, c0: int, c1: int, dest: np.ndarray) -> None:
        """Rows [r0, r1), columns [c0, c1) of the view into `dest` (uint8, rows x cols x itemsize)."""
        raise NotImplementedError


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _itemsize(dtype: str) -> int:
    for name, size in DTYPES.values():
        if name == dtype:
            return size
    raise KeyError(dtype)


def itemsize(dtype: str) -> int:
    """Bytes per element of a torch dtype name."""
    return _itemsize(dtype)


def _pread(fd: int, n: int, offset: int) -> bytearray:
    """Up to n bytes at offset, in one buffer (a header may be 100 MB: no second copy)."""
    buf = bytearray(n)
    view, done = memoryview(buf), 0
    while done < n:
        k = os.preadv(fd, [view[done:]], offset + done)
        if k <= 0:
            break
        done += k
    view.release()
    del buf[done:]
    return buf


def _load_header(path: Path) -> tuple[dict, int, int]:
    """(header JSON, first data byte, file size)."""
    fd = open_regular(path)
    try:
        size = os.fstat(fd).st_size
        raw_len = _pread(fd, 8, 0)
        if len(raw_len) < 8:
            raise ConvertError(f"{path}: truncated safetensors header (file is {size} bytes)")
        (hlen,) = struct.unpack("<Q", raw_len)
        if hlen > MAX_HEADER_BYTES:
            raise ConvertError(
                f"{path}: safetensors header of {hlen} bytes is larger than the "
                f"{MAX_HEADER_BYTES // 1_000_000} MB limit (the safetensors library's own)"
            )
        if 8 + hlen > size:
            raise ConvertError(f"{path}: truncated safetensors header (header claims {hlen} bytes, file has {size})")
        header_bytes = _pread(fd, hlen, 8)
    except OSError as e:
        raise ConvertError(f"{path}: cannot read ({e.strerror})") from None
    finally:
        os.close(fd)
    if len(header_bytes) < hlen:
        raise ConvertError(f"{path}: truncated safetensors header (the file shrank while it was read)")
    _count_first(path, header_bytes)
    header = parse_json(header_bytes, path, "safetensors header")
    if not isinstance(header, dict):
        raise ConvertError(f"{path}: safetensors header is not a JSON object")
    return header, 8 + hlen, size


def _count_first(path: Path, header: bytes) -> None:
    """Refuse a header that would build millions of objects, before parsing it (a C-speed count)."""
    objects, values = header.count(b"{"), header.count(b",")
    if objects > MAX_TENSORS + 2 or values > _MAX_VALUES:
        raise ConvertError(
            f"{path}: safetensors header of {len(header)} bytes holds about {max(objects, values // 6)} "
            f"entries; a file may name at most {MAX_TENSORS} tensors"
        )


def read_metadata(path: Path) -> dict[str, str] | None:
    """The header's free-form `__metadata__` (e.g. {"format": "pt"}), kept on the way back."""
    return _metadata(path, _load_header(path)[0])


def _metadata(path: Path, header: dict) -> dict[str, str] | None:
    meta = header.get("__metadata__")
    if meta is None:
        return None
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise ConvertError(f"{path}: __metadata__ is {short(meta)}; expected an object of strings to strings")
    return dict(meta)


def _is_count(x: object) -> bool:
    return type(x) is int and x >= 0  # not bool, not 256.7, not "4"


def _entry(path: Path, name: str, info: object) -> tuple[str, tuple[int, ...], int, int]:
    """(safetensors dtype, shape, begin, end) of one header entry, each checked."""
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
        raise ConvertError(
            f"{path}: header entry for tensor {name!r} is {short(info)}; expected an object with "
            "dtype, shape and data_offsets"
        )
    st_dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if st_dtype not in DTYPES:
        raise ConvertError(f"{path}: tensor {name!r} has dtype {st_dtype}; supported: {', '.join(DTYPES)}")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise ConvertError(f"{path}: tensor {name!r} has shape {short(shape)}; dims are whole numbers >= 0")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(x) for x in offsets)) or (
        offsets[0] > offsets[1]
    ):
        raise ConvertError(
            f"{path}: tensor {name!r} has data_offsets {short(offsets)}; expected [begin, end], "
            "whole numbers with 0 <= begin <= end"
        )
    begin, end = offsets
    want = _numel(tuple(shape)) * DTYPES[st_dtype][1]
    if end - begin != want:
        raise ConvertError(
            f"{path}: tensor {name!r} is {st_dtype} {shape}, {want} bytes, but its data_offsets "
            f"[{begin}, {end}] hold {end - begin}"
        )
    return st_dtype, tuple(shape), begin, end


def _check_tiling(path: Path, spans: list[tuple[int, int, str]], data_len: int) -> None:
    """The tensors' byte ranges, in data order, cover the data exactly: no gap, no overlap, nothing after.

    The safetensors library refuses anything else (Metadata::validate): the ranges sorted by
    offset must each start where the previous ended, and the last must end at the file's end.
    """
    at, prev = 0, None
    for begin, end, name in sorted(spans):
        if begin != at:
            what = f"after tensor {prev!r}" if prev is not None else "at the start of the data"
            if begin > at:
                problem = f"leaves bytes {at}..{begin} {what} to no tensor"
            else:
                problem = f"overlaps the bytes {begin}..{at} of tensor {prev!r}"
            raise ConvertError(
                f"{path}: tensor {name!r} data_offsets [{begin}, {end}] {problem}; the offsets must cover "
                "the data in order, with no gaps or overlaps"
            )
        at, prev = end, name
    if at != data_len:
        if at > data_len:
            raise ConvertError(
                f"{path}: tensor {prev!r} ends at data byte {at} but the file holds {data_len} bytes of data "
                "(truncated file?)"
            )
        raise ConvertError(
            f"{path}: {data_len - at} bytes after the last tensor belong to no tensor; the offsets must "
            "cover the data to the end of the file"
        )


def read_header(path: Path) -> dict[str, TensorMeta]:
    """Parse one file's header; raise ConvertError on anything malformed."""
    header, data_start, size = _load_header(path)
    _metadata(path, header)
    out: dict[str, TensorMeta] = {}
    spans: list[tuple[int, int, str]] = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        st_dtype, shape, begin, end = _entry(path, name, info)
        spans.append((begin, end, name))
        out[name] = TensorMeta(name, DTYPES[st_dtype][0], shape, path, data_start + begin, end - begin)
    _check_tiling(path, spans, size - data_start)
    return out


ST_DTYPES = {torch_name: st for st, (torch_name, _) in DTYPES.items()}  # torch dtype name -> safetensors
