"""A Megatron/MindSpeed checkpoint as a *source view*: full canonical tensors made of rank-file blocks.

The forward plan for the checkpoint's layout says, for every rank tensor, which block
of which canonical (HF) tensor it holds. Reading the rank files' metadata and inverting
that map gives, for every canonical tensor, the rank-file blocks that make it up. The
way back (mm_to_hf) and the re-cut (resplit) are then ordinary plans over this view.
Building it also cross-checks the layout the user gave against what is on disk.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from ..errors import ConvertError
from ..formats.mm_source import MmCheckpoint, read_rank_file
from ..formats.safetensors_header import TensorMeta
from ..layout import ParallelConfig
from ..planning.build import build_plan
from ..planning.experts import transposed_view
from ..planning.mtp import is_mtp_target
from ..planning.plan import Piece, Plan, grid
from ..preset import builtin_presets
from .hf_source import ModelInfo
from .tie import is_tied

REPLICA = "a copy of data read from another rank (TP replica or tied output layer)"


@dataclass
class MmView:
    checkpoint: MmCheckpoint | None  # None: an HF directory seen through the same interface (hf_view)
    layout: ParallelConfig
    sources: dict[str, TensorMeta]  # rank-file tensors, named "mp_rank_TT_PPP/model0/key"
    blocks: dict[str, tuple[Piece, ...]]  # canonical name -> rank-file blocks, in target order
    dropped: dict[str, str]  # rank-file tensors no canonical tensor needs
    dtypes: dict[str, str]  # canonical name -> dtype on disk
    padding: dict[str, int]  # rank-file tensor -> its last rows that are vocabulary padding
    zero_blocks: set[str] = field(default_factory=set)  # rank-file tensors whose unread parts are zeros by layout
    row_index: dict[str, tuple] = field(default_factory=dict)  # name -> block search index (_blocks_near)
    notes: list[str] = field(default_factory=list)  # worth a line to the user (carried into the plan)


def _layout_text(layout: ParallelConfig) -> str:
    lists = ", ".join(f"{m}_pp_layers={chunks}" for m, chunks in layout.given().items())
    ep = f", ep_size={layout.ep_size}" if layout.ep_size > 1 else ""
    ep += f", expert_tp_size={layout.expert_tp_size}" if layout.expert_tp_size is not None else ""
    ep += f", moe_grouped_gemm={layout.grouped}" if layout.grouped else ""
    return f"tp_size={layout.tp_size}{ep}, {lists}"


def ordered_blocks(
    blocks: dict[str, list[Piece]], sources: dict[str, TensorMeta], where: str
) -> tuple[dict[str, tuple[Piece, ...]], dict[str, str]]:
    """Each canonical tensor's blocks in row order, and its dtype: the one all its blocks share (blocks of a
    tensor in different dtypes are a broken checkpoint: one line)."""
    dtypes = {}
    for name, pieces in blocks.items():
        kinds = {sources[p.source].dtype for p in pieces}
        if len(kinds) != 1:
            raise ConvertError(f"{where}: the blocks of {name} have different dtypes {sorted(kinds)}")
        dtypes[name] = kinds.pop()
    return {name: tuple(sorted(ps, key=lambda p: (p.at, p.col_at))) for name, ps in blocks.items()}, dtypes


def open_view(
    info: ModelInfo, ckpt: MmCheckpoint, layout: ParallelConfig, field: str = "mm_dir", forward: Plan | None = None
) -> MmView:
    """Check the checkpoint on disk against `layout` and invert the layout's plan (or `forward`, a plan
    of other tensors in that layout, such as a LoRA adapter's)."""
    forward = forward or build_plan(info, layout, iteration=ckpt.iteration)
    if ckpt.dist is not None:
        from ..formats.torch_dist_reader import torch_dist_view

        return torch_dist_view(info, ckpt, layout, field, forward)
    expected = {f.dir_name: f for f in forward.files}
    missing = sorted(set(expected) - set(ckpt.ranks))
    extra = sorted(set(ckpt.ranks) - set(expected))
    if missing or extra:
        def shown(names: list[str]) -> str:
            return ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")

        if len(ckpt.ranks) == len(expected):
            what = (f"rank directories differ from the layout's: on disk {shown(sorted(ckpt.ranks))}, "
                    f"the layout names {shown(sorted(expected))}")  # fmt: skip
        else:
            what = (f"{len(ckpt.ranks)} rank directories on disk ({shown(sorted(ckpt.ranks))}), the layout "
                    f"names {len(expected)} ({shown(sorted(expected))})")  # fmt: skip
            what += f": {shown(missing)} {'is' if len(missing) == 1 else 'are'} missing" if missing else ""
        raise ConvertError(
            f"{field} {ckpt.root}: {what}; the layout ({_layout_text(layout)}) is not the one it was written in "
            "(leave the layout out to read it from the disk)"
        )
    sources: dict[str, TensorMeta] = {}
    blocks: dict[str, list[Piece]] = {}
    covered: dict[str, set[tuple[int, int, int, int]]] = {}
    kept: dict[str, bool] = {}
    padding: dict[str, int] = {}
    zero_blocks: set[str] = set()
    # MindSpeed-MM writes a tied model with PP > 1 without the output layer on the last stage;
    # it is the embedding's data, which the first stage holds, so it may be absent.
    tie = info.preset.tie
    optional = tie.target if tie and layout.pp_size > 1 and is_tied(info) else None
    without_output: list[str] = []
    for rank, f in expected.items():
        path = ckpt.ranks[rank]
        on_disk = read_rank_file(path, prefix=f.dir_name + "/")
        if list(on_disk) != f.chunk_names:
            raise ConvertError(
                f"{path}: holds {', '.join(on_disk)} but the layout ({_layout_text(layout)}) has "
                f"{len(f.chunk_names)} VPP chunk(s): {', '.join(f.chunk_names)}"
            )
        for chunk_name, entries in zip(f.chunk_names, f.chunks, strict=True):
            found = on_disk[chunk_name]
            want = {e.key for e in entries}
            extra_keys = [k for k in found if k not in want]
            if extra_keys:
                raise ConvertError(
                    f"{path} [{chunk_name}]: {extra_keys[0]} is on disk but not in the layout "
                    f"({_layout_text(layout)}); is the source layout right?{_naming_hint(info)}"
                )
            for e in entries:
                meta = found.get(e.key)
                if meta is None and e.key == optional:
                    without_output.append(rank)
                    continue
                if meta is None:
                    mtp = is_mtp_target(info.preset, e.key)
                    hint = "; written without its MTP layers? set mtp false" if mtp else ""
                    raise ConvertError(
                        f"{path} [{chunk_name}]: {e.key} is missing; the layout ({_layout_text(layout)}) "
                        f"puts it on this rank{hint}"
                    )
                if meta.shape != e.disk_shape:
                    raise ConvertError(
                        f"{path} [{chunk_name}]: {e.key} has shape {list(meta.shape)} on disk, the layout "
                        f"expects {list(e.disk_shape)}"
                    )
                if e.stored is not None:  # grouped-GEMM experts: seen as the matrix written transposed
                    meta = transposed_view(meta, e.shape)
                sources[meta.name] = meta
                kept.setdefault(meta.name, False)
                if e.zero_fill:
                    zero_blocks.add(meta.name)
                if e.pad_rows:
                    padding[meta.name] = e.pad_rows
                    kept[meta.name] = kept[meta.name] or not e.pieces  # all padding: nothing else to read
                width = grid(meta.shape)[1]
                for p in e.pieces:
                    hf_cols = grid(forward.sources[p.source].shape)[1]
                    c0, c1 = p.cols or (0, hf_cols)
                    rect = (p.rows[0], p.rows[1], c0, c1)
                    seen = covered.setdefault(p.source, set())
                    if rect in seen:
                        continue
                    seen.add(rect)
                    kept[meta.name] = True
                    mm_cols = None if (p.col_at, p.col_at + c1 - c0) == (0, width) else (p.col_at, p.col_at + c1 - c0)
                    piece = Piece(meta.name, (p.at, p.at + p.nrows), mm_cols, at=p.rows[0], col_at=c0)
                    blocks.setdefault(p.source, []).append(piece)
    ordered, dtypes = ordered_blocks(blocks, sources, f"{field} {ckpt.root}")
    dropped = {name: REPLICA for name, used in kept.items() if not used}
    view = MmView(ckpt, layout, sources, ordered, dropped, dtypes, padding, zero_blocks)
    if without_output:
        view.notes.append(
            f"tied embeddings: {len(without_output)} last-stage rank file(s) hold no {optional} "
            f"({without_output[0]}{', ...' if len(without_output) > 1 else ''}, as MindSpeed-MM writes them); "
            "it is read from the embedding, the same data"
        )
    return view


def _naming_hint(info: ModelInfo) -> str:
    """The family's other key namings, which a checkpoint may have been written in."""
    preset = info.preset
    family = [p for p in builtin_presets().values() if p.converter == preset.converter]
    others = sorted(p.naming for p in family if p.naming != preset.naming)
    return f" Or written in another naming (naming = {' or '.join(others)})?" if others else ""


def through_view(pieces: tuple[Piece, ...], view: MmView, canonical: dict[str, TensorMeta]) -> tuple[Piece, ...]:
    """Re-express pieces of canonical tensors as pieces of rank-file tensors (block intersection)."""
    out: list[Piece] = []
    for p in pieces:
        cols = grid(canonical[p.source].shape)[1]
        r0, r1 = p.rows
        c0, c1 = p.cols or (0, cols)
        for v, width, v_cols in _blocks_near(view, p.source, r0, r1):
            # the view block covers canonical rows [v.at, v.at + n) and cols [v.col_at, v.col_at + w)
            lo, hi = max(r0, v.at), min(r1, v.at + v.nrows)
            clo, chi = max(c0, v.col_at), min(c1, v.col_at + v_cols[1] - v_cols[0])
            if lo >= hi or clo >= chi:
                continue
            src_rows = (v.rows[0] + lo - v.at, v.rows[0] + hi - v.at)
            src_cols = (v_cols[0] + clo - v.col_at, v_cols[0] + chi - v.col_at)
            full = src_cols == (0, width)
            out.append(
                Piece(v.source, src_rows, None if full else src_cols, at=p.at + lo - r0, col_at=p.col_at + clo - c0)
            )
    out.sort(key=lambda q: (q.at, q.col_at))
    return tuple(_merge_rows(out))


def _blocks_near(view: MmView, name: str, r0: int, r1: int) -> list[tuple[Piece, int, tuple[int, int]]]:
    """The view blocks of `name` that may meet canonical rows [r0, r1), with their rank tensor's width.

    Blocks are sorted by first row; a per-head QKV has dozens per tensor and every target
    piece asks, so the search starts where a block could still reach r0 and stops at r1.
    """
    index = view.row_index.get(name)
    if index is None:
        blocks = view.blocks[name]
        widths = [grid(view.sources[v.source].shape)[1] for v in blocks]
        entries = [(v, w, v.cols or (0, w)) for v, w in zip(blocks, widths, strict=True)]
        index = view.row_index[name] = ([v.at for v in blocks], max(v.nrows for v in blocks), entries)
    starts, tallest, entries = index
    i = bisect.bisect_left(starts, r0 - tallest + 1)
    j = bisect.bisect_left(starts, r1, lo=i)
    return entries[i:j]


def _merge_rows(pieces: list[Piece]) -> list[Piece]:
    """Join vertically adjacent blocks of the same source (fewer, longer copies)."""
    out: list[Piece] = []
    for p in pieces:
        q = out[-1] if out else None
        if (
            q is not None
            and q.source == p.source
            and q.cols == p.cols
            and q.col_at == p.col_at
            and q.rows[1] == p.rows[0]
            and q.at + q.nrows == p.at
        ):
            out[-1] = Piece(q.source, (q.rows[0], p.rows[1]), q.cols, q.at, q.col_at)
        else:
            out.append(p)
    return out


def retarget(plan: Plan, view: MmView) -> Plan:
    """A plan over canonical tensors, turned into the same plan over the rank files."""
    canonical = plan.sources
    for f in plan.files:
        for chunk in f.chunks:
            for e in chunk:
                e.pieces = through_view(e.pieces, view, canonical)
                if not e.pieces:  # all vocabulary padding
                    continue
                kinds = {view.sources[p.source].dtype for p in e.pieces}
                if len(kinds) != 1:
                    raise ConvertError(f"{e.key}: its blocks on disk have different dtypes {sorted(kinds)}")
                e.dtype = kinds.pop()
    plan.sources = dict(view.sources)
    plan.dropped = dict(view.dropped)
    plan.padding = dict(view.padding)
    plan.same = []  # a rank file's tensors were checked when it was written
    plan.zero_blocks |= view.zero_blocks
    plan.notes.extend(view.notes)
    return plan


def hf_view(info: ModelInfo) -> MmView:
    """An HF directory as a view of itself: every canonical tensor is one block, its own file's."""
    blocks = {name: (Piece(name, (0, grid(m.shape)[0])),) for name, m in info.tensors.items()}
    dtypes = {name: m.dtype for name, m in info.tensors.items()}
    return MmView(None, ParallelConfig(llm_pp_layers=[[0]]), dict(info.tensors), blocks, {}, dtypes, {})
