"""Write Megatron-Core's `torch_dist` checkpoint, streaming, from a legacy plan.

The legacy plan already says which source blocks make each rank tensor; torch_dist stores the same
tensors as chunks of global tensors (torch_dist_names.py). So the plan is re-labelled, not rebuilt: each
rank file becomes one `__R_0.distcp` holding its chunks (a gated fc1 tensor becomes its two chunks, a
replica is left to TP rank 0), and three small files join it, as megatron-core writes them:
`metadata.json`, `common.pt` (Megatron-LM's `args`, `checkpoint_version`, `iteration`, ...) and `.metadata`,
torch DCP's index of every chunk, built from torch's own dataclasses as engine/formats/dcp_writer.py does.

A chunk in a `.distcp` file is what `torch.save(chunk)` writes (a small zip), and each archive's length is a
function of its dtype and shape alone (our zip writer is deterministic and counts offsets from the archive's
own start). So `.metadata` is computed from the plan, by whichever worker writes it, without waiting for the
data files; each data file checks that it wrote exactly the lengths the index promises.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path

from ..layout import ParallelConfig
from ..planning.megatron_args import CHECKPOINT_VERSION, iteration_number, megatron_args
from ..planning.plan import TRACKER_NAME, Entry, OutputFile, Piece, Plan
from ..run.execute import FILE_MODE, bands, whole_row_spans
from ..source.hf_source import ModelInfo, TensorReader
from .dcp_index import DcpIndex
from .record_check import Record
from .torch_dist_names import (
    COMMON_NAME,
    CONFIG_NAME,
    CONFIG_TEXT,
    CONTENT_METADATA,
    METADATA_NAME,
    Chunk,
    Chunker,
)
from .torch_zip import STORAGES, StreamingCheckpointWriter

KIND = "torch_dist"  # a `.distcp` data file
KIND_INDEX = "torch_dist_index"  # `.metadata`
KIND_COMMON = "torch_dist_common"  # `common.pt`
ARCHIVE = "archive"  # the archive name torch.save gives a stream without a file name
EMPTY_EXTRA_STATE = [None]  # what megatron-core saves for a module's extra state without FP8


@dataclass(slots=True)
class ChunkEntry(Entry):
    """An Entry that is one chunk of a torch_dist global tensor (its `key` is the chunk's unique label)."""

    chunk: Chunk | None = None


def _clip(pieces: tuple[Piece, ...], a: int, b: int) -> tuple[Piece, ...]:
    """The blocks of target rows [a, b), renumbered from a."""
    out = []
    for p in pieces:
        lo, hi = max(a, p.at), min(b, p.at + p.nrows)
        if lo < hi:
            out.append(Piece(p.source, (p.rows[0] + lo - p.at, p.rows[0] + hi - p.at), p.cols, lo - a, p.col_at))
    return tuple(out)


def _chunk_entry(e: Entry, c: Chunk) -> ChunkEntry:
    rows = e.shape[0] if e.shape else 1
    whole = c.rows == (0, rows)
    pad = e.pad_rows if whole else max(0, c.rows[1] - max(c.rows[0], rows - e.pad_rows))
    shape = e.shape if whole else (c.rows[1] - c.rows[0], *e.shape[1:])
    pieces = e.pieces if whole else _clip(e.pieces, *c.rows)
    lora = e.lora if whole else _clip(e.lora, *c.rows)
    return ChunkEntry(c.label, shape, e.dtype, pieces, e.transform, pad, lora, e.zero_fill, chunk=c)


def data_file_name(rank: int) -> str:
    return f"__{rank}_0.distcp"


def to_torch_dist(plan: Plan, info: ModelInfo, layout: ParallelConfig, impl: str = "local") -> Plan:
    """The legacy plan (local names) as a torch_dist plan in the same directory (`release/` or `iter_N/`), for
    Megatron-LM's --transformer-impl `impl` (it names an MoE layer's pre-MLP norm)."""
    chunker = Chunker(info, layout, impl=impl)
    it = plan.iteration
    files: list[OutputFile] = []
    seen: set[str] = set()  # a tensor two stages hold (the MTP stage's embedding) is written once
    for f in plan.files:
        entries: list[Entry] = []
        extra: list[str] = []
        for ci, chunk in enumerate(f.chunks):
            cell = (ci, f.pp_rank)
            names = chunker.names([e.key for e in chunk])
            for e in chunk:
                for c in chunker.chunks(e.key, names[e.key], e.shape, cell, f.tp_rank, f.ep_rank):
                    if c.label not in seen:
                        seen.add(c.label)
                        entries.append(_chunk_entry(e, c))
            for key in chunker.extra_states(list(names.values()), cell, f.tp_rank, f.ep_rank):
                if key not in seen:
                    seen.add(key)
                    extra.append(key)
        if not entries and not extra:
            continue
        rank = (f.pp_rank * layout.ep_size + f.ep_rank) * layout.tp_size + f.tp_rank  # TP fastest, as Megatron
        out = OutputFile(f"{it}/{data_file_name(rank)}", f.tp_rank, f.pp_rank, f.ep_rank, [entries], KIND)
        out.empty = [extra]
        files.append(out)
    args = megatron_args(info, layout) if _is_gpt(info) else _parallel_args(layout)
    args.ckpt_format = KIND
    head = {
        "args": args,
        "checkpoint_version": CHECKPOINT_VERSION,
        "iteration": iteration_number(it),
        "num_floating_point_operations_so_far": 0,
        "content_metadata": dict(CONTENT_METADATA),
    }
    files.append(OutputFile(f"{it}/{COMMON_NAME}", 0, 0, 0, [[]], KIND_COMMON, head=head))
    files.append(OutputFile(f"{it}/{METADATA_NAME}", 0, 0, 0, [[]], KIND_INDEX))
    out_plan = replace(plan, files=files, texts={TRACKER_NAME: plan.tracker_text, f"{it}/{CONFIG_NAME}": CONFIG_TEXT})
    out_plan.notes = [
        *plan.notes,
        chunker.note(),
    ]
    return out_plan


def _is_gpt(info: ModelInfo) -> bool:
    return [m.name for m in info.preset.modules] == ["llm"] and not info.preset.modules[0].target_prefix


def _parallel_args(layout: ParallelConfig) -> argparse.Namespace:
    """A multimodal model's `args`: only the layout Megatron-LM's loader reads (the model's shape is
    MindSpeed-MM's model JSON, not Megatron-LM's arguments)."""
    ns = argparse.Namespace()
    ns.tensor_model_parallel_size = layout.tp_size
    ns.pipeline_model_parallel_size = layout.pp_size
    ns.expert_model_parallel_size = layout.ep_size
    if layout.vpp_size > 1:
        ns.virtual_pipeline_model_parallel_size = layout.vpp_size
    return ns


# ---------------------------------------------------------------------------------------
# archive lengths, without writing


class _Counter:
    """Stands for an OutFile: counts (and optionally keeps) what is written."""

    def __init__(self, keep: bool) -> None:
        self.pos = 0
        self.buf = bytearray() if keep else None

    def write(self, data: memoryview | bytes) -> int:
        view = memoryview(data).cast("B")
        if self.buf is not None:
            self.buf += view
        self.pos += len(view)
        return len(view)

    def flush_started(self) -> None:
        pass


class _MemoryArchive(StreamingCheckpointWriter):
    """The same zip writer into memory (or into nothing: only its length), for sizes and small archives."""

    def __init__(self, keep: bool) -> None:  # no file: everything goes to the counter
        self.path = Path("<memory>")
        self.prefix = ARCHIVE + "/"
        self._owns_fd = False
        self._fd = None
        self._out = _Counter(keep)  # type: ignore[assignment]
        self._start = 0
        self._entries = []
        self._next_key = 0
        self.bytes_written = 0
        self.last_crc = 0

    def add_size(self, dtype: str, shape: tuple[int, ...]) -> object:
        """A tensor record of the right length whose bytes are not produced (its CRC does not change lengths)."""
        from .torch_zip import TensorRef

        ref = TensorRef("", dtype, shape)
        nbytes = ref.numel * STORAGES[dtype][1]

        def skip() -> int:
            self._out.pos += nbytes
            return 0

        ref.key = self._data_record(nbytes, skip)
        return ref

    def _close(self) -> None:
        self._fd = None


@cache
def archive_size(dtype: str, shape: tuple[int, ...]) -> int:
    """Bytes of the archive `torch.save` of a contiguous tensor of this dtype and shape takes in a .distcp file."""
    w = _MemoryArchive(keep=False)
    w.finish(w.add_size(dtype, shape), fsync=False)
    return w._out.pos


@cache
def object_archive() -> bytes:
    """`torch.save([None])`: the bytes of a module's extra state."""
    w = _MemoryArchive(keep=True)
    w.finish(EMPTY_EXTRA_STATE, fsync=False)
    assert w._out.buf is not None
    return bytes(w._out.buf)


def _items(f: OutputFile) -> Iterator[tuple[str, int, ChunkEntry | None]]:
    """(unique key, archive length, entry or None for a byte entry) in the order the file holds them."""
    for key in f.empty[0]:
        yield key, len(object_archive()), None
    for e in f.chunks[0]:
        assert isinstance(e, ChunkEntry) and e.chunk is not None
        yield e.key, archive_size(e.dtype, e.chunk.shape), e


def data_size(f: OutputFile) -> int:
    """The bytes a `.distcp` file of the plan holds (each archive's length is known from the plan)."""
    return sum(length for _, length, _ in _items(f))


# ---------------------------------------------------------------------------------------
# the writers (engine/run/execute.py runs them per output file)


def write_data(plan: Plan, f: OutputFile, path: Path, reader: TensorReader) -> Iterator[Entry]:
    """One `.distcp` file: the extra-state byte entries, then each chunk as a torch.save archive, streamed."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    try:
        at = 0
        for key, length, e in _items(f):
            if e is None:
                data = memoryview(object_archive())
                done = 0
                while done < len(data):  # small: written whole
                    done += os.write(fd, data[done:])
                n = done
            else:
                w = StreamingCheckpointWriter(path, ARCHIVE, fd=fd)
                try:
                    confirms: list[Record] = []
                    spans = whole_row_spans(e, plan, reader, confirms=confirms)
                    assert e.chunk is not None
                    if spans is not None:
                        ref = w.add_spans(spans, e.dtype, e.chunk.shape)
                        for record in confirms:
                            record.confirm(w.last_crc)
                    else:
                        ref = w.add_chunks(bands(e, plan, reader), e.nbytes, e.dtype, e.chunk.shape)
                    w.finish(ref, fsync=False)
                except BaseException:
                    w.abort()
                    raise
                n = os.lseek(fd, 0, os.SEEK_CUR) - at
            if n != length:
                raise AssertionError(f"{path}: {key} took {n} bytes, the index says {length}")  # a bug
            at += n
            if e is not None:
                yield e
    finally:
        os.close(fd)


def write_common(plan: Plan, f: OutputFile, path: Path, reader: TensorReader) -> Iterator[Entry]:
    """`common.pt`: what megatron-core saves besides the sharded tensors (torch.save of a dict)."""
    with StreamingCheckpointWriter(path, archive_name=path.stem) as w:
        w.finish(dict(f.head), fsync=False)
    yield from ()


def write_index(plan: Plan, f: OutputFile, path: Path, reader: TensorReader) -> Iterator[Entry]:
    """`.metadata`: torch DCP's Metadata for every chunk of every data file, computed from the plan."""
    with open(path, "wb") as out:
        out.write(build_index(plan).pickled())
    yield from ()


def build_index(plan: Plan) -> DcpIndex:
    """torch DCP's index of the plan's data files: every chunk and byte entry, where it lies."""
    index = DcpIndex()
    for f in plan.files:
        if f.kind != KIND:
            continue
        name = f.path.rsplit("/", 1)[-1]
        at = 0
        for key, length, e in _items(f):
            if e is None:
                index.add_object(key, (name, at, length))
            else:
                c = e.chunk
                assert c is not None
                index.add_chunk(c.fqn, e.dtype, c.global_shape, c.offset, c.shape, (name, at, length))
            at += length
    return index


WRITERS = {KIND: write_data, KIND_COMMON: write_common, KIND_INDEX: write_index}
