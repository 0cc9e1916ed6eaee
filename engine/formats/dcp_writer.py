"""Write a torch.distributed.checkpoint (DCP) directory without a process group, streaming.

DCP's own `save` wants the whole state dict in memory. Its on-disk format is simple:
one data file holding, per tensor, the bytes `torch.save(tensor)` would write (a small
zip archive), and a pickled `Metadata` naming each tensor's dtype, shape and
(offset, length) in that file. So we write the archives one tensor at a time with the
same zip writer the Megatron files use (whole rows are copied in the kernel), and build
the `Metadata` from torch's own dataclasses so `torch.distributed.checkpoint.load` and
`dcp_to_torch_save` read it as if DCP had written it.

Keys are flattened the way DCP's default planner does: `{"model": {k: t}}` -> "model.k",
with the path kept in the planner data so loaders can rebuild the nesting.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ..run.out_file import Span
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
            pickle.dump(self._metadata(), f)

    def abort(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _metadata(self) -> object:
        import torch
        from torch.distributed.checkpoint.filesystem import CURRENT_DCP_VERSION, _StorageInfo
        from torch.distributed.checkpoint.metadata import (
            BytesStorageMetadata,
            ChunkStorageMetadata,
            Metadata,
            MetadataIndex,
            StorageMeta,
            TensorProperties,
            TensorStorageMetadata,
        )

        state: dict[str, object] = {}
        storage: dict[object, object] = {}
        for fqn, (dtype, shape, at, n) in self._tensors.items():
            zero = torch.Size([0] * len(shape))
            props = TensorProperties(dtype=getattr(torch, dtype))
            state[fqn] = TensorStorageMetadata(
                props, torch.Size(shape), [ChunkStorageMetadata(zero, torch.Size(shape))]
            )
            storage[MetadataIndex(fqn, zero, 0)] = _StorageInfo(DATA_NAME, at, n)
        for fqn, (at, n) in self._objects.items():
            state[fqn] = BytesStorageMetadata()
            storage[MetadataIndex(fqn)] = _StorageInfo(DATA_NAME, at, n)
        return Metadata(
            state_dict_metadata=state,
            planner_data=dict(self._paths),
            storage_data=storage,
            # no checkpoint_id: this directory is a temporary name until the rename, and
            # without it the same input converts to the same bytes wherever it is written
            storage_meta=StorageMeta(checkpoint_id=None, save_id=None),
            version=CURRENT_DCP_VERSION,
        )
