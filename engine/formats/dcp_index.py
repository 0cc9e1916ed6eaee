"""torch DCP's index (`.metadata`, a pickled `Metadata`), built without importing torch.

Both DCP writers need it: hf_to_dcp's single-file checkpoint (dcp_writer.py) and Megatron-Core's
torch_dist (torch_dist_writer.py), whose `.metadata` is the same dataclass. torch's classes are
pickled by name as pickle pickles them (`copyreg.__newobj__(cls)`, then the instance's state), so
`torch.distributed.checkpoint` and megatron-core unpickle real `Metadata` objects, while writing
costs neither torch's import (seconds, a few hundred MB) nor any of its objects.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .torch_zip import _Global, pickle_checkpoint, torch_global

_MD = "torch.distributed.checkpoint.metadata"
_NEWOBJ = _Global("copyreg", "__newobj__")
DCP_VERSION = "1.0.0"  # torch.distributed.checkpoint.filesystem.CURRENT_DCP_VERSION (checked by the tests)


class _New:
    __slots__ = ("cls", "state")

    def __init__(self, module: str, name: str, state: object) -> None:
        self.cls, self.state = _Global(module, name), state

    def __reduce__(self) -> tuple:
        return (_NEWOBJ, (self.cls,), self.state)


class _Call:
    __slots__ = ("args", "fn")

    def __init__(self, module: str, name: str, *args: object) -> None:
        self.fn, self.args = _Global(module, name), args

    def __reduce__(self) -> tuple:
        return (self.fn, self.args)


def _size(dims: tuple[int, ...]) -> _Call:
    return _Call("torch", "Size", tuple(dims))


def _index(fqn: str, offset: tuple[int, ...] | None = None) -> _New:
    return _New(_MD, "MetadataIndex", {"fqn": fqn, "offset": None if offset is None else _size(offset), "index": None})


def _stored(file: str, at: int, length: int) -> _New:
    state = {"relative_path": file, "offset": at, "length": length}
    return _New("torch.distributed.checkpoint.filesystem", "_StorageInfo", state)


@dataclass
class DcpIndex:
    """Every chunk and byte entry of a DCP checkpoint, where it lies; `pickled` is the `.metadata` file's bytes."""

    _tensors: dict[str, tuple[str, tuple[int, ...], list[tuple[tuple[int, ...], tuple[int, ...]]]]] = field(
        default_factory=dict
    )  # fqn -> dtype, global shape, [(offset, chunk shape)]
    _objects: list[str] = field(default_factory=list)
    _storage: dict[object, object] = field(default_factory=dict)

    def add_chunk(
        self,
        fqn: str,
        dtype: str,
        global_shape: tuple[int, ...],
        offset: tuple[int, ...],
        shape: tuple[int, ...],
        where: tuple[str, int, int],
    ) -> None:
        """A chunk of global tensor `fqn` at `offset`, stored in `where` = (data file name, offset, length)."""
        got, size, chunks = self._tensors.setdefault(fqn, (dtype, tuple(global_shape), []))
        if (got, size) != (dtype, tuple(global_shape)):
            raise AssertionError(f"{fqn}: chunks disagree on dtype or shape")  # a bug
        chunks.append((tuple(offset), tuple(shape)))
        self._storage[_index(fqn, tuple(offset))] = _stored(*where)

    def add_tensor(self, fqn: str, dtype: str, shape: tuple[int, ...], where: tuple[str, int, int]) -> None:
        """A whole tensor: one chunk at offset 0."""
        self.add_chunk(fqn, dtype, shape, (0,) * len(shape), shape, where)

    def add_object(self, fqn: str, where: tuple[str, int, int]) -> None:
        """A byte entry (`torch.save` of a plain value)."""
        self._objects.append(fqn)
        self._storage[_index(fqn)] = _stored(*where)

    def pickled(self, planner_data: dict[str, tuple[str, ...]] | None = None) -> bytes:
        """The `.metadata` bytes. No checkpoint_id or save_id: the same input gives the same bytes wherever
        it is written (the directory is a temporary name until the rename)."""
        state: dict[str, object] = {}
        contiguous = _Call(_MD, "_MEM_FORMAT_ENCODING", 0)
        strided = _Call("torch.serialization", "_get_layout", "torch.strided")
        for fqn, (dtype, shape, chunks) in self._tensors.items():
            chunks.sort()
            props = _New(_MD, "TensorProperties", (torch_global(dtype), strided, False, contiguous, False))
            state[fqn] = _New(_MD, "TensorStorageMetadata", {
                "properties": props,
                "size": _size(shape),
                "chunks": [_New(_MD, "ChunkStorageMetadata", {"offsets": _size(o), "sizes": _size(s)})
                           for o, s in chunks],
            })  # fmt: skip
        for fqn in self._objects:
            state[fqn] = _New(_MD, "BytesStorageMetadata", None)
        meta = {"checkpoint_id": None, "save_id": None, "load_id": None, "modules": []}
        return pickle_checkpoint(_New(_MD, "Metadata", {
            "state_dict_metadata": state,
            "planner_data": planner_data,
            "storage_data": self._storage,
            "storage_meta": _New(_MD, "StorageMeta", meta),
            "version": DCP_VERSION,
        }))  # fmt: skip
