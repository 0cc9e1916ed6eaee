"""Read a safetensors header without touching tensor data.

The format is an 8-byte little-endian header length, a JSON header mapping names to
dtype / shape / data_offsets, then raw bytes. The header alone is enough to plan.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from .errors import ConvertError

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
    "F8_E4M3": ("float8_e4m3fn", 1),  # DeepSeek-V3's block-quantised weights (engine/fp8.py)
}

MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class TensorMeta:
    """Where one tensor's bytes live. `begin` is an absolute file offset."""

    name: str
    dtype: str  # torch dtype name, e.g. "bfloat16"
    shape: tuple[int, ...]
    file: Path
    begin: int
    nbytes: int

    @property
    def itemsize(self) -> int:
        return _itemsize(self.dtype)

    @property
    def numel(self) -> int:
        return _numel(self.shape)


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


def _load_header(path: Path) -> tuple[dict, int, int]:
    """(header JSON, first data byte, file size)."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise ConvertError(f"{path}: truncated safetensors header (file is {size} bytes)")
            (hlen,) = struct.unpack("<Q", raw_len)
            if hlen > MAX_HEADER_BYTES or 8 + hlen > size:
                raise ConvertError(
                    f"{path}: truncated safetensors header (header claims {hlen} bytes, file has {size})"
                )
            header_bytes = f.read(hlen)
    except OSError as e:
        raise ConvertError(f"{path}: cannot read ({e.strerror})") from None
    try:
        header = json.loads(header_bytes)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ConvertError(
            f"{path}: safetensors header is not valid JSON (truncated or not a safetensors file)"
        ) from None
    if not isinstance(header, dict):
        raise ConvertError(f"{path}: safetensors header is not a JSON object")
    return header, 8 + hlen, size


def read_metadata(path: Path) -> dict[str, str] | None:
    """The header's free-form `__metadata__` (e.g. {"format": "pt"}), kept on the way back."""
    meta = _load_header(path)[0].get("__metadata__")
    return dict(meta) if isinstance(meta, dict) else None


def read_header(path: Path) -> dict[str, TensorMeta]:
    """Parse one file's header; raise ConvertError on anything malformed."""
    header, data_start, size = _load_header(path)
    out: dict[str, TensorMeta] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            st_dtype = info["dtype"]
            shape = tuple(int(s) for s in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ConvertError(f"{path}: malformed header entry for tensor {name!r}") from None
        if st_dtype not in DTYPES:
            raise ConvertError(f"{path}: tensor {name!r} has dtype {st_dtype}; supported: {', '.join(DTYPES)}")
        torch_name, isz = DTYPES[st_dtype]
        if end - begin != _numel(shape) * isz or data_start + end > size:
            raise ConvertError(
                f"{path}: tensor {name!r} data {begin}..{end} does not fit shape {list(shape)} "
                f"or the file size {size} (truncated file?)"
            )
        out[name] = TensorMeta(name, torch_name, shape, path, data_start + begin, end - begin)
    return out


ST_DTYPES = {torch_name: st for st, (torch_name, _) in DTYPES.items()}  # torch dtype name -> safetensors
