"""Read torch DCP's pickled `.metadata` as data: nothing is imported, built or run from it.

`.metadata` is a `pickle.dump` of torch's `Metadata` dataclass tree (tensor and byte entries, chunk
offsets and sizes, where each chunk's bytes are). A user's checkpoint is untrusted input, so it is read
with an unpickler that knows a short list of names: torch DCP's dataclasses (and the save plans
megatron-core adds for its metadata cache) become inert records of their pickled state, dtypes become
their names, `torch.Size` a tuple, enums their values. Any other global is refused before anything
runs, with one line naming it.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

from ..errors import ConvertError
from .torch_zip import STORAGES

MAX_BYTES = 1 << 30  # a 1T-parameter model's index is a few hundred MB at most

_DCP_CLASSES = {
    ("torch.distributed.checkpoint.metadata", n)
    for n in (
        "Metadata",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "TensorProperties",
        "MetadataIndex",
        "StorageMeta",
    )
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.distributed.checkpoint.planner", "SavePlan"),  # megatron-core's all_local_plans (a cache)
    ("torch.distributed.checkpoint.planner", "WriteItem"),
    ("torch.distributed.checkpoint.planner", "TensorWriteData"),
    ("torch.distributed.checkpoint.planner", "BytesIOWriteData"),
}
_ENUMS = {
    ("torch.distributed.checkpoint.metadata", "_MEM_FORMAT_ENCODING"),
    ("torch.distributed.checkpoint.planner", "WriteItemType"),
}
_PY2 = {"__builtin__": "builtins", "copy_reg": "copyreg"}


class Record:
    """A pickled object's class name and state, nothing more."""

    __slots__ = ("args", "kind", "state")

    def __init__(self, kind: str, args: tuple) -> None:
        self.kind, self.args, self.state = kind, args, None

    def __setstate__(self, state: object) -> None:
        self.state = state

    def get(self, name: str, default: object = None) -> object:
        """A field of a dataclass pickled with its __dict__ (or `(dict, slots)`) as state."""
        state = self.state
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict):
            merged = dict(state[0] or {}) | state[1]
            return merged.get(name, default)
        return state.get(name, default) if isinstance(state, dict) else default


def _record_class(module: str, name: str) -> Any:
    kind = f"{module}.{name}"

    class _New:  # what NEWOBJ / copyreg.__newobj__ call: cls.__new__(cls, *args)
        @staticmethod
        def __new__(cls: object, *args: object) -> Record:
            return Record(kind, args)

    _New.__name__ = name
    return _New


def _size(*args: object) -> tuple:
    (dims,) = args if args else ((),)
    return tuple(dims)  # type: ignore[arg-type]


def _enum(*args: object) -> object:
    return args[0] if args else None


def _path(*parts: object) -> str:
    return "/".join(str(p) for p in parts).replace("//", "/")  # torch's StorageMeta.checkpoint_id: kept as text


_PATHS = {(m, n) for m in ("pathlib", "pathlib._local") for n in ("PosixPath", "PurePosixPath", "WindowsPath",
                                                                  "PureWindowsPath", "Path")}


def _layout(name: object) -> object:
    return name  # torch.serialization._get_layout("torch.strided"): kept as the name


class _Unpickler(pickle.Unpickler):
    def __init__(self, data: bytes, path: Path) -> None:
        super().__init__(io.BytesIO(data))
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        module = _PY2.get(module, module)
        if (module, name) in _DCP_CLASSES:
            return _record_class(module, name)
        if (module, name) in _ENUMS:
            return _enum
        if module == "torch" and name == "Size":
            return _size
        if module == "torch" and name in STORAGES:  # a dtype
            return name
        if module == "torch" and name in ("strided", "contiguous_format"):
            return name
        if (module, name) in _PATHS:  # the checkpoint_id torch's own save records (a path, built as text)
            return _path
        if (module, name) == ("torch.serialization", "_get_layout"):
            return _layout
        if (module, name) == ("copyreg", "__newobj__"):
            return _newobj
        if (module, name) in (("builtins", "dict"), ("collections", "OrderedDict")):
            return dict
        raise ConvertError(
            f"{self.path}: refusing to unpickle {module}.{name}: a torch_dist index holds only torch DCP's "
            "metadata records and plain values; nothing was executed"
        )


def _newobj(cls: Any, *args: object) -> object:
    return cls.__new__(cls, *args)


def load_index(path: Path) -> Record:
    """The `.metadata` of a torch_dist directory as Records (a ConvertError for anything else)."""
    from .regular_file import read_regular

    data = read_regular(path, MAX_BYTES, "the torch_dist index")
    try:
        obj = _Unpickler(data, path).load()
    except ConvertError:
        raise
    except Exception as e:  # a damaged pickle is bad input, not a bug
        raise ConvertError(f"{path}: unreadable torch DCP index ({type(e).__name__}: {e})") from None
    if not isinstance(obj, Record) or not obj.kind.endswith(".Metadata"):
        raise ConvertError(f"{path}: holds a {_what(obj)}, not torch DCP's Metadata")
    return obj


def _what(obj: object) -> str:
    return obj.kind.rsplit(".", 1)[-1] if isinstance(obj, Record) else type(obj).__name__
