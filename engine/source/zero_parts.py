"""Rows a Megatron tensor holds as zeros by layout, checked to be zeros before they are dropped.

MindSpeed-MM fuses Qwen2.5-Omni's audio attention bias as [q; k; v] per head with a k part of
zeros (Whisper's k_proj has no bias). The way back (and a re-cut) gives HF only q and v, so
a k part that training made non-zero would be lost without a word: it is read and refused.
Only these small tensors are read (one bias per layer and TP rank), at planning time.
"""

from __future__ import annotations

import numpy as np

from ..errors import ConvertError
from ..planning.plan import Entry, Piece
from ..run.execute import assemble_from
from .hf_source import TensorReader
from .mm_view import MmView


def check_zero_parts(view: MmView, field: str) -> None:
    """Raise ConvertError naming the first rank-file tensor whose zero-by-layout rows are not all zero."""
    names = sorted(view.zero_blocks - view.dropped.keys())  # a repeat's data is its twin's
    if not names:
        return
    read: dict[str, list[Piece]] = {}
    for blocks in view.blocks.values():
        for p in blocks:
            if p.source in view.zero_blocks:
                read.setdefault(p.source, []).append(p)
    reader = TensorReader()
    try:
        for name in names:
            meta = view.sources[name]
            rows = meta.shape[0] if meta.shape else 1
            whole = Entry(name, meta.shape, meta.dtype, (Piece(name, (0, rows)),), "")
            data = assemble_from(whole, view.sources, reader).view(np.uint8).reshape(rows, -1)
            unread = np.ones(rows, dtype=bool)
            for p in read.get(name, []):
                unread[p.rows[0] : p.rows[1]] = False
            bad = np.flatnonzero(data[unread].any(axis=1))
            if bad.size:
                row = int(np.flatnonzero(unread)[bad[0]])
                rank, chunk, key = name.split("/", 2)
                root = view.checkpoint.root if view.checkpoint else ""
                raise ConvertError(
                    f"{field} {root}: {rank} [{chunk}] {key} row {row} is not zero; "
                    "those rows are the k part of a fused q, k, v bias the HF model does not have (no k bias), "
                    "so they must stay zero to convert back"
                )
    finally:
        reader.close()
