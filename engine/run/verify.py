"""Compare two checkpoints tensor by tensor, in canonical naming, whatever their formats.

Each side is a *source view*: an HF directory gives its tensors directly; a Megatron /
MindSpeed directory gives each canonical tensor as blocks of its rank files (so a TP=2
checkpoint compares against a TP=1 one or against HF). Tensors are compared a band of
rows at a time (engine.run.execute.BAND), so memory does not grow with the largest tensor.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import ConvertError
from ..formats.mm_source import open_checkpoint
from ..formats.safetensors_header import TensorMeta
from ..layout import ParallelConfig
from ..planning.build import build_plan
from ..planning.plan import Entry, Piece, Plan, grid
from ..planning.te_names import TransformerImpl, rename_plan, resolve
from ..source.disk_layout import infer_layout
from ..source.hf_source import ModelInfo, TensorReader, inspect_hf
from ..source.mm_view import open_view
from .execute import assemble_rows, rows_per_band

if TYPE_CHECKING:
    from ..job import Job


@dataclass
class Side:
    """One checkpoint as canonical name -> blocks, with the metadata to read them."""

    label: str
    sources: dict[str, TensorMeta]
    tensors: dict[str, tuple[tuple[int, ...], str, tuple[Piece, ...]]]  # name -> (shape, dtype, pieces)


@dataclass(frozen=True)
class Row:
    name: str
    status: str  # "equal", "close", "differs", "shape", "only in A", "only in B"
    max_abs_diff: float | None = None
    detail: str = ""


def hf_side(info: ModelInfo, label: str) -> Side:
    tensors = {}
    for name, m in info.tensors.items():
        rows = m.shape[0] if m.shape else 1
        tensors[name] = (m.shape, m.dtype, (Piece(name, (0, rows)),))
    return Side(label, dict(info.tensors), tensors)


def mm_side(
    info: ModelInfo, mm_dir: Path, layout: ParallelConfig | None, label: str, impl: TransformerImpl | None = None
) -> Side:
    """A Megatron checkpoint in `layout` and `impl`'s names, or in those read from the disk when None."""
    ckpt = open_checkpoint(mm_dir, label)
    layout = layout or infer_layout(info, ckpt, label)
    impl = resolve(info, ckpt, impl, "transformer_impl", label)
    forward = rename_plan(build_plan(info, layout, iteration=ckpt.iteration), impl)
    view = open_view(info, ckpt, layout, label, forward=forward)
    tensors = {name: (info.tensors[name].shape, view.dtypes[name], blocks) for name, blocks in view.blocks.items()}
    sources = dict(view.sources)
    for name, m in info.tensors.items():  # what the way back adds from hf_dir (Qwen2.5-Omni's talker)
        if info.preset.ignore and name.startswith(tuple(info.preset.ignore)):
            tensors[name], sources[name] = (m.shape, m.dtype, (Piece(name, (0, m.shape[0] if m.shape else 1)),)), m
    return Side(label, sources, tensors)


def open_side(
    path: Path, info: ModelInfo | None, layout: ParallelConfig | None, label: str, impl: TransformerImpl | None = None
) -> Side:
    """An HF directory (config.json + safetensors) or a Megatron one (needs `info`; `layout` and `impl`, or
    the disk's)."""
    if (path / "latest_checkpointed_iteration.txt").is_file():
        if info is None:
            raise ConvertError(
                f"{label} {path}: a Megatron checkpoint; give an HF directory for its config (--hf-dir, or the "
                "other side)"
            )
        return mm_side(info, path, layout, label, impl)
    if info is not None and path.resolve() == info.hf_dir.resolve():
        return hf_side(info, label)  # already inspected
    return hf_side(inspect_hf(path, info.preset if info else None), label)


def _floats(raw: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    if dtype == "bool":
        return raw.view(np.bool_).astype(np.float32)
    return raw.view(np.dtype(dtype)).astype(np.float64 if dtype in ("float64", "int64") else np.float32)


def _bands(a: Side, b: Side, name: str, reader: TensorReader) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The tensor on both sides, the same rows at a time, about BAND bytes of the wider side."""
    (shape, da, pa), (_, db, pb) = a.tensors[name], b.tensors[name]
    ea, eb = Entry(name, shape, da, pa, ""), Entry(name, shape, db, pb, "")
    rows = grid(shape)[0]
    step = rows_per_band(max(ea.nbytes, eb.nbytes) // max(1, rows))
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        yield assemble_rows(ea, a.sources, reader, r0, r1), assemble_rows(eb, b.sources, reader, r0, r1)


def _compare_one(a: Side, b: Side, name: str, reader: TensorReader, atol: float) -> Row:
    da, db = a.tensors[name][1], b.tensors[name][1]
    equal, diff, same_nan = da == db, 0.0, True
    for xa, xb in _bands(a, b, name, reader):
        if da == db and np.array_equal(xa, xb):
            continue
        equal = False
        fa, fb = _floats(xa, da), _floats(xb, db)
        with np.errstate(invalid="ignore"):
            band = float(np.fmax.reduce(np.abs(fa - fb), axis=None)) if fa.size else 0.0  # NaN where both are NaN
        if not np.isnan(band):
            diff = max(diff, band)
        same_nan = same_nan and bool(np.array_equal(np.isnan(fa), np.isnan(fb)))
    if equal:
        return Row(name, "equal", 0.0)
    note = f"{da} vs {db}" if da != db else ""
    return Row(name, "close" if same_nan and diff <= atol else "differs", diff, note)


def compare(a: Side, b: Side, *, atol: float = 0.0) -> Iterator[Row]:
    """One row per canonical tensor, in A's order then B's extras; a band of each side in memory at a time."""
    reader = TensorReader()
    try:
        for name in a.tensors:
            if name not in b.tensors:
                yield Row(name, "only in A")
                continue
            sa, sb = a.tensors[name][0], b.tensors[name][0]
            if sa != sb:
                yield Row(name, "shape", None, f"{list(sa)} vs {list(sb)}")
                continue
            yield _compare_one(a, b, name, reader, atol)
        for name in b.tensors:
            if name not in a.tensors:
                yield Row(name, "only in B")
    finally:
        reader.close()


def identical(rows: list[Row], atol: float = 0.0) -> bool:
    """Every tensor on both sides, equal bytes and dtype (or, with atol > 0, within atol)."""
    ok = {"equal", "close"} if atol > 0 else {"equal"}
    return all(r.status in ok for r in rows)


def status_counts(rows: list[Row]) -> str:
    """ "92 equal, 2 differs": how many rows of each status, in order of first appearance."""
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.status] = counts.get(r.status, 0) + 1
    return ", ".join(f"{n} {s}" for s, n in counts.items())


def written_rows(plan: Plan, out_dir: Path) -> Iterator[Row]:
    """Each tensor of an HF plan as the plan builds it from its source (read again), against the bytes of the
    file written in `out_dir`, a band at a time: for sources only this plan can read (a DCP checkpoint)."""
    from ..formats.safetensors_header import read_header
    from .execute import bands

    reader = TensorReader()
    try:
        for f in plan.files:
            path = out_dir / f.path
            found = read_header(path) if path.is_file() else {}
            for e in f.entries:
                meta = found.get(e.key)
                if meta is None:
                    yield Row(e.key, "only in A")
                    continue
                if (meta.shape, meta.dtype) != (e.disk_shape, e.dtype):
                    said = f"{list(e.disk_shape)} {e.dtype} vs {list(meta.shape)} {meta.dtype}"
                    yield Row(e.key, "shape", None, said)
                    continue
                same = True
                with open(path, "rb") as out:
                    out.seek(meta.begin)
                    for band in bands(e, plan, reader):
                        same = same and out.read(len(band)) == bytes(band)
                yield Row(e.key, "equal" if same else "differs", 0.0 if same else None)
    finally:
        reader.close()


def verify_job(info: ModelInfo, job: Job) -> tuple[bool, str]:
    """Compare what a finished job wrote with what it read; (identical, one-line summary)."""
    from ..job import DcpToHfConfig, HfToDcpConfig, HfToMmConfig, MmToHfConfig

    cfg = job.cfg
    if getattr(cfg, "lora", None) is not None:
        raise ConvertError(f"{job.out_dir}: a LoRA was merged or converted, so it differs from its source by design")
    if isinstance(cfg, HfToDcpConfig):
        raise ConvertError(f"{job.out_dir}: verify does not read torch.distributed.checkpoint directories yet")
    if isinstance(cfg, DcpToHfConfig):  # the DCP side is read as the plan reads it; the output as written
        _, plan = cfg.plan(job)
        rows = list(written_rows(plan, job.out_dir))
        return _summary(rows)
    if isinstance(cfg, HfToMmConfig):
        a = open_side(Path(cfg.hf_config.hf_dir), info, None, "source")
        b = open_side(job.out_dir, info, cfg.parallel_config, "output", cfg.transformer_impl)
    elif isinstance(cfg, MmToHfConfig):
        a = open_side(Path(cfg.mm_dir), info, cfg.parallel_config, "source", cfg.transformer_impl)
        b = open_side(job.out_dir, info, None, "output")
    else:
        a = open_side(Path(cfg.source_dir), info, cfg.source_parallel_config, "source", cfg.source_transformer_impl)
        b = open_side(job.out_dir, info, cfg.target_parallel_config, "output", cfg.transformer_impl)
    return _summary(list(compare(a, b)))


def _summary(rows: list[Row]) -> tuple[bool, str]:
    first_bad = next((r for r in rows if r.status != "equal"), None)
    tail = f"; first: {first_bad.name} {first_bad.status}" if first_bad else ""
    ok = identical(rows)
    return ok, f"{'identical' if ok else 'different'}: {len(rows)} tensors ({status_counts(rows)}){tail}"
