"""Run a plan: write each output file by streaming its tensors, then rename into place.

Memory does not grow with the model: whole rows are copied file to file inside the
kernel, and a tensor that must be cut or gathered (column splits, padding) is built and
handed to the streaming writer BAND bytes at a time, straight from the source bytes
those rows need.
Output goes to a temporary sibling of the target and is renamed only when complete, so
a crash or a cancel never leaves a half checkpoint under the target name.
"""

from __future__ import annotations

import contextlib
import os
import queue
import shutil
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import numpy as np

from ..errors import WriteError
from ..events import Event, FileDone, FileStarted, Finished, Notice, Progress, Started
from ..formats.dcp_writer import METADATA_NAME, DcpWriter
from ..formats.record_check import Record, read_back_problem
from ..formats.safetensors_header import TensorMeta, ViewMeta
from ..formats.safetensors_writer import SafetensorsWriter, header_bytes
from ..formats.torch_zip import StreamingCheckpointWriter
from ..planning.check import check_plan
from ..planning.mtp import check_copies
from ..planning.plan import Entry, OutputFile, Piece, Plan, grid
from ..source.hf_source import TensorReader
from .out_file import Span
from .target import DIR_MODE, WRITE_ERRNOS, check_space, claim, fsync_path, write_error

BAND = 16 << 20  # bytes of a cut or gathered tensor built at a time, per writer
TRANSPOSE_BAND = 4 << 20  # bytes of a tensor written transposed built at a time (it is built, then transposed)
FILE_MODE = 0o640
CHECKPOINT_VERSION = 3.0


def whole_row_spans(
    entry: Entry, plan: Plan, reader: TensorReader, *, confirms: list[Record] | None = None
) -> list[Span] | None:
    """The entry as byte ranges of source files laid end to end, when it is just whole rows.

    With `confirms` (a torch zip writer, which sums the CRC-32 of what it copies), an entry that is one
    whole source record is not checked before the copy: its record is put in `confirms`, to be checked
    with the writer's sum, so the bytes are summed once, not twice."""
    if entry.lora or entry.zero_fill or entry.stored is not None:
        return None  # merged, with zero blocks, or transposed: not a plain copy
    spans, at = [], 0
    for p in entry.pieces:
        meta = plan.sources[p.source]
        if isinstance(meta, ViewMeta):  # converted on the way
            return None
        if p.at != at or p.col_at or (p.cols is not None and p.cols != (0, grid(meta.shape)[1])):
            return None
        if meta.shape[1:] != entry.shape[1:]:
            return None
        whole = (
            confirms is not None and len(entry.pieces) == 1 and meta.record is not None
            and (meta.begin, meta.nbytes) == (meta.record.start, meta.record.size) and p.rows == (0, p.nrows)
            and p.nrows == grid(meta.shape)[0]
        )  # fmt: skip
        spans.append(reader.row_span(meta, *p.rows, check=not whole))
        if whole:
            assert confirms is not None and meta.record is not None
            confirms.append(meta.record)
        at += p.nrows
    return spans if not entry.pad_rows else None


def assemble(entry: Entry, plan: Plan, reader: TensorReader) -> np.ndarray:
    """The target tensor's bytes, built in one buffer from only the blocks it needs."""
    out = assemble_from(entry, plan.sources, reader)
    if entry.lora:
        add_lora(out, entry, plan, reader)
    return out


def assemble_from(entry: Entry, sources: dict[str, TensorMeta], reader: TensorReader) -> np.ndarray:
    """The whole target tensor in one buffer (LoRA, tools); the writers take `bands` instead."""
    return assemble_rows(entry, sources, reader, 0, grid(entry.shape)[0])


def assemble_rows(entry: Entry, sources: dict[str, TensorMeta], reader: TensorReader, r0: int, r1: int) -> np.ndarray:
    """Target rows [r0, r1) in a new buffer (verify reads two checkpoints band by band)."""
    rows = grid(entry.shape)[0]
    out = (np.zeros if entry.zero_fill else np.empty)((r1 - r0) * (entry.nbytes // rows if rows else 0), np.uint8)
    _fill_rows(entry, sources, reader, r0, r1, out)
    return out


def rows_per_band(row_bytes: int) -> int:
    """How many rows of `row_bytes` make about BAND bytes (at least one)."""
    return max(1, BAND // max(1, row_bytes))


def bands(entry: Entry, plan: Plan, reader: TensorReader) -> Iterator[memoryview]:
    """The entry's bytes about BAND at a time, in one reused buffer: each view is valid until the next.

    So a writer holds BAND bytes of a tensor it builds, not the tensor: a 72B model's
    down_proj gathered from TP shards is 484 MB.
    """
    if entry.stored is not None:
        yield from _transposed_bands(entry, plan, reader)
        return
    if entry.lora:  # B @ A is added on whole blocks
        yield memoryview(assemble(entry, plan, reader))
        return
    rows = grid(entry.shape)[0]
    row_bytes = entry.nbytes // rows if rows else 0
    step = rows_per_band(row_bytes)
    buf = np.empty(min(entry.nbytes, step * row_bytes), dtype=np.uint8)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        out = buf[: (r1 - r0) * row_bytes]
        if entry.zero_fill:
            out[:] = 0
        _fill_rows(entry, plan.sources, reader, r0, r1, out)
        yield memoryview(out)


def _transposed_bands(entry: Entry, plan: Plan, reader: TensorReader) -> Iterator[memoryview]:
    """An entry written transposed (grouped-GEMM experts, HF's fused experts): each band of written rows is a
    band of the assembled tensor's columns, built from the pieces that reach them and transposed, in two
    reused buffers (each view is valid until the next). Where the pieces are blocks side by side of one width
    (an expert's), a band is one block, so each piece is read in whole rows straight into place."""
    rows, cols = entry.shape
    item = entry.nbytes // max(1, rows * cols)
    if entry.lora:  # B @ A is added on whole blocks
        whole = assemble(entry, plan, reader).reshape(rows, cols, item)
        yield memoryview(np.ascontiguousarray(whole.transpose(1, 0, 2)).reshape(-1))
        return
    spans = [(p, p.cols or (0, grid(plan.sources[p.source].shape)[1])) for p in entry.pieces]
    width = min((c1 - c0 for _, (c0, c1) in spans), default=cols)
    aligned = width > 0 and cols % width == 0 and all(p.col_at // width == (p.col_at + c1 - c0 - 1) // width
                                                      for p, (c0, c1) in spans)  # fmt: skip
    step = width if aligned else max(1, min(cols, TRANSPOSE_BAND // max(1, rows * item)))
    by_band: dict[int, list[tuple[Piece, tuple[int, int]]]] = {}
    for p, (c0, c1) in spans:
        for k in range(p.col_at // step, (p.col_at + c1 - c0 - 1) // step + 1):
            by_band.setdefault(k, []).append((p, (c0, c1)))
    built, written = np.empty(rows * step * item, np.uint8), np.empty(rows * step * item, np.uint8)
    for k, a in enumerate(range(0, cols, step)):
        b = min(cols, a + step)
        pieces = []
        for p, (s0, s1) in by_band.get(k, []):
            lo, hi = max(a, p.col_at), min(b, p.col_at + s1 - s0)
            if lo < hi:
                c0 = s0 + lo - p.col_at
                pieces.append(Piece(p.source, p.rows, (c0, c0 + hi - lo), p.at, lo - a))
        band = Entry(entry.key, (rows, b - a), entry.dtype, tuple(pieces), entry.transform)
        n = rows * (b - a) * item
        _fill_rows(band, plan.sources, reader, 0, rows, built[:n])
        out = written[:n]
        out.reshape(b - a, rows, item)[...] = built[:n].reshape(rows, b - a, item).transpose(1, 0, 2)
        yield memoryview(out)


def _fill_rows(entry: Entry, sources: dict[str, TensorMeta], reader: TensorReader, r0: int, r1: int, out) -> None:
    """Target rows [r0, r1) into `out`, from only the source blocks they need (zeros already there if zero_fill)."""
    if not out.size:
        return
    rows, cols = grid(entry.shape)
    target = out.reshape(r1 - r0, cols, -1)
    pad_from = rows - entry.pad_rows
    if entry.pad_rows and r1 > pad_from:
        target[max(pad_from, r0) - r0 :] = 0
    for p in entry.pieces:
        lo, hi = max(r0, p.at), min(r1, p.at + p.nrows)  # target rows of this piece inside the band
        if lo >= hi:
            continue
        meta = sources[p.source]
        srows, scols = grid(meta.shape)
        c0, c1 = p.cols or (0, scols)
        first = p.rows[0] - p.at  # source row of target row 0
        dest = target[lo - r0 : hi - r0, p.col_at : p.col_at + c1 - c0]
        if isinstance(meta, ViewMeta):  # dequantised, cast or transposed as it is read
            meta.fill(reader, first + lo, first + hi, c0, c1, dest)
            continue
        if c1 - c0 == scols == cols:  # whole rows into whole rows: read straight into place
            reader.read_rows_into(meta, first + lo, first + hi, memoryview(dest.reshape(-1)))
            continue
        step = rows_per_band(meta.nbytes // srows)  # map at most BAND of the source at a time
        for a in range(lo, hi, step):
            b = min(hi, a + step)
            with reader.mapped_rows(meta, first + a, first + b) as view:
                src = np.frombuffer(view, dtype=np.uint8).reshape(b - a, scols, -1)
                dest[a - lo : b - lo] = src[:, c0:c1]
                del src  # the mapping closes on exit and must not be referenced then


def add_lora(out: np.ndarray, entry: Entry, plan: Plan, reader: TensorReader) -> None:
    """W' = W + scale * B @ A on each adapted block of the entry, in float32, cast back once."""
    import torch

    rows, cols = grid(entry.shape)
    dtype = getattr(torch, entry.dtype)
    target = torch.from_numpy(out).view(dtype).reshape(rows, cols)
    factors = {}  # a fused QKV entry has a block of q_proj per KV group: read its A and B once
    for p in entry.lora:
        pair = plan.lora[p.source]
        if p.source not in factors:
            factors[p.source] = [_tensor(assemble_from(x, plan.lora_sources, reader), x) for x in (pair.a, pair.b)]
        a, b = factors[p.source]
        c0, c1 = p.cols or (0, pair.a.shape[1])
        delta = b[p.rows[0] : p.rows[1]] @ a  # whole rows of A: the same sums as the reference's B @ A
        block = target[p.at : p.at + p.nrows, p.col_at : p.col_at + c1 - c0]
        # block + scale * delta in float32, in place in delta: one float32 copy of the block, not four
        block.copy_(delta[:, c0:c1].mul_(pair.scale).add_(block))


def _tensor(raw: np.ndarray, entry: Entry):
    import torch

    return torch.from_numpy(raw).view(getattr(torch, entry.dtype)).reshape(entry.shape).float()


def default_workers() -> int:
    """Files written at once: the kernel's copies and CRCs of different files run on different CPUs, and
    two per CPU keep the disk busy while one waits (TP2/PP4 on 2 CPUs: 1 -> 4.89 s, 2 -> 2.77 s, 4 -> 2.44 s)."""
    return max(1, min(4, 2 * (os.cpu_count() or 1)))


def write_files(
    plan: Plan,
    dest: Path,
    indices: Iterable[int] | None = None,
    *,
    workers: int | None = None,
    stage: Path | None = None,
) -> Iterator[Event]:
    """Write the chosen output files of `plan` under `dest`, `workers` files at a time.

    Each worker writes whole files in turn (largest first, to the least loaded worker);
    their events come out here as they happen. Closing the generator stops every worker
    after the tensor it is writing. With `stage`, each file is written there (same relative
    path, same file name, so its bytes are the same) and moved under `dest` once complete and
    synced: a file under `dest` is then always whole (a part of a split job, engine/run/parts.py).
    """
    chosen = list(range(len(plan.files))) if indices is None else list(indices)
    total = sum(plan.files[i].nbytes for i in chosen)
    yield Started(total, len(chosen))
    for i in chosen:  # directories first: workers must not race to create a shared parent
        _mkdirs(dest, (dest / plan.files[i].path).parent)
        if stage is not None:
            _mkdirs(stage, (stage / plan.files[i].path).parent)
    n = max(1, min(workers or default_workers(), len(chosen)))
    shares: list[list[int]] = [[] for _ in range(n)]
    loads = [0] * n
    for i in sorted(chosen, key=lambda i: -plan.files[i].nbytes):
        w = loads.index(min(loads))
        shares[w].append(i)
        loads[w] += plan.files[i].nbytes
    stop = threading.Event()
    streams = [_share(plan, dest, share, stop, stage) for share in shares]
    done = 0
    for item in streams[0] if n == 1 else _merged_streams(streams, stop):
        if isinstance(item, tuple):
            path, entry = item
            done += entry.nbytes
            yield Progress(done, total, path, entry.key)
        else:
            yield item


def _share(
    plan: Plan, dest: Path, share: list[int], stop: threading.Event, stage: Path | None = None
) -> Iterator[Event | tuple[str, Entry]]:
    """One worker's files, written in turn; (file path, entry) after each tensor."""
    reader = TensorReader()
    try:
        for i in share:
            f = plan.files[i]
            yield FileStarted(i, f.path, f.nbytes)
            path = (stage or dest) / f.path
            with contextlib.closing(_writer(f.kind)(plan, f, path, reader)) as entries:
                for e in entries:
                    yield f.path, e
                    if stop.is_set():
                        return  # the writer closes its file on the way out
            os.chmod(path, FILE_MODE)
            if stage is not None:
                _publish(f, stage, dest)
            yield FileDone(i, f.path)
    finally:
        reader.close()


def _publish(f: OutputFile, stage: Path, dest: Path) -> None:
    """Sync a staged file (a DCP data file with its .metadata) and move it to its place under `dest`."""
    names = [f.path] + ([str(Path(f.path).parent / METADATA_NAME)] if f.kind == "dcp" else [])
    for name in names:
        fsync_path(stage / name)
    if f.kind == "torch":  # read back whole once: what is moved in has every record's CRC-32 right
        problem = read_back_problem(stage / f.path)
        if problem is not None:
            raise WriteError(f"{stage / f.path}: {problem}: the disk did not keep what was written; run the part again")
    for name in reversed(names):  # the data file last: its presence says the file is done
        os.replace(stage / name, dest / name)


_END = object()


def _merged_streams(
    streams: list[Iterator[Event | tuple[str, Entry]]], stop: threading.Event
) -> Iterator[Event | tuple[str, Entry]]:
    """Run each stream on its own thread and pass their items on as they come."""
    items: queue.Queue = queue.Queue()

    def drain(stream: Iterator[Event | tuple[str, Entry]]) -> None:
        try:
            for item in stream:
                items.put(item)
        except BaseException as e:  # handed to the consumer, which raises it
            items.put(e)
        finally:
            items.put(_END)

    threads = [threading.Thread(target=drain, args=(s,), name=f"writer-{k}") for k, s in enumerate(streams)]
    for t in threads:
        t.start()
    try:
        running = len(threads)
        while running:
            item = items.get()
            if item is _END:
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        stop.set()
        for t in threads:
            t.join()


def _write_megatron(plan: Plan, f: OutputFile, path: Path, reader: TensorReader) -> Iterator[Entry]:
    """A rank file: {"model" or "model0".., "checkpoint_version"}, each tensor streamed into the zip."""
    with StreamingCheckpointWriter(path, archive_name=path.stem) as w:
        obj: dict[str, object] = dict(f.head)  # what the plan puts first: args, iteration
        for i, (name, chunk) in enumerate(zip(f.chunk_names, f.chunks, strict=True)):
            refs: dict[str, object] = {}
            for e in chunk:
                confirms: list[Record] = []
                spans = whole_row_spans(e, plan, reader, confirms=confirms)
                if spans is not None:  # copied inside the kernel
                    refs[e.key] = w.add_spans(spans, e.dtype, e.disk_shape)
                    for record in confirms:  # a whole source record: the copy's CRC is the record's
                        record.confirm(w.last_crc)
                else:  # built in bands after all (padding): every read of those checks its record
                    refs[e.key] = w.add_chunks(bands(e, plan, reader), e.nbytes, e.dtype, e.disk_shape)
                yield e
            for key in f.empty[i] if f.empty else ():
                refs[key] = None  # what Transformer Engine saves as an FP8-less module's extra state
            obj[name] = refs
        obj["checkpoint_version"] = CHECKPOINT_VERSION
        w.finish(obj, fsync=False)  # one sync pass at the end lets writeback overlap


def _write_safetensors(plan: Plan, f: OutputFile, path: Path, reader: TensorReader) -> Iterator[Entry]:
    """Header first (the plan fixes every offset), then each tensor in order."""
    entries = f.entries
    header = header_bytes([(e.key, e.dtype, e.disk_shape, e.nbytes) for e in entries], f.metadata)
    with SafetensorsWriter(path, header, [e.nbytes for e in entries]) as w:
        for e in entries:
            spans = whole_row_spans(e, plan, reader)
            if spans is not None:
                w.add_spans(spans)
            else:
                w.add_chunks(bands(e, plan, reader), e.nbytes)
            yield e


def _write_dcp(plan: Plan, f: OutputFile, path: Path, reader: TensorReader) -> Iterator[Entry]:
    """`path` is the DCP data file; its .metadata is written beside it at the end."""
    w = DcpWriter(path.parent)
    try:
        for e in f.entries:
            spans = whole_row_spans(e, plan, reader)
            if spans is not None:
                w.add_spans(("model", e.key), spans, e.dtype, e.disk_shape)
            else:
                w.add_chunks(("model", e.key), bands(e, plan, reader), e.nbytes, e.dtype, e.disk_shape)
            yield e
        w.add_object(("checkpoint_version",), CHECKPOINT_VERSION)
        w.finish()
        os.chmod(path.parent / METADATA_NAME, FILE_MODE)
    finally:
        w.abort()


_WRITERS = {"torch": _write_megatron, "safetensors": _write_safetensors, "dcp": _write_dcp}


def _writer(kind: str):
    """The writer of an output file's kind; engine/formats/ brings its own (importing this module)."""
    if kind in _WRITERS:
        return _WRITERS[kind]
    from ..formats.torch_dist_writer import WRITERS

    return WRITERS[kind]


def _mkdirs(root: Path, path: Path) -> None:
    missing = []
    while path != root and not path.exists():
        missing.append(path)
        path = path.parent
    for d in reversed(missing):
        d.mkdir(mode=DIR_MODE, exist_ok=True)  # parts of a split job make the same directories
        os.chmod(d, DIR_MODE)


def execute(
    plan: Plan,
    out_dir: Path | str,
    *,
    overwrite: bool = False,
    field: str = "mm_dir",
    inputs: Mapping[str, Path] | None = None,
) -> Iterator[Event]:
    """Write the whole plan into `out_dir`, atomically. Closing the generator cancels cleanly.

    `inputs` are the directories the job reads ({field: path}, besides every file the plan
    reads): the target may not be one of them, hold one or lie inside one.
    """
    problems = check_plan(plan)
    if problems:
        raise AssertionError("plan check failed:\n" + "\n".join(problems))  # a bug, not bad input
    read = [("file", Path(p)) for p in sorted(_read_files(plan))]
    given = list((inputs or {}).items()) + plan.inputs
    with claim(Path(out_dir), overwrite, field, [*given, *read]) as owned:
        for note in owned.notes:
            yield Notice(note)
        needed = plan.nbytes + sum(len(t.encode()) for t in plan.texts.values())
        needed += sum(_size(p) for p in plan.copies.values())
        check_space(needed, owned.target, field, overwrite)
        check_copies(plan)
        start = time.perf_counter()
        tmp = owned.make_tmp()
        try:
            yield from write_files(plan, tmp)
            for rel, text in plan.texts.items():
                path = tmp / rel
                path.write_text(text)
                os.chmod(path, FILE_MODE)
            for rel, src in plan.copies.items():
                shutil.copyfile(src, tmp / rel)
                os.chmod(tmp / rel, FILE_MODE)
            _fsync_tree(tmp)
            owned.commit()
        except OSError as e:
            if e.errno not in WRITE_ERRNOS:
                raise
            raise write_error(e, e.filename or owned.target, needed, owned.target.parent) from None
    yield Finished(owned.target, plan.nbytes, time.perf_counter() - start)


def _read_files(plan: Plan) -> set[str]:
    files = {str(m.file) for m in plan.sources.values()} | {str(m.file) for m in plan.lora_sources.values()}
    return files | {str(p) for p in plan.copies.values()}


def _size(path: Path) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def _fsync_tree(root: Path) -> None:
    """Make every file and directory under root durable before it is renamed into place."""
    for dirpath, _, filenames in os.walk(root, topdown=False):
        for name in filenames:
            fsync_path(Path(dirpath, name))
        fsync_path(Path(dirpath))


def run(plan: Plan, out_dir: Path | str, *, overwrite: bool = False, **kw) -> Finished:
    """Execute without watching progress; return the final event."""
    (last,) = deque(execute(plan, out_dir, overwrite=overwrite, **kw), maxlen=1)
    assert isinstance(last, Finished)
    return last
