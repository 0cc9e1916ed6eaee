"""Experts fused in one tensor: Qwen3-VL-MoE's `mlp.experts.gate_up_proj` [experts, in, out].

Hugging Face stores every expert of a layer in one 3-D tensor, each expert's matrix transposed
relative to `nn.Linear` (`x @ W[e]`); Megatron keeps one [out, in] `linear_fc1`/`linear_fc2` per
expert. As with FP8 and dtype casts, the source view shows what the plan needs: expert e of a
fused tensor `name` is an ordinary [out, in] tensor `name[e]` (`ExpertMeta`), so the preset's
`fused_experts` mapping is a rename with an expert index, TP and EP rules apply unchanged, and
only the byte reader transposes (a band of rows at a time). The way back writes the fused tensor
as one entry written transposed (`Entry.stored`, as grouped-GEMM weights are): the experts' [out, in]
matrices side by side, so the original file comes back byte for byte.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import ConvertError
from ..formats.safetensors_header import TensorMeta
from ..planning.experts import TransposedMeta
from ..planning.plan import Entry, Piece
from ..preset import FUSED, Mapping
from .shape_check import HIDDEN

if TYPE_CHECKING:
    from .hf_source import ModelInfo
    from .mm_view import MmView



@dataclass(frozen=True, slots=True)
class ExpertMeta(TransposedMeta):
    """Expert `expert` of the fused tensor `fused` [experts, in, out], shown as its [out, in] transpose in `dtype`
    (`raw` is that expert's stored [in, out] slab)."""

    fused: TensorMeta | None = None
    expert: int = 0


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
            at = meta.begin + e * size
            slab = TensorMeta(key, meta.dtype, (d_in, d_out), meta.file, at, size, meta.record)
            tensors[key] = ExpertMeta(
                key, meta.dtype, (d_out, d_in), meta.file, at, size, meta.record, raw=slab, fused=meta, expert=e
            )
            raw_names[key] = f"{raw}[{e}]"
    return dataclasses.replace(info, tensors=tensors, raw_names=raw_names)


def fused_entry(info: ModelInfo, view: MmView, raw: TensorMeta) -> Entry:
    """The fused tensor `raw` (canonical name) for the way back, from its experts' blocks in `view`: their [out, in]
    matrices side by side, [out, n x in], written transposed, so each expert's [in, out] follows the last."""
    n, d_in, d_out = raw.shape
    pieces: list[Piece] = []
    for e in range(n):
        blocks = view.blocks.get(f"{raw.name}[{e}]")
        if blocks is None:
            assert view.checkpoint is not None  # an HF view has every expert
            raise ConvertError(
                f"mm_dir {view.checkpoint.root}: holds no part of {info.raw_names.get(raw.name, raw.name)}[{e}]"
            )
        pieces += [Piece(p.source, p.rows, p.cols, p.at, p.col_at + e * d_in) for p in blocks]
    dtype = view.sources[pieces[0].source].dtype
    name = info.raw_names.get(raw.name, raw.name)
    return Entry(name, (d_out, n * d_in), dtype, tuple(pieces), "join · transposed", stored=raw.shape)
