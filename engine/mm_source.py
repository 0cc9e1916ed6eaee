"""Read a Megatron/MindSpeed checkpoint as metadata: which tensors each rank file holds and where.

A rank file is torch's zip: stored (uncompressed) records, one per storage, and a pickle
that refers to them. We parse the pickle with our own unpickler that *builds nothing
and calls nothing*: tensors become (record, offset, shape, stride) descriptions, a short
allow-list of checkpoint metadata classes become inert stand-ins, and anything else is
refused before a single byte of tensor data is read. Each tensor is then just a byte
range of the rank file, so the executor reads it exactly like a safetensors tensor.
"""

from __future__ import annotations

import io
import pickle
import re
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConvertError
from .plan import CKPT_NAME, TRACKER_NAME
from .safetensors_header import TensorMeta, itemsize
from .torch_zip import STORAGES

RANK_DIR = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?(?:_(\d{3}))?$")

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
    storage: _Storage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


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


def _rebuild_tensor(storage: _Storage, offset: int, shape: tuple[int, ...], stride: tuple[int, ...], *_: object):
    return _Tensor(storage, offset, tuple(shape), tuple(stride))


def _rebuild_parameter(data: _Tensor, *_: object) -> _Tensor:
    return data


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, path: Path) -> None:
        super().__init__(io.BytesIO(data))
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return _rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if module == "torch" and name in STORAGES:  # a dtype, e.g. args.params_dtype
            return name
        if module == "collections" and name == "OrderedDict":
            return dict
        if (module, name) in _INERT or module.startswith(_INERT_MODULES):
            return _Inert
        raise ConvertError(
            f"{self.path}: refusing to unpickle {module}.{name}: a checkpoint may hold only tensors and "
            "plain metadata (dicts, lists, numbers, strings, argparse.Namespace); nothing was executed"
        )

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], str)):
            raise ConvertError(f"{self.path}: unexpected storage reference {pid!r} in data.pkl")
        _, dtype, key, _location, numel = pid
        return _Storage(str(key), dtype, int(numel))


def _record_offsets(z: zipfile.ZipFile, path: Path) -> dict[str, tuple[int, int]]:
    """name -> (offset of the record's first data byte, size), from the local headers."""
    out = {}
    with open(path, "rb") as f:
        for info in z.infolist():
            if info.compress_type != zipfile.ZIP_STORED:
                raise ConvertError(f"{path}: record {info.filename} is compressed; torch checkpoints store records")
            f.seek(info.header_offset)
            head = f.read(30)
            if len(head) < 30 or head[:4] != b"PK\x03\x04":
                raise ConvertError(f"{path}: broken zip record {info.filename} (truncated file?)")
            name_len, extra_len = struct.unpack("<HH", head[26:30])
            out[info.filename] = (info.header_offset + 30 + name_len + extra_len, info.file_size)
    return out


def _contiguous(shape: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    acc = 1
    for size, st in zip(reversed(shape), reversed(stride), strict=True):
        if size != 1 and st != acc:
            return False
        acc *= size
    return True


def read_rank_file(path: Path, *, prefix: str = "") -> dict[str, dict[str, TensorMeta]]:
    """{"model" or "model0".. : {key: TensorMeta}} of one `model_optim_rng.pt`; other entries ignored.

    TensorMeta names are `prefix + chunk + "/" + key`, the file is `path`, and `begin` is
    the absolute offset of the tensor's first byte in that file.
    """
    try:
        z = zipfile.ZipFile(path)
    except FileNotFoundError:
        raise ConvertError(f"{path}: missing") from None
    except (zipfile.BadZipFile, OSError) as e:
        raise ConvertError(f"{path}: not a torch checkpoint ({e}); only zip-format torch.save files are read") from None
    with z:
        names = z.namelist()
        pkl = next((n for n in names if n.endswith("/data.pkl") and n.count("/") == 1), None)
        if pkl is None:
            raise ConvertError(f"{path}: no data.pkl record; not a torch checkpoint")
        archive = pkl.split("/")[0]
        byteorder = f"{archive}/byteorder"
        if byteorder in names and z.read(byteorder).strip() != b"little":
            raise ConvertError(f"{path}: big-endian checkpoint; only little-endian is supported")
        offsets = _record_offsets(z, path)
        try:
            obj = _MetadataUnpickler(z.read(pkl), path).load()
        except ConvertError:
            raise
        except Exception as e:  # a corrupt pickle is bad input, not a bug of ours
            raise ConvertError(f"{path}: unreadable data.pkl ({type(e).__name__}: {e})") from None
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
            if value is None or key.endswith("._extra_state"):
                continue  # Transformer Engine's extra state: not a weight
            if not isinstance(value, _Tensor):
                raise ConvertError(f"{path}: [{chunk}] {key} is a {type(value).__name__}, not a tensor")
            metas[key] = _meta(path, archive, offsets, prefix + chunk + "/" + key, value, f"[{chunk}] {key}")
        out[chunk] = metas
    return out


def _chunk_order(name: str) -> int:
    return int(name[5:] or 0)


def _meta(path: Path, archive: str, offsets: dict[str, tuple[int, int]], name: str, t: _Tensor, where: str):
    record = f"{archive}/data/{t.storage.key}"
    if record not in offsets:
        raise ConvertError(f"{path}: {where} refers to record {record}, which the file does not have")
    start, size = offsets[record]
    item = itemsize(t.storage.dtype)
    numel = 1
    for s in t.shape:
        numel *= s
    if not _contiguous(t.shape, t.stride):
        raise ConvertError(f"{path}: {where} is not contiguous (stride {list(t.stride)}); re-save it contiguous")
    if (t.offset + numel) * item > size:
        raise ConvertError(f"{path}: {where} reaches past its storage record (truncated file?)")
    return TensorMeta(name, t.storage.dtype, t.shape, path, start + t.offset * item, numel * item)


@dataclass
class MmCheckpoint:
    """A Megatron/MindSpeed checkpoint directory, read as metadata."""

    root: Path
    iteration: str  # "release" or "iter_0000123"
    ranks: dict[str, Path]  # rank directory name -> rank file; which ranks a name means depends on the layout


def open_checkpoint(mm_dir: Path | str, field: str = "mm_dir") -> MmCheckpoint:
    """Find the iteration directory and its rank files; tensors are read per file later."""
    root = Path(mm_dir)
    if not root.is_dir():
        raise ConvertError(f"{field} {root}: no such directory")
    tracker = root / TRACKER_NAME
    if not tracker.is_file():
        raise ConvertError(f"{field} {root}: no {TRACKER_NAME}; expected a Megatron/MindSpeed checkpoint directory")
    text = tracker.read_text().strip()
    if text == "release":
        iteration = "release"
    elif text.isdigit():
        iteration = f"iter_{int(text):07d}"
    else:
        raise ConvertError(f"{tracker}: holds {text!r}; expected 'release' or an iteration number")
    it_dir = root / iteration
    if not it_dir.is_dir():
        raise ConvertError(f"{tracker}: says {text!r} but {it_dir} does not exist")
    # mp_rank_00_001 is PP rank 1 or, with PP = 1, EP rank 1: the layout decides (open_view)
    ranks = {d.name: d / CKPT_NAME for d in sorted(it_dir.iterdir()) if RANK_DIR.match(d.name) and d.is_dir()}
    if not ranks:
        raise ConvertError(f"{it_dir}: no mp_rank_* directories")
    return MmCheckpoint(root, iteration, ranks)
