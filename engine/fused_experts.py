"""Experts fused in one tensor: Qwen3-VL-MoE's `mlp.experts.gate_up_proj` [experts, in, out].

Hugging Face stores every expert of a layer in one 3-D tensor, each expert's matrix transposed
relative to `nn.Linear` (`x @ W[e]`); Megatron keeps one [out, in] `linear_fc1`/`linear_fc2` per
expert. As with FP8 and dtype casts, the source view shows what the plan needs: expert e of a
fused tensor `name` is an ordinary [out, in] tensor `name[e]` (`ExpertMeta`), so the preset's
`fused_experts` mapping is a rename with an expert index, TP and EP rules apply unchanged, and
only the byte reader transposes (a band of rows at a time). The way back writes the fused tensor
as one `TransposedEntry`: the experts' [out, in] matrices stacked, each written transposed, so the
original file comes back byte for byte.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .errors import ConvertError
from .formats.safetensors_header import TensorMeta
from .plan import Entry, Piece
from .preset import FUSED, Mapping
from .shape_check import HIDDEN

if TYPE_CHECKING:
    from .hf_source import ModelInfo, TensorReader
    from .mm_view import MmView

BAND = 4 << 20  # bytes of the fused tensor read per step


@dataclass(frozen=True, slots=True)
class ExpertMeta(TensorMeta):
    """Expert `expert` of the fused tensor `raw` [experts, in, out], shown as its [out, in] transpose in `dtype`."""

    raw: TensorMeta | None = None
    expert: int = 0


def is_expert(meta: TensorMeta) -> bool:
    return isinstance(meta, ExpertMeta)


def _fused_patterns(info: ModelInfo) -> list[tuple[re.Pattern[str], Mapping]]:
    """(pattern of the fused tensor's name, its mapping) per fused_experts mapping."""
    out = []
    for mp in info.preset.mappings:
        if mp.kind == "fused_experts":
            body = re.escape(mp.hf[0].removesuffix(FUSED)).replace(r"\*", r"\d+")
            out.append((re.compile(body + "$"), mp))
    return out


def _check(info: ModelInfo, meta: TensorMeta, mp: Mapping) -> int:
    """The expert count; the fused tensor must be [experts, in, out] with the module's width where nn.Linear has it
    (in, or out for a row-parallel `tp = "cols"` layer), so a tensor stored the other way round is one line."""
    module = info.preset.module_of_target(mp.mm)
    assert module.experts is not None  # the preset schema checks a '#' target's module counts experts
    raw = info.raw_names.get(meta.name, meta.name)
    if type(meta) is not TensorMeta:
        raise ConvertError(f"{meta.file}: {raw} is stored quantised; fused experts are read in float only")
    n, hidden = info.field_int(module.experts), HIDDEN[module.name]
    said, want = [(module.experts, n)], [str(n), "*", "*"]
    if hidden in info.fields:
        said.append((hidden, info.field_int(hidden)))
        want[2 if mp.tp == "cols" else 1] = str(info.field_int(hidden))
    if len(meta.shape) != 3 or any(w != "*" and int(w) != d for w, d in zip(want, meta.shape, strict=True)):
        fields = " and ".join(f"{info.field_path(f)} = {v}" for f, v in said)
        raise ConvertError(
            f"{meta.file}: {raw} has shape {list(meta.shape)}, but config.json says {fields}, so it must be "
            f"[{', '.join(want)}] (experts, in, out: each expert transposed relative to nn.Linear)"
        )
    return n


def split_fused_experts(info: ModelInfo) -> ModelInfo:
    """`info` with each fused experts tensor shown as one [out, in] tensor per expert; unchanged without any."""
    patterns = _fused_patterns(info)
    if not patterns:
        return info
    tensors: dict[str, TensorMeta] = {}
    raw_names = dict(info.raw_names)
    for name, meta in info.tensors.items():
        mp = next((m for pat, m in patterns if pat.match(name)), None)
        if mp is None:
            tensors[name] = meta
            continue
        raw, n = info.raw_names.get(name, name), _check(info, meta, mp)
        _, d_in, d_out = meta.shape
        size = d_in * d_out * meta.itemsize
        for e in range(n):
            key = f"{name}[{e}]"
            tensors[key] = ExpertMeta(
                key, meta.dtype, (d_out, d_in), meta.file, meta.begin + e * size, size, meta.record, raw=meta, expert=e
            )
            raw_names[key] = f"{raw}[{e}]"
    return dataclasses.replace(info, tensors=tensors, raw_names=raw_names)


def fill(reader: TensorReader, meta: ExpertMeta, r0: int, r1: int, c0: int, c1: int, dest: np.ndarray) -> None:
    """Rows [r0, r1), columns [c0, c1) of the expert's [out, in] matrix into `dest` (uint8, rows x cols x itemsize):
    rows [c0, c1) of its stored [in, out] slab, columns [r0, r1) of them, transposed (and cast, if asked)."""
    import torch

    raw = meta.raw
    assert raw is not None
    out_dim, in_dim = meta.shape
    row_bytes = out_dim * raw.itemsize  # as stored: `meta` may show the expert cast to another dtype
    slab = TensorMeta(meta.name, raw.dtype, (in_dim, out_dim), meta.file, meta.begin, in_dim * row_bytes, meta.record)
    src_t, dst_t = getattr(torch, raw.dtype), getattr(torch, meta.dtype)
    step = max(1, BAND // max(1, row_bytes))
    for a in range(c0, c1, step):
        b = min(c1, a + step)
        buf = np.empty((b - a) * row_bytes, dtype=np.uint8)
        reader.read_rows_into(slab, a, b, memoryview(buf))
        block = torch.from_numpy(buf).view(src_t).reshape(b - a, out_dim)[:, r0:r1].t().to(dst_t).contiguous()
        dest[:, a - c0 : b - c0] = block.view(torch.uint8).numpy().reshape(r1 - r0, b - a, -1)


@dataclass(slots=True)
class TransposedEntry(Entry):
    """A fused [n, in, out] tensor written from n [out, in] matrices: the pieces build them stacked
    ([n * out, in], `block_shape`), and each is written transposed."""

    @property
    def block_shape(self) -> tuple[int, ...]:
        n, d_in, d_out = self.shape
        return (n * d_out, d_in)


def fused_entry(info: ModelInfo, view: MmView, raw: TensorMeta) -> TransposedEntry:
    """The fused tensor `raw` (canonical name) for the way back, from its experts' blocks in `view`."""
    n, _, d_out = raw.shape
    pieces: list[Piece] = []
    for e in range(n):
        blocks = view.blocks.get(f"{raw.name}[{e}]")
        if blocks is None:
            assert view.checkpoint is not None  # an HF view has every expert
            raise ConvertError(
                f"mm_dir {view.checkpoint.root}: holds no part of {info.raw_names.get(raw.name, raw.name)}[{e}]"
            )
        pieces += [Piece(p.source, p.rows, p.cols, p.at + e * d_out, p.col_at) for p in blocks]
    dtype = view.sources[pieces[0].source].dtype
    return TransposedEntry(info.raw_names.get(raw.name, raw.name), raw.shape, dtype, tuple(pieces), "join · transposed")
