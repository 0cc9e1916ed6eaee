"""The plan check's coverage test against a brute-force grid (the fast paths for row and column bands too)."""

from __future__ import annotations

import random

import pytest

from engine.planning.check import _uncovered


def naive_hole(rows: int, cols: int, rects: set[tuple[int, int, int, int]]) -> bool:
    covered = [[False] * cols for _ in range(rows)]
    for r0, r1, c0, c1 in rects:
        for r in range(max(r0, 0), min(r1, rows)):
            for c in range(max(c0, 0), min(c1, cols)):
                covered[r][c] = True
    return not all(all(row) for row in covered)


def _cell_is_hole(hole: tuple[int, int, int, int], rects: set[tuple[int, int, int, int]]) -> bool:
    r0, r1, c0, c1 = hole
    assert r0 < r1 and c0 < c1
    return not any(a <= r0 and r1 <= b and c <= c0 and c1 <= d for a, b, c, d in rects)


@pytest.mark.parametrize("shape", ["rows", "cols", "mixed"])
def test_uncovered_agrees_with_a_grid(shape: str) -> None:
    rng = random.Random(7)
    for _ in range(400):
        rows, cols = rng.randint(1, 7), rng.randint(1, 7)
        rects = set()
        for _ in range(rng.randint(0, 5)):
            a, b = sorted(rng.sample(range(rows + 1), 2))
            c, d = sorted(rng.sample(range(cols + 1), 2))
            if shape == "rows":
                c, d = 0, cols
            elif shape == "cols":
                a, b = 0, rows
            rects.add((a, b, c, d))
        hole = _uncovered(rows, cols, rects)
        assert (hole is not None) == naive_hole(rows, cols, rects), (rows, cols, rects)
        if hole is not None:
            assert _cell_is_hole(hole, rects)


def test_bands_that_touch_cover_and_a_missing_band_is_named() -> None:
    assert _uncovered(6, 4, {(0, 2, 0, 4), (2, 6, 0, 4)}) is None
    assert _uncovered(6, 4, {(0, 2, 0, 4), (3, 6, 0, 4)}) == (2, 3, 0, 4)
    assert _uncovered(6, 4, {(0, 6, 0, 1), (0, 6, 2, 4)}) == (0, 6, 1, 2)
    assert _uncovered(6, 4, {(0, 6, 0, 4), (0, 6, 0, 4)}) is None
