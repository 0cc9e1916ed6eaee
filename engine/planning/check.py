"""Prove a plan complete before anything is written.

Every source tensor is used in full (or listed as deliberately dropped), every target
entry is exactly assembled from in-bounds pieces of the right shape and dtype, and no
key appears twice in a chunk. This is the guard against silently dropped or misplaced
weights.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Iterable

from .plan import Entry, Plan, grid

Rect = tuple[int, int, int, int]  # rows [r0, r1) x cols [c0, c1)


def _gap(n: int, spans: Iterable[tuple[int, int]]) -> tuple[int, int] | None:
    """The first stretch of [0, n) that no span covers, if any."""
    at = 0
    for a, b in sorted(spans):
        if a > at:
            return at, a
        at = max(at, b)
    return None if at >= n else (at, n)


def _uncovered(rows: int, cols: int, rects: set[Rect]) -> Rect | None:
    """A cell of the [0,rows) x [0,cols) grid that no rectangle covers, if any.

    Almost every plan cuts a tensor into bands of whole rows (or of whole columns): those take
    one sort, so a 671B model's 300,000 entries check in seconds; anything else takes the grid.
    """
    if all(c0 <= 0 and cols <= c1 for _, _, c0, c1 in rects):
        gap = _gap(rows, ((r0, r1) for r0, r1, _, _ in rects))
        return None if gap is None else (gap[0], gap[1], 0, cols)
    if all(r0 <= 0 and rows <= r1 for r0, r1, _, _ in rects):
        gap = _gap(cols, ((c0, c1) for _, _, c0, c1 in rects))
        return None if gap is None else (0, rows, gap[0], gap[1])
    rs = sorted({0, rows, *(r for a, b, _, _ in rects for r in (a, b))})
    cs = sorted({0, cols, *(c for _, _, a, b in rects for c in (a, b))})
    for r0, r1 in itertools.pairwise(rs):
        live = [x for x in rects if x[0] <= r0 and r1 <= x[1]]
        for c0, c1 in itertools.pairwise(cs):
            if not any(x[2] <= c0 and c1 <= x[3] for x in live):
                return r0, r1, c0, c1
    return None


def check_plan(plan: Plan) -> list[str]:
    """All problems found; an empty list means the plan is complete and consistent."""
    problems: list[str] = []
    used: dict[str, set[Rect]] = defaultdict(set)
    # Dense weights are the same entry in every expert-parallel rank's file, sharing one tuple of pieces
    # (640,000 entries at EP 64 for a 671B model): one that checked clean is not checked again.
    clean: set[tuple[int, tuple[int, ...], str, int, bool]] = set()
    for f in plan.files:
        for ci, chunk in enumerate(f.chunks):
            seen: set[str] = set()
            where = f"{f.path} [{f.chunk_names[ci]}]"
            for e in chunk:
                if e.key in seen:
                    problems.append(f"{where}: {e.key} appears twice")
                seen.add(e.key)
                sig = (id(e.pieces), e.shape, e.dtype, e.pad_rows, e.zero_fill)
                if sig in clean:
                    continue
                found = _check_entry(plan, e, where, used)
                if found:
                    problems += found
                else:
                    clean.add(sig)
    for name, meta in plan.sources.items():
        if name in plan.dropped:
            continue
        rows, cols = grid(meta.shape)
        if plan.padding.get(name):  # vocabulary padding: those rows are deliberately not read
            used[name].add((rows - plan.padding[name], rows, 0, cols))
        if name not in used:
            problems.append(f"source {name} is used by no output and not listed as dropped")
            continue
        if name in plan.zero_blocks:  # an adapter's unused rank blocks (checked zero when read)
            continue
        hole = _uncovered(rows, cols, used[name])
        if hole:
            problems.append(f"source {name}: rows {hole[0]}..{hole[1]}, cols {hole[2]}..{hole[3]} are written nowhere")
    return problems


def _check_entry(plan: Plan, e: Entry, where: str, used: dict[str, set[Rect]]) -> list[str]:
    """Each piece in bounds on both sides, trailing dims equal, and the pieces tile the target exactly."""
    out: list[str] = []
    trows, tcols = grid(e.shape)
    placed: set[Rect] = set()
    area = 0
    if e.pad_rows:
        if not 0 < e.pad_rows <= trows:
            out.append(f"{where}: {e.key} {list(e.shape)} has {e.pad_rows} padding rows")
        placed.add((trows - e.pad_rows, trows, 0, tcols))
        area += e.pad_rows * tcols
    for p in e.pieces:
        meta = plan.sources.get(p.source)
        if meta is None:
            return [f"{where}: {e.key} reads {p.source}, which the source does not have"]
        if meta.dtype != e.dtype:
            out.append(f"{where}: {e.key} is {e.dtype} but its source {p.source} is {meta.dtype}")
        srows, scols = grid(meta.shape)
        r0, r1 = p.rows
        c0, c1 = p.cols if p.cols else (0, scols)
        if not (0 <= r0 < r1 <= srows and 0 <= c0 < c1 <= scols):
            out.append(f"{where}: {e.key} reads rows {r0}..{r1} cols {c0}..{c1} outside {p.source} {list(meta.shape)}")
        shape = e.shape
        if tuple(meta.shape[2:]) != tuple(shape[2:]) or (len(meta.shape) >= 2) != (len(shape) >= 2):
            out.append(f"{where}: {e.key} {list(e.shape)} gets a piece of {p.source} {list(meta.shape)}")
        rect = (p.at, p.at + r1 - r0, p.col_at, p.col_at + c1 - c0)
        if min(rect[0], rect[2]) < 0 or rect[1] > trows or rect[3] > tcols:
            out.append(
                f"{where}: {e.key} {list(e.shape)} gets a block at rows {rect[0]}..{rect[1]} "
                f"cols {rect[2]}..{rect[3]}, outside it"
            )
        placed.add(rect)
        area += (r1 - r0) * (c1 - c0)
        used[p.source].add((r0, r1, c0, c1))
    if e.zero_fill:  # holes are zeros; blocks still may not overlap
        if any(_overlap(x, y) for x, y in itertools.combinations(placed, 2)) or len(placed) < len(e.pieces):
            out.append(f"{where}: {e.key} has blocks that overlap")
        return out
    hole = _uncovered(trows, tcols, placed)
    if hole:
        out.append(f"{where}: {e.key} rows {hole[0]}..{hole[1]}, cols {hole[2]}..{hole[3]} come from no source")
    elif area != trows * tcols:
        out.append(f"{where}: {e.key} has blocks that overlap")
    return out


def _overlap(x: Rect, y: Rect) -> bool:
    return x[0] < y[1] and y[0] < x[1] and x[2] < y[3] and y[2] < x[3]
