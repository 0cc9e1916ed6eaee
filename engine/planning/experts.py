"""Grouped-GEMM layouts of the routed experts, as a rule over any MoE plan (no preset changes).

Plans are built with SequentialMLP's names, one module per local expert:
`<layer>.mlp.experts.local_experts.N.linear_fc1.weight` ([gate; up] rows of this TP rank) and
`...linear_fc2.weight` (its columns of the down projection). Megatron's grouped-GEMM experts hold
the same blocks in one of two forms:

- `te`, Megatron-Core's TEGroupedMLP (Transformer Engine's GroupedLinear): one tensor per local
  expert, `<layer>.mlp.experts.linear_fc1.weightN` / `linear_fc2.weightN`, the same blocks under
  other names (MindSpeed-LLM writes them with --moe-grouped-gemm and --transformer-impl
  transformer_engine);
- `legacy`, Megatron-Core's GroupedMLP (removed in 0.17; MindSpeed-LLM writes it with
  --moe-grouped-gemm and the local implementation): two tensors per layer. `weight1`, shape
  [hidden, E x fc1 rows], is read by GroupedMLP as `view(E, hidden, -1)`: its bytes are each local
  expert's fc1 block transposed, one after the other; `weight2`, [E x fc2 columns, hidden], is read
  as `view(E, -1, hidden)`: each expert's fc2 block transposed. So weight1's bytes are the
  transpose of [fc1_0 | fc1_1 | ...] (blocks side by side) and weight2's the transpose of
  [fc2_0 | fc2_1 | ...]: a plan entry assembles that side-by-side matrix from the experts' pieces
  and is written transposed (`Entry.stored`). Read back, a rank file's weight1 is shown as that
  matrix (`TransposedMeta`), so the way back and the re-cut are ordinary plans over it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

from ..errors import ConvertError
from ..formats.safetensors_header import TensorMeta, ViewMeta

if TYPE_CHECKING:
    from ..source.hf_source import TensorReader
    from .plan import Entry, OutputFile

Grouped = Literal["legacy", "te"]
BAND = 4 << 20  # bytes of the stored tensor mapped per step

_SEQUENTIAL = re.compile(
    r"^(?P<pre>(?:.*\.)?mlp\.experts\.)local_experts\.(?P<e>\d+)\.(?P<fc>linear_fc[12])\.(?P<param>weight|bias)$"
)
_LEGACY = re.compile(r"^(?:.*\.)?mlp\.experts\.weight[12]$")
_TE = re.compile(r"^(?:.*\.)?mlp\.experts\.linear_fc[12]\.(?:weight|bias)\d+$")
_WEIGHT = {"linear_fc1": "weight1", "linear_fc2": "weight2"}


def group_experts(files: list[OutputFile], mode: Grouped) -> None:
    """Rewrite each Megatron rank file's routed experts into the grouped layout `mode`, in place."""
    for f in files:
        if f.kind != "torch":
            continue
        for i, chunk in enumerate(f.chunks):
            f.chunks[i] = _te(chunk) if mode == "te" else _legacy(chunk, f.path)


def _te(chunk: list[Entry]) -> list[Entry]:
    for e in chunk:
        m = _SEQUENTIAL.match(e.key) if ".local_experts." in e.key else None
        if m:
            e.key = f"{m['pre']}{m['fc']}.{m['param']}{m['e']}"
    return chunk


def _legacy(chunk: list[Entry], where: str) -> list[Entry]:
    """Each layer's local experts as weight1 and weight2, placed where its first expert was."""
    groups: dict[str, dict[str, list[tuple[int, Entry]]]] = {}
    out: list[Entry | str] = []
    for e in chunk:
        m = _SEQUENTIAL.match(e.key) if ".local_experts." in e.key else None  # a 671B plan has 288k entries
        if m is None:
            out.append(e)
            continue
        if m["param"] != "weight":
            raise ConvertError(
                f"{where}: {e.key}: Megatron-Core's GroupedMLP (moe_grouped_gemm legacy) has no expert biases; "
                "use moe_grouped_gemm te or false"
            )
        if m["pre"] not in groups:
            groups[m["pre"]] = {"linear_fc1": [], "linear_fc2": []}
            out.append(m["pre"])
        groups[m["pre"]][m["fc"]].append((int(m["e"]), e))
    result: list[Entry] = []
    for item in out:
        if isinstance(item, str):
            for fc in ("linear_fc1", "linear_fc2"):
                result.append(_side_by_side(item + _WEIGHT[fc], sorted(groups[item][fc], key=lambda x: x[0]), where))
        else:
            result.append(item)
    return result


def _side_by_side(key: str, experts: list[tuple[int, Entry]], where: str) -> Entry:
    """One entry: the experts' blocks side by side ([rows, E x cols]), written transposed as `key`."""
    from .plan import Entry, Piece

    if [n for n, _ in experts] != list(range(len(experts))):
        raise ConvertError(f"{where}: {key}: local experts {[n for n, _ in experts]} are not 0..{len(experts) - 1}")
    first = experts[0][1]
    if len(first.shape) != 2 or any(e.shape != first.shape or e.dtype != first.dtype for _, e in experts):
        raise ConvertError(f"{where}: {key}: the experts' blocks differ in shape or dtype; they cannot be grouped")
    rows, cols = first.shape
    n = len(experts)
    pieces: list[Piece] = []
    lora: list[Piece] = []
    for k, e in experts:
        if e.pad_rows or e.zero_fill:
            raise ConvertError(f"{where}: {e.key}: padded or zero-filled expert blocks cannot be grouped")
        off = k * cols
        for p in e.pieces:
            pieces.append(Piece(p.source, p.rows, p.cols, p.at, p.col_at + off))
        if e.lora:  # marked after planning (engine/planning/lora.py attach), so normally none yet
            lora += [Piece(p.source, p.rows, p.cols, p.at, p.col_at + off) for p in e.lora]
    # GroupedMLP's shapes: weight1 [hidden, E x fc1 rows], weight2 [E x fc2 columns, hidden]
    stored = (cols, n * rows) if key.endswith("weight1") else (n * cols, rows)
    how = f"{n} experts, each transposed · {first.transform}"
    return Entry(key, (rows, n * cols), first.dtype, tuple(pieces), how, lora=tuple(lora), stored=stored)


def detect(keys: Iterable[str]) -> tuple[Grouped | None, str]:
    """The grouped layout a rank file's keys show (None: sequential or no experts), and the key that tells."""
    for key in keys:
        if _LEGACY.match(key):
            return "legacy", key
        if _TE.match(key):
            return "te", key
    return None, ""


def is_expert_key(key: str) -> bool:
    """A routed expert's tensor, in any of the three layouts (shared experts are not routed)."""
    return bool(_SEQUENTIAL.match(key) or _LEGACY.match(key) or _TE.match(key))


# ---------------------------------------------------------------------------------------
# reading a transposed tensor back


@dataclass(frozen=True, slots=True)
class TransposedMeta(ViewMeta):
    """A stored 2-D tensor seen as its transpose in `dtype`: `shape` is [rows, cols]; `raw` is the stored
    bytes as [cols, rows] (a grouped-GEMM weight read back, or one expert of HF's fused experts)."""

    def fill(self, reader: TensorReader, r0: int, r1: int, c0: int, c1: int, dest: np.ndarray) -> None:
        """Stored rows [c0, c1), a band at a time, their columns [r0, r1) transposed (and cast, if shown so)."""
        raw = self.raw
        assert raw is not None
        stored_cols = raw.shape[1]
        row_bytes = stored_cols * raw.itemsize
        step = max(1, BAND // max(1, row_bytes))
        for a in range(c0, c1, step):
            b = min(c1, a + step)
            if raw.dtype == self.dtype:
                with reader.mapped_rows(raw, a, b) as view:
                    src = np.frombuffer(view, dtype=np.uint8).reshape(b - a, stored_cols, -1)
                    dest[:, a - c0 : b - c0] = src[:, r0:r1].transpose(1, 0, 2)
                    del src  # the mapping closes on exit and must not be referenced then
                continue
            import torch

            buf = np.empty((b - a) * row_bytes, dtype=np.uint8)
            reader.read_rows_into(raw, a, b, memoryview(buf))
            values = torch.from_numpy(buf).view(getattr(torch, raw.dtype)).reshape(b - a, stored_cols)
            block = values[:, r0:r1].t().to(getattr(torch, self.dtype)).contiguous()
            dest[:, a - c0 : b - c0] = block.view(torch.uint8).numpy().reshape(r1 - r0, b - a, -1)


def transposed_view(meta: TensorMeta, shape: tuple[int, ...]) -> TransposedMeta:
    """`meta`'s bytes (written transposed) as the 2-D tensor `shape` they were assembled as."""
    rows, cols = shape
    raw = TensorMeta(meta.name, meta.dtype, (cols, rows), meta.file, meta.begin, meta.nbytes, meta.record)
    return TransposedMeta(meta.name, meta.dtype, shape, meta.file, meta.begin, meta.nbytes, meta.record, raw=raw)
