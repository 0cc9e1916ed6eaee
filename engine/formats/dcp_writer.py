"""Write a torch.distributed.checkpoint (DCP) directory without a process group, streaming.

DCP's own `save` wants the whole state dict in memory. Its on-disk format is simple:
one data file holding, per tensor, the bytes `torch.save(tensor)` would write (a small
zip archive), and a pickled `Metadata` naming each tensor's dtype, shape and
(offset, length) in that file. So we write the archives one tensor at a time with the
same zip writer the Megatron files use (whole rows are copied in the kernel), and write
the `Metadata` as torch's own dataclasses pickle (dcp_index.py, shared with torch_dist) so
`torch.distributed.checkpoint.load` and `dcp_to_torch_save` read it as if DCP had written it.

Keys are flattened the way DCP's default planner does: `{"model": {k: t}}` -> "model.k",
with the path kept in the planner data so loaders can rebuild the nesting.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ..run.out_file import Span
from .dcp_index import DcpIndex
from .torch_zip import StreamingCheckpointWriter

DATA_NAME = "__0_0.distcp"
METADATA_NAME = ".metadata"


@dataclass
class DcpWriter:
    """`add_spans` / `add_chunks` per tensor of a top-level dict entry, `add_object` for plain values, then `finish`."""

    directory: Path
    _fd: int = -1
    _tensors: dict[str, tuple[str, tuple[int, ...], int, int]] = field(
        default_factory=dict
    )  # fqn -> dtype, shape, at, n
    _objects: dict[str, tuple[int, int]] = field(default_factory=dict)  # fqn -> at, n
    _paths: dict[str, tuple[str, ...]] = field(default_factory=dict)  # fqn -> path in the nested state dict

    def __post_init__(self) -> None:
        self._fd = os.open(self.directory / DATA_NAME, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)

    def _archive(
        self, path: tuple[str, ...], write: Callable[[StreamingCheckpointWriter], object]
    ) -> tuple[str, int, int]:
        fqn = ".".join(path)
        if fqn in self._paths:
            raise ValueError(f"{fqn} is written twice")
        self._paths[fqn] = path
        start = os.lseek(self._fd, 0, os.SEEK_CUR)
        w = StreamingCheckpointWriter(self.directory / DATA_NAME, "archive", fd=self._fd)
        try:
            obj = write(w)
            w.finish(obj)
        except BaseException:
            w.abort()
            raise
        return fqn, start, os.lseek(self._fd, 0, os.SEEK_CUR) - start

    def add_spans(self, path: tuple[str, ...], spans: list[Span], dtype: str, shape: tuple[int, ...]) -> None:
        fqn, at, n = self._archive(path, lambda w: w.add_spans(spans, dtype, shape))
        self._tensors[fqn] = (dtype, tuple(shape), at, n)

    def add_chunks(
        self, path: tuple[str, ...], chunks: Iterable[memoryview], nbytes: int, dtype: str, shape: tuple[int, ...]
    ) -> None:
        fqn, at, n = self._archive(path, lambda w: w.add_chunks(chunks, nbytes, dtype, shape))
        self._tensors[fqn] = (dtype, tuple(shape), at, n)

    def add_object(self, path: tuple[str, ...], value: float | int | str) -> None:
        fqn, at, n = self._archive(path, lambda _: value)
        self._objects[fqn] = (at, n)

    def finish(self) -> None:
        os.close(self._fd)
        self._fd = -1
        with open(self.directory / METADATA_NAME, "wb") as f:
            f.write(self._metadata())

    def abort(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _metadata(self) -> bytes:
        index = DcpIndex()
        for fqn, (dtype, shape, at, n) in self._tensors.items():
            index.add_tensor(fqn, dtype, shape, (DATA_NAME, at, n))
        for fqn, (at, n) in self._objects.items():
            index.add_object(fqn, (DATA_NAME, at, n))
        return index.pickled(planner_data=dict(self._paths))
