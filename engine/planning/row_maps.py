"""Row maps: a target tensor, unsplit, as the concatenation along dim 0 of source row ranges.

Fusions such as grouped QKV or [gate; up] are just orders of row ranges; a TP rule then selects
rows (or columns) of that map for each rank (`tp_shards`).
"""

from __future__ import annotations

from functools import cache

from ..errors import ConvertError
from ..formats.safetensors_header import TensorMeta
from ..preset import Mapping
from ..source.hf_source import ModelInfo
from .plan import Piece

Segment = tuple[str, int, int]  # (source key, first row, row count)
ZEROS = ""  # the source of rows that are zeros (a fused bias's missing k part); never read


def row_map(mp: Mapping, srcs: list[TensorMeta], info: ModelInfo, key: str) -> list[Segment]:
    if mp.kind in ("rename", "fused_experts"):
        (s,) = srcs
        return [(s.name, 0, s.shape[0] if s.shape else 1)]
    if mp.kind in ("gate_up", "concat"):  # the sources one under the other
        return [(s.name, 0, s.shape[0]) for s in srcs]
    heads = info.field_int(mp.heads or "")
    if mp.kind == "qkv":
        q, k, v = srcs if len(srcs) == 3 else (srcs[0], None, srcs[1])  # no k: zero_k's zeros
        groups = info.field_int(mp.groups or "")
        if heads % groups or q.shape[0] % heads:
            raise ConvertError(f"{key}: {heads} heads, {groups} KV heads and {q.shape[0]} q rows do not form groups")
        d = q.shape[0] // heads
        for kv in (k, v):
            if kv is not None and kv.shape[0] != groups * d:
                raise ConvertError(
                    f"{kv.name}: {kv.shape[0]} rows, expected {groups} KV heads x head size {d} = {groups * d}"
                )
        per = heads // groups
        k_name = k.name if k is not None else ZEROS
        segs: list[Segment] = []
        for g in range(groups):
            segs += [(q.name, g * per * d, per * d), (k_name, g * d, d), (v.name, g * d, d)]
        return segs
    # qkv_per_head: one [q; k; v] source, written [q_h; k_h; v_h] for each head h
    (s,) = srcs
    rows = s.shape[0]
    if rows % (3 * heads):
        raise ConvertError(f"{s.name}: {rows} rows cannot hold q, k and v for {heads} heads")
    d = rows // (3 * heads)
    e = heads * d
    segs = []
    for h in range(heads):
        segs += [(s.name, h * d, d), (s.name, e + h * d, d), (s.name, 2 * e + h * d, d)]
    return segs


def _window(segs: list[Segment], a: int, b: int) -> list[Piece]:
    """Pieces covering rows [a, b) of the concatenated segments, adjacent ranges merged."""
    out: list[Piece] = []
    off = 0
    for src, r0, n in segs:
        lo, hi = max(a, off), min(b, off + n)
        if lo < hi:
            piece = Piece(src, (r0 + lo - off, r0 + hi - off))
            if out and out[-1].source == src and out[-1].rows[1] == piece.rows[0]:
                piece = Piece(src, (out[-1].rows[0], piece.rows[1]))
                out[-1] = piece
            else:
                out.append(piece)
        off += n
    return out


def _bounds(n: int, tp: int) -> list[int]:
    """Where each rank's share of n units starts (n at the end): the first n % tp ranks take one more."""
    q, r = divmod(n, tp)
    return [i * q + min(i, r) for i in range(tp + 1)]


def tp_shards(
    mp: Mapping, segs: list[Segment], tp: int, shape: tuple[int, ...], key: str, padded: int, heads: int
) -> list[tuple[list[Piece], str, int]]:
    """Pieces, a description and zero rows at the end for each TP rank.

    `shape` is the first source's shape; `padded` the row count after vocabulary padding
    (the rows themselves when there is none); `heads` the head count of a whole-head split.
    """
    ndim = len(shape)
    total = sum(n for _, _, n in segs)
    rule = mp.tp
    if rule == "cols" and ndim < 2:
        rule = "replicate"  # the bias of a row-parallel layer is added after the reduction
    if padded > total:
        n = padded // tp
        out = []
        for r in range(tp):
            real = max(0, min(total, (r + 1) * n) - r * n)
            how = f"rows {r + 1}/{tp} · {n - real} zero rows" if tp > 1 else f"{n - real} zero rows"
            out.append((_window(segs, r * n, r * n + real), _describe(mp, how), n - real))
        return out
    if tp == 1 or rule == "replicate":
        return [(_window(segs, 0, total), _describe(mp, "copy" if tp > 1 else ""), 0)] * tp
    if mp.head_split:
        return _split_heads(mp, segs, tp, shape, key, heads, total if rule == "rows" else shape[1])
    if rule == "rows":
        if total % tp and not mp.uneven:
            raise ConvertError(f"{key}: {total} rows cannot be split in {tp} equal TP blocks")
        b = _bounds(total, tp)
        how = "rows" if total % tp == 0 else "uneven rows"
        return [(_window(segs, b[r], b[r + 1]), _describe(mp, f"{how} {r + 1}/{tp}"), 0) for r in range(tp)]
    if rule == "gated":
        half = total // 2
        if total % 2 or half % tp:
            raise ConvertError(f"{key}: gate/up halves of {half} rows cannot be split in {tp} TP blocks")
        n = half // tp
        return [
            (
                _window(segs, r * n, (r + 1) * n) + _window(segs, half + r * n, half + (r + 1) * n),
                _describe(mp, f"gated {r + 1}/{tp}"),
                0,
            )
            for r in range(tp)
        ]
    # cols: every row piece keeps its rows and takes the rank's column block
    cols = shape[1]
    if cols % tp:
        raise ConvertError(f"{key}: {cols} columns cannot be split in {tp} equal TP blocks")
    n = cols // tp
    return [(_cut_cols(segs, total, r * n, (r + 1) * n), _describe(mp, f"cols {r + 1}/{tp}"), 0) for r in range(tp)]


def _cut_cols(segs: list[Segment], total: int, c0: int, c1: int) -> list[Piece]:
    return [Piece(p.source, p.rows, (c0, c1)) for p in _window(segs, 0, total)]


def _split_heads(
    mp: Mapping, segs: list[Segment], tp: int, shape: tuple[int, ...], key: str, heads: int, extent: int
) -> list[tuple[list[Piece], str, int]]:
    """Whole heads per rank along rows (in each of `blocks` blocks) or columns; uneven counts allowed."""
    units = heads * (mp.blocks if mp.tp == "rows" else 1)
    if extent % units:
        raise ConvertError(f"{key}: {extent} {mp.tp} do not hold {mp.blocks} x {heads} equal heads")
    if heads < tp:
        raise ConvertError(f"{key}: {heads} heads cannot give each of {tp} TP ranks a whole head")
    d, block, b = extent // units, extent // mp.blocks, _bounds(heads, tp)
    out = []
    for r in range(tp):
        h0, h1 = b[r], b[r + 1]
        how = f"heads {h0}-{h1 - 1} of {heads}" if h1 - h0 > 1 else f"head {h0} of {heads}"
        if mp.tp == "cols":
            pieces = _cut_cols(segs, sum(n for _, _, n in segs), h0 * d, h1 * d)
        else:
            pieces = [p for k in range(mp.blocks) for p in _window(segs, k * block + h0 * d, k * block + h1 * d)]
        out.append((pieces, _describe(mp, ("q,k,v " if mp.blocks == 3 else "") + how), 0))
    return out


def _describe(mp: Mapping, split: str) -> str:
    return _description(mp.kind, split)


@cache
def _description(kind: str, split: str) -> str:  # a 671B MoE plan asks 240,000 times for a few dozen texts
    fuse = {"rename": "", "qkv": "qkv grouped", "qkv_per_head": "qkv per head", "gate_up": "gate+up"}.get(kind, kind)
    fuse = "expert transposed" if kind == "fused_experts" else fuse
    return " · ".join(p for p in (fuse, split) if p) or "copy"
