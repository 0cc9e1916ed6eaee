"""Build the conversion plan: every output file, every tensor in it, and its recipe.

A target tensor is described by a *row map*: the concatenation, along dim 0, of row
ranges of source tensors (fusions such as grouped QKV or [gate; up] are just orders of
row ranges). A TP rule then selects rows (or columns) of that map for each rank. So the
plan is plain data; building it reads no tensor bytes, and the executor, the plan check
and the TUI preview all read the same structure.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ConvertError
from ..formats.safetensors_header import TensorMeta, itemsize
from ..layout import ParallelConfig, Placement, one_stage, placement, validate_layout
from ..preset import Mapping, Module
from ..source.hf_source import ModelInfo
from ..source.shape_check import check_shapes
from ..source.tie import is_tied, tie_said
from . import mtp as mtp_layers

if TYPE_CHECKING:
    from .lora import LoraPair

CKPT_NAME = "model_optim_rng.pt"
TRACKER_NAME = "latest_checkpointed_iteration.txt"
PARAMS = ("weight", "bias")


@dataclass(frozen=True, slots=True)
class Piece:
    """A block of one source tensor and where it lands in the target.

    Rows [r0, r1) of dim 0 and columns [c0, c1) of dim 1 (all columns when `cols` is
    None) of the source go to the target block starting at row `at`, column `col_at`.
    Tensors with fewer than two dims have a single column. Splitting, fusing and their
    inverses are all just lists of such blocks.
    """

    source: str
    rows: tuple[int, int]
    cols: tuple[int, int] | None = None
    at: int = 0
    col_at: int = 0

    @property
    def nrows(self) -> int:
        return self.rows[1] - self.rows[0]


def stack(pieces: Iterable[Piece]) -> tuple[Piece, ...]:
    """Place pieces one under the other, in order, starting at target row 0."""
    out, at = [], 0
    for p in pieces:
        out.append(Piece(p.source, p.rows, p.cols, at, 0))  # not dataclasses.replace: this runs per piece
        at += p.nrows
    return tuple(out)


def grid(shape: tuple[int, ...]) -> tuple[int, int]:
    """(rows, columns) of a tensor in the block model of `Piece`."""
    return (shape[0] if shape else 1), (shape[1] if len(shape) >= 2 else 1)


@dataclass(slots=True)
class Entry:
    """One tensor of an output file, assembled from blocks of source tensors.

    The last `pad_rows` rows are zeros (vocabulary padding); the pieces cover the rest,
    unless `zero_fill`: then what no piece covers is zero (an adapter's unused rank blocks).
    `lora` lists blocks of canonical tensors that carry a LoRA adapter (`Plan.lora`), in
    this entry's coordinates: their B @ A is added after assembling (engine/planning/lora.py).
    With `stored`, the tensor assembled (2-D, `shape`) is written transposed and given the
    shape `stored` (same elements): grouped-GEMM experts (engine/planning/experts.py), HF's fused experts
    (engine/source/fused_experts.py).
    """

    key: str
    shape: tuple[int, ...]
    dtype: str
    pieces: tuple[Piece, ...]
    transform: str
    pad_rows: int = 0
    lora: tuple[Piece, ...] = ()
    zero_fill: bool = False
    stored: tuple[int, ...] | None = None

    @property
    def disk_shape(self) -> tuple[int, ...]:
        """The shape written: `shape`, or `stored` for a tensor written transposed."""
        return self.shape if self.stored is None else self.stored

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * itemsize(self.dtype)

    @property
    def sources(self) -> list[str]:
        return list(dict.fromkeys(p.source for p in self.pieces))


@dataclass(slots=True)
class OutputFile:
    path: str  # relative to the output directory, e.g. "release/mp_rank_00_001/model_optim_rng.pt"
    tp_rank: int
    pp_rank: int
    ep_rank: int
    chunks: list[list[Entry]]  # one list per VPP chunk
    kind: str = "torch"  # "torch" (a Megatron rank file), "safetensors", or "dcp" (torch.distributed.checkpoint)
    metadata: dict[str, str] | None = None  # a safetensors file's __metadata__
    head: dict[str, object] = field(default_factory=dict)  # a rank file's entries before the model (args, iteration)
    empty: list[list[str]] = field(default_factory=list)  # per chunk: keys written as None (TE's `_extra_state`)

    @property
    def chunk_names(self) -> list[str]:
        return ["model"] if len(self.chunks) == 1 else [f"model{i}" for i in range(len(self.chunks))]

    @property
    def entries(self) -> list[Entry]:
        return [e for chunk in self.chunks for e in chunk]

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries)

    @property
    def numel(self) -> int:
        return sum(e.numel for e in self.entries)

    @property
    def dir_name(self) -> str:
        return self.path.split("/")[-2]

    @property
    def label(self) -> str:
        """How a person names it: the rank directory of a Megatron file, the path of an HF shard."""
        return self.path if self.kind == "safetensors" else self.dir_name


@dataclass
class Plan:
    files: list[OutputFile]
    sources: dict[str, TensorMeta]  # every tensor of the source view
    dropped: dict[str, str]  # source key -> why it is deliberately not written
    iteration: str = "release"
    notes: list[str] = field(default_factory=list)
    texts: dict[str, str] = field(default_factory=dict)  # small files written as they are (tracker, index)
    copies: dict[str, Path] = field(default_factory=dict)  # files copied unchanged (config, tokenizer)
    padding: dict[str, int] = field(default_factory=dict)  # source key -> its last rows that are padding
    lora: dict[str, LoraPair] = field(default_factory=dict)  # canonical tensor -> adapter merged into it
    lora_sources: dict[str, TensorMeta] = field(default_factory=dict)  # the adapter tensors its pieces read
    zero_blocks: set[str] = field(default_factory=set)  # sources whose unread parts are zeros by layout
    inputs: list[tuple[str, Path]] = field(default_factory=list)  # (field, directory) the job reads
    same: list[tuple[str, str, str]] = field(default_factory=list)  # (dropped copy, source written for it, what
    # they are called): checked equal before writing (engine/planning/mtp.py)

    @property
    def nbytes(self) -> int:
        return sum(f.nbytes for f in self.files)

    @property
    def tracker_text(self) -> str:
        if self.iteration == "release":
            return "release"
        return self.iteration.removeprefix("iter_").lstrip("0") or "0"


# ---------------------------------------------------------------------------------------
# row maps: the full (unsplit) target as an ordered list of source row ranges

Segment = tuple[str, int, int]  # (source key, first row, row count)
ZEROS = ""  # the source of rows that are zeros (a fused bias's missing k part); never read


def _row_map(mp: Mapping, srcs: list[TensorMeta], info: ModelInfo, key: str) -> list[Segment]:
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


def _split(
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


# ---------------------------------------------------------------------------------------
# matching the preset's mappings against the source tensors


def _pattern(name: str, bare: bool = False) -> re.Pattern[str]:
    body = re.escape(name).replace(r"\*", r"(?P<layer>\d+)").replace(r"\#", r"(?P<expert>\d+)")
    return re.compile(body + ("$" if bare else r"\.(?P<param>" + "|".join(PARAMS) + r")$"))


def _with_param(name: str, param: str) -> str:
    """A tensor name: the mapping's name plus `.weight`/`.bias`, or the name alone for a bare tensor."""
    return f"{name}.{param}" if param else name


@dataclass
class _Target:
    key: str  # global target key (layer and expert indices global)
    module: Module
    layer: int | None
    expert: int | None
    param: str  # "weight", "bias", or "" for a bare tensor
    mapping: Mapping
    sources: list[TensorMeta]
    order: tuple[int, ...]  # (module, section first/layers/last/mtp, layer, expert, mapping, param)
    mtp: bool = False  # placed with the MTP block (the module's last layer), `layer` its MTP index

    def local_key(self, layer: int | None, expert: int | None) -> str:
        """The key on its rank: layer numbered within the stage, expert within the EP rank."""
        if self.layer is None:
            return self.key
        return _with_param(_fill(self.mapping.mm, layer, expert), self.param)


def _targets(info: ModelInfo, sources: dict[str, TensorMeta], modules: list[Module]) -> tuple[list[_Target], set[str]]:
    preset = info.preset
    wanted = {m.name for m in modules}
    targets: list[_Target] = []
    claimed: set[str] = set()
    for mi, mp in enumerate(preset.mappings):
        module = preset.module_of_target(mp.mm)
        pat = _pattern(mp.hf[0], mp.bare)
        for name in sources:
            m = pat.match(name)
            if not m:
                continue
            groups = m.groupdict()
            layer = hf_layer = int(groups["layer"]) if groups.get("layer") else None
            expert = int(groups["expert"]) if groups.get("expert") else None
            param = groups.get("param") or ""
            names = [_with_param(_fill(h, hf_layer, expert), param) for h in mp.hf]
            if mp.layer_from and hf_layer is not None:
                layer = _listed_layer(info, mp.layer_from, module, hf_layer, sources[name])
            if mp.zero_k and param == "bias" and names[1] not in sources:
                names.pop(1)  # the model has no k bias: zeros in its place
            missing = [n for n in names if n not in sources]
            if missing:
                raise ConvertError(f"{info.hf_dir}: {names[0]} is present but {missing[0]} is missing")
            claimed.update(names)
            if module.name not in wanted:
                continue
            key = _with_param(_fill(mp.mm, layer, expert), param)
            mtp = mtp_layers.is_mtp_target(preset, mp.mm)  # after the decoder's last-stage tensors
            section = 3 if mtp else 1 if layer is not None else 0 if any(key.startswith(p) for p in module.first) else 2
            e = -1 if expert is None else expert
            order = (preset.modules.index(module), section, layer or 0, e, mi, PARAMS.index(param) if param else 0)
            targets.append(_Target(key, module, layer, expert, param, mp, [sources[n] for n in names], order, mtp))
    return targets, claimed


def _listed_layer(info: ModelInfo, field: str, module: Module, i: int, src: TensorMeta) -> int:
    """Entry i of the config list `field`: the layer a tensor numbered by its place in that list belongs to."""
    listed, layers = info.fields[field], info.field_int(module.layers)
    if i >= len(listed) or listed[i] >= layers:
        why = f"has {len(listed)} entries" if i >= len(listed) else f"names layer {listed[i]} of {layers}"
        raise ConvertError(
            f"{src.file}: {info.raw_names.get(src.name, src.name)} is entry {i} of "
            f"{info.field_path(field)} = {listed}, which {why}"
        )
    return listed[i]


def model_targets(info: ModelInfo) -> list[_Target]:
    """Every target tensor of the model, with its layer, expert and sources (metadata only)."""
    return _targets(info, dict(info.tensors), list(info.preset.modules))[0]


def _fill(name: str, layer: int | None, expert: int | None = None) -> str:
    if layer is not None:
        name = name.replace("*", str(layer))
    if expert is not None:
        name = name.replace("#", str(expert))
    return name


def _check_layers(info: ModelInfo, targets: list[_Target]) -> None:
    """The layer (and expert) numbers in the weights are exactly 0..N-1 for the N in config.json."""
    mtp_layers.check_numbers(info, targets)
    for m in info.preset.modules:
        layers = {t.layer for t in targets if t.module is m and t.layer is not None and not t.mtp}
        _check_numbers(info, layers, m.layers, f"{m.title.lower()} layers", "layers")
        if m.experts:
            experts = {t.expert for t in targets if t.module is m and t.expert is not None}
            _check_numbers(info, experts, m.experts, "experts", "experts")


def _check_numbers(info: ModelInfo, seen: set[int], field: str, what: str, unit: str) -> None:
    got, want = sorted(seen), info.field_int(field)
    if got and got != list(range(want)):
        raise ConvertError(
            f"{info.hf_dir}/config.json: {info.field_path(field)} = {want} but the weights hold {what} "
            f"{got[0]}..{got[-1]} ({len(got)} {unit})"
        )


def _cell_of(t: _Target, placements: dict[str, Placement]) -> tuple[int, int, int | None] | None:
    """(chunk, stage, stage-local layer index), or None when the module has no layers here."""
    pl = placements[t.module.name]
    if t.mtp:  # the MTP block sits with the module's last layer, numbered by MTP index
        return None if pl.last_cell is None else (pl.last_cell[0], pl.last_cell[1], t.layer)
    if t.layer is not None:
        return pl.locate(t.layer)
    for prefixes, cell in ((t.module.first, pl.first_cell), (t.module.last, pl.last_cell)):
        if any(t.key.startswith(p) for p in prefixes):
            if cell is None:
                return None
            return cell[0], cell[1], None
    raise ConvertError(
        f"preset {t.mapping.mm!r}: target {t.key!r} is not a layer and matches none of the "
        f"{t.module.name} module's first/last prefixes, so no stage would receive it"
    )


def build_plan(
    info: ModelInfo,
    layout: ParallelConfig,
    *,
    save_vit_only: bool = False,
    iteration: str = "release",
    megatron_args: bool = False,
) -> Plan:
    """HF model (metadata) + layout -> Plan. Reads no tensor data.

    `iteration` names the directory (`release` or `iter_0000001`); a numbered one, or
    `megatron_args`, also puts `iteration` (and Megatron-LM's `args`) in every rank file.
    """
    from .megatron_args import rank_head  # it reads this module's targets, so not imported at the top

    validate_layout(layout, info)
    preset = info.preset
    sources = info.tensors
    modules = [m for m in preset.modules if not save_vit_only or m.name == "vit"]
    targets, claimed = _targets(info, sources, modules)
    _check_layers(info, targets)
    check_shapes(info, targets)
    dropped: dict[str, str] = {}
    tied = is_tied(info)
    notes = []
    if preset.tie and tied:
        for name in preset.tie.drop:
            if name in sources:
                dropped[name] = f"{preset.tie.field} is true: the output layer is the embedding"
                targets = [t for t in targets if name not in {s.name for s in t.sources}]
                notes.append(
                    f"{tie_said(info)}, but the weights also hold {info.raw_names.get(name, name)}: it is not "
                    "written (tied, the output layer is the embedding, as transformers loads it)"
                )
        claimed |= set(preset.tie.drop) & set(sources)
    elif preset.tie:
        lm_module = preset.module_of_target(preset.tie.target)
        has_out = any(t.key == preset.tie.target for t in targets)
        if lm_module in modules and not has_out:
            out = preset.tie.drop[0] if preset.tie.drop else "output layer"
            raise ConvertError(
                f"{info.hf_dir}: {tie_said(info)}, so the output layer is its own tensor, but the weights have no "
                f"{info.raw_names.get(out, out)}, as a tied model's; set {info.preset.fields[preset.tie.field][0]} "
                "true in config.json if the model ties them"
            )
    claimed |= mtp_layers.drops(info, dropped, notes)
    ignored = [name for name in sources if name.startswith(tuple(preset.ignore))] if preset.ignore else []
    if ignored:
        claimed |= set(ignored)
        for name in ignored:
            dropped[name] = "not part of the target model (copied back from hf_dir on the way back)"
        prefixes = ", ".join(f"{p}*" for p in preset.ignore if any(n.startswith(p) for n in ignored))
        notes.append(
            f"{len(ignored)} tensors of {prefixes} are not written: {preset.title}'s Megatron model has no place for "
            "them (the way back copies them from hf_dir)"
        )
    unplaced = sorted(set(sources) - claimed)
    if unplaced:
        raise ConvertError(
            f"{sources[unplaced[0]].file}: tensor {unplaced[0]!r} matches no mapping of preset "
            f"{preset.name} ({len(unplaced)} such tensors); refusing to drop weights silently"
        )
    for name in sources:
        mod = preset.module_of_source(name)
        if mod is not None and mod not in modules:
            dropped[name] = "save_vit_only: only the vision encoder and projector are written"

    tp, pp, vpp, ep = layout.tp_world, layout.pp_size, layout.vpp_size, layout.ep_size
    placements = {m.name: placement(m.name, layout.layers_of(m.name), layout.noops_of(m.name)) for m in preset.modules}
    files = [
        OutputFile(_rank_path(iteration, r, s, pp, e, ep), r, s, e, [[] for _ in range(vpp)])
        for r in range(tp)
        for s in range(pp)
        for e in range(ep)
    ]
    by_rank = {(f.tp_rank, f.pp_rank, f.ep_rank): f for f in files}

    if preset.tie and tied and pp > 1 and preset.module_of_target(preset.tie.target) in modules:
        emb = next(t for t in targets if t.sources[0].name == preset.tie.source)
        tie = _Target(preset.tie.target, emb.module, None, None, emb.param, emb.mapping, emb.sources, (emb.order[0], 3))
        targets.append(tie)
    mtp_emb = mtp_layers.mtp_embedding(info, targets, placements)
    if mtp_emb:
        targets += mtp_emb
        notes.append(f"MTP: the MTP layers' stage also holds {mtp_emb[0].key}, a copy, as Megatron-Core builds it")
    targets.sort(key=lambda t: t.order)
    renamed = mtp_layers.renamed(preset, targets)
    for t in targets:
        cell = _cell_of(t, placements)
        if cell is None:
            continue
        c, s, local_layer = cell
        if t.expert is None:  # dense weights: the same on every expert-parallel rank
            ep_ranks, key = range(ep), renamed.get(t.key) or t.local_key(local_layer, None)
        else:
            per_rank = info.field_int(t.module.experts or "") // ep
            ep_ranks, key = [t.expert // per_rank], t.local_key(local_layer, t.expert % per_rank)
        segs = _row_map(t.mapping, t.sources, info, t.key)
        dtypes = {src.dtype for src in t.sources}
        if len(dtypes) != 1:
            raise ConvertError(f"{t.key}: its sources have different dtypes {sorted(dtypes)}")
        dtype = dtypes.pop()
        tie_note = " · tied to embedding" if preset.tie and tied and t.key == preset.tie.target else ""
        first = t.sources[0].shape
        rows = sum(n for _, _, n in segs)
        padded = layout.padded_vocab(rows) if t.mapping.pad_vocab else rows
        heads = info.field_int(t.mapping.heads) if t.mapping.head_split and t.mapping.heads else 0
        # routed experts split at their own TP size (ETP; 1: every TP rank holds whole experts); a module split at
        # a smaller TP than the world repeats its shards (MindSpeed-MM's split_by_tp)
        split_tp = layout.etp if t.expert is not None else layout.tp_of(t.module.name)
        shards = _split(t.mapping, segs, split_tp, first, t.key, padded, heads)
        for r in range(tp):
            pieces, how, pad = shards[r % split_tp]
            if t.expert is not None and split_tp < tp:
                how = f"{how} · ETP {split_tp}" if how != "copy" else f"whole · ETP {split_tp}"
            elif r >= split_tp:
                how += f" · repeats TP rank {r % split_tp}"
            shape, stacked = _shape(pieces, first, pad), stack(pieces)
            zeros = any(p.source == ZEROS for p in stacked)
            if zeros:  # the rows stay where they are; what no piece covers is written as zeros
                stacked, how = tuple(p for p in stacked if p.source != ZEROS), how + " · zero k"
            for e in ep_ranks:  # one Entry per file: retargeting a plan rewrites entries in place
                entry = Entry(key, shape, dtype, stacked, how + tie_note, pad, zero_fill=zeros)
                by_rank[(r, s, e)].chunks[c].append(entry)
    if preset.tie and tied:
        notes.append(
            "tied embeddings: output_layer.weight is written on the last LLM stage"
            if pp > 1
            else "tied embeddings: no output_layer is written with PP = 1"
        )
    if layout.grouped:
        from .experts import group_experts

        group_experts(files, layout.grouped)
    head = rank_head(info, layout, iteration, megatron_args)
    for f in files:
        f.head = head
    plan = Plan(files, dict(sources), dropped, iteration, notes)
    plan.same = mtp_layers.same_pairs(info, dropped)
    plan.texts[TRACKER_NAME] = plan.tracker_text
    return plan


def build_dcp_plan(info: ModelInfo, *, iteration: str = "release") -> Plan:
    """The whole model as one torch.distributed.checkpoint: full tensors, global layer numbers.

    DCP re-shards at load time, so the plan is the TP 1 / PP 1 layout written in DCP's format.
    """
    from ..formats.dcp_writer import DATA_NAME

    plan = build_plan(info, one_stage(info), iteration=iteration)
    (f,) = plan.files
    f.kind, f.path = "dcp", f"{iteration}/{DATA_NAME}"
    plan.notes.append("torch.distributed.checkpoint: full tensors under model.*, re-sharded by the loader")
    return plan


def _shape(pieces: list[Piece], first: tuple[int, ...], pad: int) -> tuple[int, ...]:
    """The shape a rank's pieces (of sources shaped like `first`) and zero rows make."""
    if not first:
        return ()
    rows = sum(p.rows[1] - p.rows[0] for p in pieces) + pad
    rest = list(first[1:])
    if pieces and pieces[0].cols is not None:
        rest[0] = pieces[0].cols[1] - pieces[0].cols[0]
    return (rows, *rest)


def rank_dir_name(tp_rank: int, pp_rank: int, pp: int, ep_rank: int = 0, ep: int = 1) -> str:
    """`mp_rank_TT[_PPP][_EEE]`: the PP and EP numbers only when that size is above 1 (Megatron's naming)."""
    name = f"mp_rank_{tp_rank:02d}"
    if pp > 1:
        name += f"_{pp_rank:03d}"
    if ep > 1:
        name += f"_{ep_rank:03d}"
    return name


def _rank_path(iteration: str, tp_rank: int, pp_rank: int, pp: int, ep_rank: int = 0, ep: int = 1) -> str:
    return f"{iteration}/{rank_dir_name(tp_rank, pp_rank, pp, ep_rank, ep)}/{CKPT_NAME}"


@dataclass(frozen=True)
class ModuleWeights:
    """Parameter counts of one module as the pipeline sees it: per layer, plus what rides along."""

    name: str
    layers: list[int]  # parameters of each layer
    first: int  # parameters placed with the first layer (patch embedding, word embedding)
    last: int  # parameters placed with the last layer (projector, final norm, output layer)
    lookup: int  # of `first`, parameters that are a lookup table (no matmul per token)


def module_weights(info: ModelInfo) -> list[ModuleWeights]:
    """Where each module's parameters sit, from the same mapping the plan uses (metadata only).

    A tied output layer counts on the last stage: with PP > 1 it is written there as a copy.
    """
    preset = info.preset
    targets, _ = _targets(info, dict(info.tensors), list(preset.modules))
    tied = is_tied(info)
    out = []
    for m in preset.modules:
        layers = [0] * info.field_int(m.layers)
        first = last = lookup = 0
        for t in targets:
            if t.module is not m:
                continue
            n = sum(s.numel for s in t.sources)
            if t.layer is not None and not t.mtp:
                layers[t.layer] += n
            elif any(t.key.startswith(p) for p in m.first):
                first += n
                if m.vocab:  # a module with a vocabulary starts with its embedding table
                    lookup += n
            else:
                last += n
        if tied and preset.tie and preset.module_of_target(preset.tie.target) is m:
            last += info.tensors[preset.tie.source].numel
        out.append(ModuleWeights(m.name, layers, first, last, lookup))
    return out
