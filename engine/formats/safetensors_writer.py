"""Write a safetensors file front to back from a known list of tensors.

The header (names, dtypes, shapes, offsets) is fixed by the plan before any data is
read, so it is written first and each tensor's bytes follow in order: copied inside
the kernel when they are whole rows of a source file, else from one assembled buffer.
The header is serialized as the safetensors library does (compact JSON, `__metadata__`
first, tensors in offset order, space padding to 8 bytes), so a round trip reproduces
the original files byte for byte.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable
from pathlib import Path

from ..run.out_file import OutFile, Span
from .safetensors_header import ST_DTYPES


def header_bytes(tensors: list[tuple[str, str, tuple[int, ...], int]], metadata: dict[str, str] | None) -> bytes:
    """8-byte length + JSON header for (name, dtype, shape, nbytes) laid out in this order."""
    header: dict[str, object] = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    offset = 0
    for name, dtype, shape, nbytes in tensors:
        header[name] = {"dtype": ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


class SafetensorsWriter:
    """`add_chunks` / `add_spans` once per tensor, in header order, then `close`."""

    def __init__(self, path: Path, header: bytes, expected: list[int]) -> None:
        self.path = path
        self._fd: int | None = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self._out = OutFile(self._fd)
        self._expected = list(reversed(expected))
        self._out.write(header)

    def _next(self, n: int) -> None:
        want = self._expected.pop() if self._expected else None
        if want != n:
            raise AssertionError(f"{self.path}: tensor of {n} bytes where the header says {want}")

    def add_chunks(self, chunks: Iterable[memoryview | bytes], nbytes: int) -> None:
        """A tensor of `nbytes` given as consecutive pieces of its bytes."""
        self._next(nbytes)
        done = sum(self._out.write(chunk) for chunk in chunks)
        if done != nbytes:
            raise AssertionError(f"{self.path}: {done} bytes were given for a tensor of {nbytes}")

    def add_spans(self, spans: list[Span]) -> None:
        self._next(sum(n for _, _, n in spans))
        self._out.copy(spans)

    def close(self) -> None:
        if self._fd is not None:
            if not self._expected:  # complete: start sending the tail too
                self._out.flush_started()
            os.close(self._fd)
            self._fd = None
        if self._expected:
            raise AssertionError(f"{self.path}: {len(self._expected)} tensors were never written")

    def abort(self) -> None:
        self._expected.clear()
        self.close()

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is not None:
            self.abort()
        else:
            self.close()
