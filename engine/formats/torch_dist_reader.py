"""Read Megatron-Core's `torch_dist` checkpoint as a source view, from its index alone.

A torch_dist directory (`release/` or `iter_N/`) is recognised by megatron-core's `metadata.json`; its
`.metadata` (torch DCP's index, read by torch_dist_pickle.py) lists every global tensor, its chunks and
where each chunk's `torch.save` archive lies in the `__R_I.distcp` files. Each archive is parsed like a rank
file (its pickle through engine/formats/mm_source.py's unpickler, every record CRC-checked before use), so a chunk
becomes a byte range, exactly like a rank-file tensor.

The global tensors do not depend on the layout the checkpoint was saved with, so it is read as the TP 1,
one-stage layout: each tensor of that layout (a layer of a stacked tensor, or the two halves of fc1) is
cut from whichever chunks cover it (torch_dist_names.py says where), and the view maps the canonical
(Hugging Face) tensors onto those chunk blocks as engine/source/mm_view.py does for rank files. No layout is
needed to read; optimizer, RNG and extra-state entries are left unread.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConvertError, short
from ..layout import ParallelConfig, one_stage
from ..planning.plan import Entry, Piece, Plan, grid
from ..planning.te_names import to_local
from ..source.hf_source import ModelInfo
from ..source.mm_view import MmView, ordered_blocks
from .mm_source import MAX_PICKLE_BYTES, MmCheckpoint, _meta, _MetadataUnpickler, _Tensor
from .record_check import Record as ZipRecord
from .regular_file import open_regular, read_regular
from .safetensors_header import TensorMeta
from .torch_dist_names import (
    CONFIG_NAME,
    CONFIG_TEXT,
    EXTRA_STATE,
    METADATA_NAME,
    NOT_MODEL,
    Chunk,
    Chunker,
    detect_impl,
)
from .torch_dist_pickle import Record, load_index
from .torch_zip import STORAGES

EXPECTED_CONFIG = json.loads(CONFIG_TEXT)


@dataclass(frozen=True)
class DiskChunk:
    offset: tuple[int, ...]
    size: tuple[int, ...]
    file: str  # a file name in the directory
    at: int  # the archive's first byte in that file
    length: int


@dataclass
class DistTensor:
    fqn: str
    dtype: str
    shape: tuple[int, ...]
    chunks: list[DiskChunk]


@dataclass
class TorchDistIndex:
    directory: Path
    tensors: dict[str, DistTensor]
    objects: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------
# recognising and indexing a directory


def detect(it_dir: Path) -> TorchDistIndex | None:
    """The index of a torch_dist iteration directory; None for legacy rank files; ConvertError for a broken one."""
    config = it_dir / CONFIG_NAME
    index = it_dir / METADATA_NAME
    if not config.exists():
        if index.exists() and not any(d.name.startswith("mp_rank_") for d in it_dir.iterdir()):
            raise ConvertError(
                f"{it_dir}: holds a torch DCP index ({METADATA_NAME}) but no {CONFIG_NAME}; Megatron-Core's "
                "torch_dist writes both (a plain DCP checkpoint is read by dcp_to_hf)"
            )
        return None
    text = read_regular(config, 100_000, CONFIG_NAME)
    try:
        got = json.loads(text)
    except ValueError:
        got = None
    if got != EXPECTED_CONFIG:
        shown = text.decode("utf-8", "replace").strip()
        raise ConvertError(
            f"{config}: {shown[:120]!s}; mmtui reads Megatron-Core's torch_dist checkpoints, whose {CONFIG_NAME} "
            f"is {CONFIG_TEXT}"
        )
    if not index.exists():
        raise ConvertError(f"{it_dir}: {CONFIG_NAME} says torch_dist but its index {METADATA_NAME} is missing")
    return read_index(it_dir)


def _ints(value: object, what: str, path: Path) -> tuple[int, ...]:
    if not isinstance(value, tuple | list) or not all(type(x) is int and x >= 0 for x in value):
        raise ConvertError(f"{path}: {what} is {short(value)}; expected whole numbers >= 0")
    return tuple(value)


def read_index(it_dir: Path) -> TorchDistIndex:
    path = it_dir / METADATA_NAME
    md = load_index(path)
    state, storage = md.get("state_dict_metadata"), md.get("storage_data")
    if not isinstance(state, dict) or not isinstance(storage, dict):
        raise ConvertError(f"{path}: no state_dict_metadata / storage_data tables; not a torch DCP index")
    where: dict[tuple[str, tuple[int, ...] | None], tuple[str, int, int]] = {}
    for key, info in storage.items():
        if not (isinstance(key, Record) and isinstance(info, Record)):
            raise ConvertError(f"{path}: storage_data holds {short(key)}; expected MetadataIndex -> _StorageInfo")
        fqn, offset = key.get("fqn"), key.get("offset")
        name, at, length = info.get("relative_path"), info.get("offset"), info.get("length")
        if not isinstance(fqn, str):
            raise ConvertError(f"{path}: a storage entry names {short(fqn)}; expected a tensor name")
        if info.get("transform_descriptors"):
            raise ConvertError(
                f"{path}: {fqn} is stored with transforms {info.get('transform_descriptors')}; only plain "
                "torch.save chunks are read"
            )
        if not isinstance(name, str) or not name or "/" in name or name in (".", "..") or "\\" in name:
            raise ConvertError(f"{path}: {fqn} is stored in {short(name)}; expected a file name in {it_dir}")
        if type(at) is not int or type(length) is not int or at < 0 or length <= 0:
            raise ConvertError(f"{path}: {fqn} is stored at {short(at)}, length {short(length)}; expected bytes")
        off = None if offset is None else _ints(offset, f"{fqn}'s chunk offset", path)
        where[(fqn, off)] = (name, at, length)
    tensors: dict[str, DistTensor] = {}
    objects: list[str] = []
    for fqn, meta in state.items():
        if not isinstance(fqn, str) or not isinstance(meta, Record):
            raise ConvertError(f"{path}: state_dict_metadata holds {short(fqn)}; expected names and records")
        if meta.kind.endswith(".BytesStorageMetadata"):
            objects.append(fqn)
            continue
        if not meta.kind.endswith(".TensorStorageMetadata"):
            raise ConvertError(f"{path}: {fqn} is a {meta.kind.rsplit('.', 1)[-1]}; expected a tensor or bytes")
        props = meta.get("properties")
        dtype = props.state[0] if isinstance(props, Record) and isinstance(props.state, tuple) else None
        if dtype not in STORAGES:
            raise ConvertError(f"{path}: {fqn} has dtype {short(dtype)}; supported: {', '.join(STORAGES)}")
        shape = _ints(meta.get("size"), f"{fqn}'s size", path)
        chunks = []
        for c in meta.get("chunks") or ():
            if not isinstance(c, Record):
                raise ConvertError(f"{path}: {fqn} has a chunk {short(c)}")
            off = _ints(c.get("offsets"), f"{fqn}'s chunk offsets", path)
            size = _ints(c.get("sizes"), f"{fqn}'s chunk sizes", path)
            if (
                len(off) != len(shape)
                or len(size) != len(shape)
                or any(o + s > d for o, s, d in zip(off, size, shape, strict=True))
            ):
                raise ConvertError(
                    f"{path}: {fqn} {list(shape)} has a chunk of {list(size)} at {list(off)}, outside it"
                )
            stored = where.get((fqn, off))
            if stored is None:
                raise ConvertError(f"{path}: {fqn}'s chunk at {list(off)} is stored nowhere (no storage entry)")
            chunks.append(DiskChunk(off, size, *stored))
        tensors[fqn] = DistTensor(fqn, dtype, shape, chunks)
    return TorchDistIndex(it_dir, tensors, objects)


# ---------------------------------------------------------------------------------------
# one chunk's archive inside a .distcp file


class _Window(io.RawIOBase):
    """Bytes [base, base + size) of a file, as a seekable stream (zipfile reads the archive through it)."""

    def __init__(self, fd: int, base: int, size: int) -> None:
        self.fd, self.base, self.size, self.pos = fd, base, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = max(0, pos if whence == 0 else self.pos + pos if whence == 1 else self.size + pos)
        return self.pos

    def readinto(self, b) -> int:  # type: ignore[override]
        n = max(0, min(len(b), self.size - self.pos))
        data = os.pread(self.fd, n, self.base + self.pos) if n else b""
        b[: len(data)] = data
        self.pos += len(data)
        return len(data)


def _chunk_tensor(path: Path, fd: int, file_size: int, c: DiskChunk, label: str) -> TensorMeta:
    """The chunk's tensor as a byte range of the .distcp file, after checking every number its archive gives."""
    if c.at + c.length > file_size:
        raise ConvertError(f"{path}: {label} lies at bytes {c.at}..{c.at + c.length}, past its end (truncated?)")
    try:
        with zipfile.ZipFile(io.BufferedReader(_Window(fd, c.at, c.length))) as z:
            infos = z.infolist()
    except Exception as e:  # zipfile's many ways of saying "not a zip"
        raise ConvertError(f"{path}: {label} at byte {c.at} is not a torch.save archive ({e})") from None
    records: dict[str, ZipRecord] = {}
    for info in infos:
        if info.compress_type != zipfile.ZIP_STORED:
            raise ConvertError(f"{path}: {label}: record {info.filename} is compressed")
        head = os.pread(fd, 30, c.at + info.header_offset)
        if len(head) < 30 or head[:4] != b"PK\x03\x04":
            raise ConvertError(f"{path}: {label}: broken zip record {info.filename}")
        n, extra = struct.unpack("<HH", head[26:30])
        start = c.at + info.header_offset + 30 + n + extra
        if start + info.file_size > c.at + c.length:
            raise ConvertError(f"{path}: {label}: record {info.filename} reaches past the archive")
        records[info.filename] = ZipRecord(path, f"{label}:{info.filename}", start, info.file_size, info.CRC)
    pkl = next((k for k in records if k.endswith("/data.pkl") and k.count("/") == 1), None)
    if pkl is None:
        raise ConvertError(f"{path}: {label} has no data.pkl; not a torch.save archive")
    rec = records[pkl]
    if rec.size > MAX_PICKLE_BYTES:
        raise ConvertError(f"{path}: {label}: data.pkl of {rec.size} bytes")
    rec.ensure(fd)
    value = _MetadataUnpickler(os.pread(fd, rec.size, rec.start), path).load()
    if not isinstance(value, _Tensor):
        raise ConvertError(f"{path}: {label} holds a {type(value).__name__}, not a tensor")
    return _meta(path, pkl.split("/")[0], records, label, value, label)


# ---------------------------------------------------------------------------------------
# layout and view


def torch_dist_layout(info: ModelInfo, index: TorchDistIndex) -> ParallelConfig:
    """The layout a torch_dist checkpoint is read in: TP 1, one stage, its vocabulary padding."""
    step = None
    for mp in info.preset.mappings:
        m = info.preset.module_of_target(mp.mm)
        emb = index.tensors.get(mp.mm + ".weight") if mp.pad_vocab else None
        if m.vocab and emb is not None:
            vocab, rows = info.field_int(m.vocab), emb.shape[0]
            if rows > vocab:
                fits = [d for d in (1 << k for k in range(rows.bit_length())) if -(-vocab // d) * d == rows]
                step = max(fits, default=rows)
    return one_stage(info, make_vocab_size_divisible_by=step)


Rect = tuple[int, int, int, int]


def torch_dist_view(info: ModelInfo, ckpt: MmCheckpoint, layout: ParallelConfig, field: str, forward: Plan) -> MmView:
    """The canonical tensors as blocks of the checkpoint's chunks (checked against the model's every shape)."""
    index: TorchDistIndex = ckpt.dist  # type: ignore[assignment]
    where = f"{field} {ckpt.root}"
    if layout.tp_size != 1 or layout.pp_size != 1 or layout.vpp_size != 1:
        raise ConvertError(
            f"{where}: a torch_dist checkpoint, whose tensors do not depend on a layout; leave the source "
            "parallel_config out (it is read from the disk)"
        )
    fqns = list(index.tensors)
    # each module's layers stacked, or each its own tensors (mixed dense / MoE layers)
    stacked = {m.name: not any(re.match(re.escape(m.layer_prefix) + r"\d+\.", k) for k in fqns)
               for m in info.preset.modules}  # fmt: skip
    chunker = Chunker(info, layout, field, stacked, detect_impl(info, fqns))
    reader = ChunkReader(index)
    sources: dict[str, TensorMeta] = {}
    blocks: dict[str, list[Piece]] = {}
    padding: dict[str, int] = {}
    zero_blocks: set[str] = set()
    expected: set[str] = set()
    try:
        for f in forward.files:
            for ci, chunk in enumerate(f.chunks):
                local = to_local([e.key for e in chunk])
                keys = [local.get(e.key, e.key) for e in chunk]
                names = chunker.names(keys)
                for key, e in zip(keys, chunk, strict=True):
                    if e.lora:
                        raise ConvertError(f"{where}: a torch_dist checkpoint is read as a model, not as an adapter")
                    for c in chunker.chunks(key, names[key], e.shape, (ci, f.pp_rank), f.tp_rank, f.ep_rank):
                        expected.add(c.fqn)
                        placed = place_chunk(index, reader, e, c, where, sources, blocks, padding)
                        if e.zero_fill:  # rows no source fills (a fused k bias the model lacks): checked zero
                            zero_blocks |= placed
    finally:
        reader.close()
    _check_unexpected(index, expected)
    ordered, dtypes = ordered_blocks(blocks, sources, where)
    return MmView(ckpt, layout, sources, ordered, {}, dtypes, padding, zero_blocks)


def _check_unexpected(index: TorchDistIndex, expected: set[str]) -> None:
    for fqn in index.tensors:
        if fqn not in expected and not fqn.startswith(NOT_MODEL):
            raise ConvertError(
                f"{index.directory / METADATA_NAME}: {fqn} is on disk but not in the model; is hf_config.hf_dir "
                "the model this checkpoint holds?"
            )
    for key in index.objects:
        if EXTRA_STATE not in key and not key.startswith(NOT_MODEL):
            raise ConvertError(
                f"{index.directory / METADATA_NAME}: byte entry {key} is neither a module's extra state nor "
                "training state; not a GPT model checkpoint mmtui reads"
            )


class ChunkReader:
    """Opens each .distcp file once and parses each chunk archive once."""

    def __init__(self, index: TorchDistIndex) -> None:
        self.index = index
        self.fds: dict[str, tuple[int, int]] = {}
        self.metas: dict[tuple[str, tuple[int, ...]], TensorMeta] = {}

    def meta(self, t: DistTensor, c: DiskChunk) -> TensorMeta:
        key = (t.fqn, c.offset)
        if key not in self.metas:
            if c.file not in self.fds:
                fd = open_regular(self.index.directory / c.file)
                self.fds[c.file] = (fd, os.fstat(fd).st_size)
            fd, size = self.fds[c.file]
            m = _chunk_tensor(self.index.directory / c.file, fd, size, c, f"{t.fqn}{list(c.offset)}")
            if m.dtype != t.dtype or m.shape != c.size:
                raise ConvertError(
                    f"{self.index.directory / c.file}: {t.fqn}{list(c.offset)} holds a {m.dtype} tensor of "
                    f"{list(m.shape)}; the index says {t.dtype} {list(c.size)}"
                )
            self.metas[key] = m
        return self.metas[key]

    def close(self) -> None:
        for fd, _ in self.fds.values():
            os.close(fd)
        self.fds.clear()


def place_chunk(
    index: TorchDistIndex,
    reader: ChunkReader,
    e: Entry,
    c: Chunk,
    where: str,
    sources: dict[str, TensorMeta],
    blocks: dict[str, list[Piece]],
    padding: dict[str, int],
) -> set[str]:
    """Blocks of the chunks on disk that cover the chunk `c` of forward entry `e` (canonical pieces); the names
    of the disk blocks it took."""
    t = index.tensors.get(c.fqn)
    if t is None:
        raise ConvertError(
            f"{where}: {c.fqn} is not in its index ({METADATA_NAME}); is hf_config.hf_dir the model this "
            "checkpoint holds?"
        )
    if t.shape != c.global_shape:
        raise ConvertError(
            f"{where}: {c.fqn} has shape {list(t.shape)} on disk, the model ({e.key} {list(e.shape)}) expects "
            f"{list(c.global_shape)}"
        )
    lead = len(c.shape) - len(e.shape)  # the axes megatron-core prepends (layer, expert): one index each here
    want_lo = c.offset[lead:]
    want_hi = tuple(o + s for o, s in zip(want_lo, c.shape[lead:], strict=True))
    rows_real = (e.shape[0] if e.shape else 1) - e.pad_rows
    covered: list[Rect] = []
    used: set[str] = set()
    for d in t.chunks:
        if not all(d.offset[i] <= c.offset[i] < d.offset[i] + d.size[i] for i in range(lead)):
            continue
        lo = tuple(max(a, b) for a, b in zip(want_lo, d.offset[lead:], strict=True))
        hi = tuple(min(a, b + s) for a, b, s in zip(want_hi, d.offset[lead:], d.size[lead:], strict=True))
        if any(a >= b for a, b in zip(lo, hi, strict=True)):
            continue
        if len(lo) > 2 and (lo[2:] != want_lo[2:] or hi[2:] != want_hi[2:]):
            raise ConvertError(f"{where}: {c.fqn} is chunked along dim 3 or later, which is not read")
        meta = reader.meta(t, d)
        if lead:  # this layer's (and expert's) own slice of the chunk
            blocks_in = math.prod(d.size[:lead])
            k = 0
            for i in range(lead):
                k = k * d.size[i] + c.offset[i] - d.offset[i]
            per = meta.nbytes // blocks_in
            name = f"{d.file}/{c.fqn}{list(d.offset)}" + (f"/{k}" if blocks_in > 1 else "")
            meta = TensorMeta(name, meta.dtype, d.size[lead:], meta.file, meta.begin + k * per, per, meta.record)
        else:
            meta = TensorMeta(f"{d.file}/{meta.name}", meta.dtype, meta.shape, meta.file, meta.begin, meta.nbytes,
                              meta.record)  # fmt: skip
        sources[meta.name] = meta
        used.add(meta.name)
        d_lo = d.offset[lead:]
        # the overlap in the entry's rows and columns, and in the disk chunk's
        r0, r1 = c.rows[0] + lo[0] - want_lo[0], c.rows[0] + hi[0] - want_lo[0]
        two = len(lo) >= 2
        c0, c1 = (lo[1] - want_lo[1], hi[1] - want_lo[1]) if two else (0, 1)
        dr, dc = d_lo[0] - want_lo[0] + c.rows[0], (d_lo[1] - want_lo[1]) if two else 0  # disk (0,0) in entry coords
        covered.append((r0, r1, c0, c1))
        disk_rows, width = grid(meta.shape)
        if dr + disk_rows > rows_real:  # vocabulary padding: the chunk's last rows
            padding[meta.name] = min(disk_rows, dr + disk_rows - rows_real)
        for p in e.pieces:
            pc0, pc1 = p.cols or (0, grid(e.shape)[1])  # a piece without columns spans the entry's width
            lo_r, hi_r = max(r0, p.at), min(r1, p.at + p.nrows)
            lo_c, hi_c = max(c0, p.col_at), min(c1, p.col_at + pc1 - pc0)
            if lo_r >= hi_r or lo_c >= hi_c:
                continue
            cols = (lo_c - dc, hi_c - dc)
            block = Piece(
                meta.name, (lo_r - dr, hi_r - dr), None if cols == (0, width) else cols,
                at=p.rows[0] + lo_r - p.at, col_at=pc0 + lo_c - p.col_at,
            )  # fmt: skip
            blocks.setdefault(p.source, []).append(block)
    _check_covered(c, e, covered, where)
    return used


def _check_covered(c: Chunk, e: Entry, covered: list[Rect], where: str) -> None:
    rows = c.rows[1] - c.rows[0]
    cols = grid(e.shape)[1]
    area = sum((r1 - r0) * (c1 - c0) for r0, r1, c0, c1 in covered)
    if area < rows * cols:
        raise ConvertError(
            f"{where}: {c.fqn} is not fully on disk: its chunks cover {area} of the {rows * cols} elements at "
            f"{list(c.offset)} ({list(c.shape)}); is the index complete?"
        )
    if area > rows * cols:
        raise ConvertError(f"{where}: {c.fqn} has chunks that overlap at {list(c.offset)}")
