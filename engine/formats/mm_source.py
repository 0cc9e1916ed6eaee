"""Read a Megatron/MindSpeed checkpoint as metadata: which tensors each rank file holds and where.

A rank file is torch's zip: stored (uncompressed) records, one per storage, and a pickle
that refers to them. We parse the pickle with our own unpickler that *builds nothing
and calls nothing*: tensors become (record, offset, shape, stride) descriptions, a short
allow-list of checkpoint metadata classes become inert stand-ins, and anything else is
refused before a single byte of tensor data is read. Each tensor is then just a byte
range of the rank file, so the executor reads it exactly like a safetensors tensor.

Every number the pickle gives (storage type, size, offset, shape, stride, key) is
checked, each record must lie inside the file, and each carries the CRC-32 the archive
declares for it, checked before its bytes are first used (engine/formats/record_check.py).
Plain containers (dict, OrderedDict, defaultdict: MindSpeed-LLM's `model` is one) load
as dicts; a default factory is never kept, so it is never called.
"""

from __future__ import annotations

import functools
import io
import os
import pickle
import re
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConvertError, short
from ..planning.plan import CKPT_NAME, TRACKER_NAME
from .record_check import Record
from .regular_file import open_regular, read_regular
from .safetensors_header import TensorMeta, itemsize
from .torch_zip import STORAGES

RANK_DIR = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?(?:_(\d{3}))?$")

MAX_PICKLE_BYTES = 64_000_000  # data.pkl: tensors are records of their own; 100k tensors pickle to ~20 MB

# torch storage class name -> dtype name: the writer's table read backwards
_STORAGE_DTYPES = {cls: dtype for dtype, (cls, _) in STORAGES.items()}

# Classes real trained checkpoints carry outside the weights (training args, RNG state);
# each becomes an inert stand-in: never imported, never called.
_INERT = {
    ("argparse", "Namespace"),
    ("_io", "BytesIO"),  # Transformer Engine's `_extra_state`
    ("numpy.core.multiarray", "_reconstruct"),  # numpy's RNG state
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("torch", "device"),
    ("torch", "Size"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "slice"),
    ("builtins", "complex"),
    ("copyreg", "_reconstructor"),
    ("_codecs", "encode"),  # how protocol 2 pickles bytes (numpy arrays in the RNG state)
    ("builtins", "object"),
}
_INERT_MODULES = ("megatron.", "mindspeed.", "mindspeed_mm.", "mindspeed_llm.")  # config enums in `args`


@dataclass(frozen=True)
class _Storage:
    key: str
    dtype: str
    numel: int


@dataclass(frozen=True)
class _Tensor:
    """A tensor as the pickle describes it; checked (with its key at hand) in `_meta`."""

    storage: object
    offset: object
    shape: object
    stride: object


class _Inert:
    """Stands for an allowed metadata object; accepts any state, does nothing."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        pass

    def __setstate__(self, state: object) -> None:
        pass

    def __call__(self, *args: object, **kwargs: object) -> _Inert:
        return _Inert()

    def __setitem__(self, key: object, value: object) -> None:
        pass

    def append(self, item: object) -> None:
        pass

    def extend(self, items: object) -> None:
        pass

    def __reduce__(self) -> tuple[Any, ...]:
        raise TypeError("inert stand-in")


class _PlainDict(dict):
    """dict, OrderedDict and defaultdict all load as this: a plain dict of the items.

    A module's state_dict is an OrderedDict carrying `_metadata` as pickled state, which
    is dropped; a defaultdict's default factory (MindSpeed-LLM's `model` is a
    `defaultdict(dict)`) is never kept, so it is never called.
    """

    def __setstate__(self, state: object) -> None:
        pass


def _defaultdict(*_: object) -> _PlainDict:
    return _PlainDict()


class _UnknownStorage:
    """A torch storage class outside the table: refused with its name when a storage uses it."""

    def __init__(self, name: str) -> None:
        self.name = name


def _rebuild_tensor(storage: object, offset: object, shape: object, stride: object, *_: object) -> _Tensor:
    return _Tensor(storage, offset, shape, stride)


def _rebuild_parameter(data: _Tensor, *_: object) -> _Tensor:
    return data


# pickle protocol 2 names builtins as Python 2 did; the stock find_class maps them, ours must too
_PY2_MODULES = {"__builtin__": "builtins", "copy_reg": "copyreg"}


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, path: Path) -> None:
        super().__init__(io.BytesIO(data))
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        module = _PY2_MODULES.get(module, module)
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return _rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if module == "torch" and name.endswith("Storage"):
            return _UnknownStorage(name)
        if module == "torch" and name in STORAGES:  # a dtype, e.g. args.params_dtype
            return name
        if (module, name) in (("collections", "OrderedDict"), ("builtins", "dict")):
            return _PlainDict
        if (module, name) == ("collections", "defaultdict"):
            return _defaultdict
        if (module, name) == ("builtins", "list"):  # e.g. a defaultdict(list)'s factory, never called
            return list
        if (module, name) in _INERT or module.startswith(_INERT_MODULES):
            return _Inert
        raise ConvertError(
            f"{self.path}: refusing to unpickle {module}.{name}: a checkpoint may hold only tensors and "
            "plain metadata (dicts, lists, numbers, strings, argparse.Namespace); nothing was executed"
        )

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise ConvertError(f"{self.path}: unexpected storage reference {short(pid)} in data.pkl")
        _, dtype, key, _location, numel = pid
        if not isinstance(dtype, str) or dtype not in STORAGES:
            shown = f"torch.{dtype.name}" if isinstance(dtype, _UnknownStorage) else short(dtype)
            known = ", ".join(cls for cls, _ in STORAGES.values())
            raise ConvertError(f"{self.path}: storage {short(key)} is a {shown}; supported storage types: {known}")
        if not isinstance(key, str) or not _is_count(numel):
            raise ConvertError(
                f"{self.path}: storage reference {short(pid)} in data.pkl; expected a string key and "
                "a whole number of elements"
            )
        return _Storage(key, dtype, numel)


def _is_count(x: object) -> bool:
    return type(x) is int and x >= 0  # not bool, not "3", not -1


def _records(z: zipfile.ZipFile, fd: int, path: Path, size: int) -> dict[str, Record]:
    """name -> its Record (first data byte, size, declared CRC-32), from the central directory and local headers."""
    out = {}
    for info in z.infolist():
        if info.compress_type != zipfile.ZIP_STORED:
            raise ConvertError(f"{path}: record {info.filename} is compressed; torch checkpoints store records")
        head = os.pread(fd, 30, info.header_offset)
        if len(head) < 30 or head[:4] != b"PK\x03\x04":
            raise ConvertError(f"{path}: broken zip record {info.filename} (truncated file?)")
        name_len, extra_len = struct.unpack("<HH", head[26:30])
        start = info.header_offset + 30 + name_len + extra_len
        if start + info.file_size > size:
            raise ConvertError(
                f"{path}: record {info.filename} ends at byte {start + info.file_size}, past the file's "
                f"{size} bytes (truncated file?)"
            )
        out[info.filename] = Record(path, info.filename, start, info.file_size, info.CRC)
    return out


def _read_record(fd: int, record: Record, limit: int) -> bytes:
    """A small record's bytes (data.pkl, byteorder), CRC-checked; never more than `limit`."""
    if record.size > limit:
        raise ConvertError(
            f"{record.file}: record {record.name} is {record.size} bytes, larger than the "
            f"{limit // 1_000_000} MB limit for it"
        )
    record.ensure(fd)
    data = os.pread(fd, record.size, record.start)
    if len(data) != record.size:
        raise ConvertError(f"{record.file}: record {record.name} is cut short (truncated file?)")
    return data


def _contiguous(shape: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    acc = 1
    for size, st in zip(reversed(shape), reversed(stride), strict=True):
        if size != 1 and st != acc:
            return False
        acc *= size
    return True


def _unpickle(path: Path) -> tuple[object, dict[str, Record], str]:
    """(the unpickled object, the file's records by name, the archive's name); reads data.pkl only.

    The few files read twice while planning (the layout and the names read from the disk, then the view)
    are read once: the same records, so each record's CRC is checked once. A file changed since is read again.
    """
    try:
        st = os.stat(path)
    except OSError:
        return _unpickle_file(path)  # its own one-line error
    return _unpickle_cached(path, st.st_ino, st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _unpickle_cached(path: Path, _ino: int, _size: int, _mtime: int) -> tuple[object, dict[str, Record], str]:
    return _unpickle_file(path)


def _unpickle_file(path: Path) -> tuple[object, dict[str, Record], str]:
    fd = open_regular(path)
    try:
        size = os.fstat(fd).st_size
        with os.fdopen(os.dup(fd), "rb") as f:
            try:
                z = zipfile.ZipFile(f)
            except Exception as e:  # zipfile's many ways of saying "not a zip" are bad input, not bugs
                raise ConvertError(
                    f"{path}: not a torch checkpoint ({e}); only zip-format torch.save files are read"
                ) from None
            with z:
                names = z.namelist()
                records = _records(z, fd, path, size)
        pkl = next((n for n in names if n.endswith("/data.pkl") and n.count("/") == 1), None)
        if pkl is None:
            raise ConvertError(f"{path}: no data.pkl record; not a torch checkpoint")
        archive = pkl.split("/")[0]
        byteorder = records.get(f"{archive}/byteorder")
        if byteorder is not None and _read_record(fd, byteorder, 1000).strip() != b"little":
            raise ConvertError(f"{path}: big-endian checkpoint; only little-endian is supported")
        data = _read_record(fd, records[pkl], MAX_PICKLE_BYTES)
    except OSError as e:
        raise ConvertError(f"{path}: cannot read ({e.strerror})") from None
    finally:
        os.close(fd)
    try:
        obj = _MetadataUnpickler(data, path).load()
    except ConvertError:
        raise
    except Exception as e:  # a corrupt pickle is bad input, not a bug of ours
        raise ConvertError(f"{path}: unreadable data.pkl ({type(e).__name__}: {e})") from None
    return obj, records, archive


def read_rank_file(path: Path, *, prefix: str = "") -> dict[str, dict[str, TensorMeta]]:
    """{"model" or "model0".. : {key: TensorMeta}} of one `model_optim_rng.pt`; other entries ignored.

    TensorMeta names are `prefix + chunk + "/" + key`, the file is `path`, `begin` is the
    absolute offset of the tensor's first byte in that file, and `record` the zip record
    it lies in (CRC-checked before its first read).
    """
    obj, records, archive = _unpickle(path)
    if not isinstance(obj, dict):
        raise ConvertError(f"{path}: holds a {type(obj).__name__}, expected a dict with a 'model' entry")
    chunks = sorted((k for k in obj if isinstance(k, str) and re.fullmatch(r"model\d*", k)), key=_chunk_order)
    if not chunks:
        raise ConvertError(f"{path}: no 'model' or 'model0' entry (top-level keys: {sorted(map(str, obj))})")
    out: dict[str, dict[str, TensorMeta]] = {}
    for chunk in chunks:
        state = obj[chunk]
        if not isinstance(state, dict):
            raise ConvertError(f"{path}: [{chunk}] is a {type(state).__name__}, expected a state dict")
        metas = {}
        for key, value in state.items():
            if not isinstance(key, str):
                raise ConvertError(
                    f"{path}: [{chunk}] has the key {short(key)} ({type(key).__name__}); state-dict keys are strings"
                )
            if value is None or key.endswith("._extra_state"):
                continue  # Transformer Engine's extra state: not a weight
            if not isinstance(value, _Tensor):
                raise ConvertError(f"{path}: [{chunk}] {key} is a {type(value).__name__}, not a tensor")
            metas[key] = _meta(path, archive, records, prefix + chunk + "/" + key, value, f"[{chunk}] {key}")
        out[chunk] = metas
    return out


def read_bin_file(path: Path) -> dict[str, TensorMeta]:
    """{key: TensorMeta} of a Hugging Face `pytorch_model*.bin` (a torch.save'd state dict), from its pickle
    alone, through the same unpickler as rank files: tensors become byte ranges of the zip records (CRC-checked
    before their first read), nothing else is built, and a pickle naming anything but plain containers and
    tensors is refused before it could run."""
    fd = open_regular(path)
    try:
        magic = os.pread(fd, 2, 0)
    except OSError as e:
        raise ConvertError(f"{path}: cannot read ({e.strerror})") from None
    finally:
        os.close(fd)
    if magic[:1] == b"\x80":  # a pickle protocol opcode: the old format is a bare pickle stream
        raise ConvertError(
            f"{path}: the legacy (pre-zip) torch.save format, which is not read; re-save it with "
            "torch.save(state_dict, path) from torch >= 1.6, or as safetensors"
        )
    obj, records, archive = _unpickle(path)
    if not isinstance(obj, dict):
        raise ConvertError(f"{path}: holds a {type(obj).__name__}, expected a state dict of tensors")
    out = {}
    for key, value in obj.items():
        if not isinstance(key, str):
            raise ConvertError(f"{path}: has the key {short(key)} ({type(key).__name__}); state-dict keys are strings")
        if not isinstance(value, _Tensor):
            raise ConvertError(f"{path}: {key} is a {type(value).__name__}, not a tensor")
        out[key] = _meta(path, archive, records, key, value, key)
    return out


def _chunk_order(name: str) -> int:
    return int(name[5:] or 0)


def _meta(path: Path, archive: str, records: dict[str, Record], name: str, t: _Tensor, where: str) -> TensorMeta:
    """Where a pickled tensor's bytes are, after checking every number the pickle gave for it."""
    st = t.storage
    if not isinstance(st, _Storage):
        raise ConvertError(f"{path}: {where} is built from {short(st)}, not a storage")
    if not _is_count(t.offset):
        raise ConvertError(f"{path}: {where} has storage offset {short(t.offset)}; expected a whole number >= 0")
    if not isinstance(t.shape, tuple | list) or not all(_is_count(d) for d in t.shape):
        raise ConvertError(f"{path}: {where} has shape {short(t.shape)}; expected a list of whole numbers >= 0")
    shape = tuple(t.shape)
    if not (isinstance(t.stride, tuple | list) and len(t.stride) == len(shape) and all(_is_count(x) for x in t.stride)):
        raise ConvertError(
            f"{path}: {where} has stride {short(t.stride)} for shape {list(shape)}; expected one whole "
            "number >= 0 per dim"
        )
    stride = tuple(t.stride)
    record = records.get(f"{archive}/data/{st.key}")
    if record is None:
        raise ConvertError(f"{path}: {where} refers to record {archive}/data/{st.key}, which the file does not have")
    item = itemsize(st.dtype)
    if st.numel * item != record.size:
        raise ConvertError(
            f"{path}: {where}: storage {st.key} declares {st.numel} {st.dtype} elements "
            f"({st.numel * item} bytes) but its record {record.name} holds {record.size} bytes"
        )
    numel = 1
    for s in shape:
        numel *= s
    if not _contiguous(shape, stride):
        raise ConvertError(f"{path}: {where} is not contiguous (stride {list(stride)}); re-save it contiguous")
    if t.offset + numel > st.numel:
        raise ConvertError(
            f"{path}: {where} (offset {t.offset}, {numel} elements) reaches past its storage of {st.numel}"
        )
    return TensorMeta(name, st.dtype, shape, path, record.start + t.offset * item, numel * item, record)


@dataclass
class MmCheckpoint:
    """A Megatron/MindSpeed checkpoint directory, read as metadata."""

    root: Path
    iteration: str  # "release" or "iter_0000123"
    ranks: dict[str, Path]  # rank directory name -> rank file; which ranks a name means depends on the layout
    dist: Any = None  # a Megatron-Core torch_dist directory: its index (engine/formats/torch_dist_reader.py)


def open_checkpoint(mm_dir: Path | str, field: str = "mm_dir") -> MmCheckpoint:
    """Find the iteration directory and its rank files; tensors are read per file later."""
    root = Path(mm_dir)
    if not root.is_dir():
        raise ConvertError(f"{field} {root}: no such directory")
    tracker = root / TRACKER_NAME
    if not tracker.exists():
        raise ConvertError(f"{field} {root}: no {TRACKER_NAME}; expected a Megatron/MindSpeed checkpoint directory")
    text = read_regular(tracker, 1000, "the tracker").decode("utf-8", "replace").strip()
    if text == "release":
        iteration = "release"
    elif text.isdigit():
        iteration = f"iter_{int(text):07d}"
    else:
        raise ConvertError(f"{tracker}: holds {text!r}; expected 'release' or an iteration number")
    it_dir = root / iteration
    if not it_dir.is_dir():
        raise ConvertError(f"{tracker}: says {text!r} but {it_dir} does not exist")
    from .torch_dist_reader import detect  # it reads chunk archives with this module

    dist = detect(it_dir)
    if dist is not None:
        return MmCheckpoint(root, iteration, {}, dist)
    # mp_rank_00_001 is PP rank 1 or, with PP = 1, EP rank 1: the layout decides (open_view)
    ranks = {d.name: d / CKPT_NAME for d in sorted(it_dir.iterdir()) if RANK_DIR.match(d.name) and d.is_dir()}
    if not ranks:
        raise ConvertError(f"{it_dir}: no mp_rank_* directories")
    return MmCheckpoint(root, iteration, ranks)
