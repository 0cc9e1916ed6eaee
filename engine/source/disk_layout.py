"""The layout of a Megatron checkpoint, read from the disk: nobody should have to restate it.

From metadata only (directory names and the rank files' pickles, no tensor bytes):
- TP, PP and EP from the rank directory names `mp_rank_TT[_PPP][_EEE]`. A name with two
  numbers is PP with PP > 1 and EP with PP = 1; the rank files tell which: pipeline
  stages hold different keys (the embedding only on the first, the output layer only on
  the last), expert-parallel ranks the same keys.
- VPP from the chunks `model0..N` of a rank file.
- Each module's layer count per stage and chunk from the layer numbers of its keys
  (`text_decoder.decoder.layers.N.`): a stage holding local layers 0..n-1 has n. A gap in
  a stage's numbers is an empty (noop) layer, MindSpeed-LLM's `--noop-layers`; a noop at
  the end of a stage leaves no trace, and needs none: the keys and tensors are those of
  the same layout without it.
- The vocabulary padding (`make_vocab_size_divisible_by`) from the embedding's rows.
- Grouped-GEMM experts from their names (`mlp.experts.weight1`: GroupedMLP; `mlp.experts.linear_fc1.weight0`:
  TEGroupedMLP), and the experts' TP size from the columns of an expert's down projection on a rank.
The result is checked like a layout the user gives (open_view compares every key and shape).
"""

from __future__ import annotations

import re
from collections import defaultdict

from ..errors import ConvertError
from ..formats.mm_source import RANK_DIR, MmCheckpoint, read_rank_file
from ..layout import ParallelConfig
from ..planning.build import build_plan
from ..planning.experts import detect as detect_grouped
from ..planning.plan import rank_dir_name
from ..planning.targets import target_pattern
from .hf_source import ModelInfo

EMBEDDING = "embedding.word_embeddings.weight"  # Megatron's name, under every module prefix


def _numbers(name: str) -> tuple[int, ...]:
    m = RANK_DIR.match(name)
    assert m is not None
    return tuple(int(g) for g in m.groups() if g is not None)


def _signature(chunks: dict[str, dict]) -> dict[str, dict[str, tuple[int, ...]]]:
    return {c: {k: m.shape for k, m in keys.items()} for c, keys in chunks.items()}


def infer_layout(info: ModelInfo, ckpt: MmCheckpoint, field: str = "mm_dir") -> ParallelConfig:
    """The layout the checkpoint was written in, or a ConvertError naming the field the disk cannot give."""
    if ckpt.dist is not None:  # torch_dist: read as TP 1, one stage
        from ..formats.torch_dist_reader import torch_dist_layout

        return torch_dist_layout(info, ckpt.dist)
    numbers = {name: _numbers(name) for name in ckpt.ranks}
    widths = {len(n) for n in numbers.values()}
    if len(widths) != 1:
        raise ConvertError(f"{field} {ckpt.root}: rank directories of different forms ({', '.join(sorted(numbers))})")
    width = widths.pop()
    tps = sorted({n[0] for n in numbers.values()})
    read = {}

    def rank_file(name: str) -> dict[str, dict]:
        if name not in read:
            read[name] = read_rank_file(ckpt.ranks[name])
        return read[name]

    if width == 1:
        pp, ep = 1, 1
    elif width == 3:
        pp, ep = len({n[1] for n in numbers.values()}), len({n[2] for n in numbers.values()})
    else:
        second = sorted({n[1] for n in numbers.values()})
        first, other = (f"mp_rank_{tps[0]:02d}_{x:03d}" for x in second[:2])
        same = _signature(rank_file(first)) == _signature(rank_file(other))
        pp, ep = (1, len(second)) if same else (len(second), 1)
    expected = _names(len(tps), pp, ep)
    if sorted(numbers) != expected:
        missing = sorted(set(expected) - set(numbers))
        raise ConvertError(
            f"{field} {ckpt.root}: the rank directories do not form a TP x PP x EP grid "
            f"({len(tps)} x {pp} x {ep}): {', '.join(missing[:3])} missing; give parallel_config"
        )
    stages = [rank_dir_name(0, s, pp, 0, ep) for s in range(pp)]
    files = [rank_file(name) for name in stages]
    chunk_names = list(files[0])
    vpp = len(chunk_names)
    counts: dict[str, list[list[int]]] = {}
    noops: list[int] = []
    position = 0
    for m in info.preset.modules:
        prefix = re.compile(re.escape(m.layer_prefix) + r"(\d+)\.")
        cells = [[0] * pp for _ in range(vpp)]
        for c, chunk in enumerate(chunk_names):
            for s, f in enumerate(files):
                local = {int(x[1]) for k in f.get(chunk, {}) if (x := prefix.match(k))}
                cells[c][s] = max(local) + 1 if local else 0
                if m.name == "llm":
                    start = position + sum(cells[c][:s])
                    noops += [start + i for i in range(cells[c][s]) if i not in local]
            if m.name == "llm":
                position += sum(cells[c])
        counts[m.name] = cells
    for m in info.preset.modules:
        total, real = sum(map(sum, counts[m.name])), info.field_int(m.layers)
        extra = len(noops) if m.name == "llm" else 0
        if total != real + extra:
            raise ConvertError(
                f"{field} {ckpt.root}: its rank files hold {total - extra} {m.title.lower()} layers "
                f"(per stage {counts[m.name]}) but {info.field_path(m.layers)} = {real} in {info.hf_dir}/config.json; "
                f"is hf_config.hf_dir the model this checkpoint holds? (or give parallel_config.{m.name}_pp_layers)"
            )
    keys = [k for f in files for chunk in f.values() for k in chunk]
    grouped, _ = detect_grouped(keys)
    etp = _expert_tp(info, files, len(tps), ep, grouped, f"{field} {ckpt.root}")
    experts = {"moe_grouped_gemm": grouped or False, "expert_tp_size": etp}
    layers = {f"{name}_pp_layers": cells for name, cells in counts.items()}
    rest = dict(layers, ep_size=ep, noop_layers=noops or None, **experts)
    # vocabulary padding as it is at the largest TP: the planned rows divide then
    rest["make_vocab_size_divisible_by"] = _vocab_step(info, files[0], len(tps))
    sizes = _module_tp(info, files, len(tps), rest)
    layout = ParallelConfig(
        **sizes, ep_size=ep, noop_layers=noops or None,
        make_vocab_size_divisible_by=_vocab_step(info, files[0], sizes["tp_size"]),
        **experts, **layers,
    )  # fmt: skip
    return layout


_FC2 = {
    None: re.compile(r"(?:^|\.)mlp\.experts\.local_experts\.0\.linear_fc2\.weight$"),
    "te": re.compile(r"(?:^|\.)mlp\.experts\.linear_fc2\.weight0$"),
    "legacy": re.compile(r"(?:^|\.)mlp\.experts\.weight2$"),
}


def _expert_tp(
    info: ModelInfo, files: list[dict[str, dict]], tp: int, ep: int, grouped: str | None, where: str
) -> int | None:
    """The routed experts' TP size when it is not the TP size (None: it is), from one expert's down
    projection: its columns on a rank against the model's (GroupedMLP: weight2's rows per local expert)."""
    if tp == 1:
        return None
    full = None
    for mp in info.preset.mappings:
        if "#" in mp.mm and mp.tp == "cols":
            pat = target_pattern(mp.hf[0], mp.bare)
            full = next((m.shape[1] for name, m in info.tensors.items() if len(m.shape) == 2 and pat.match(name)), None)
            if full is not None:
                break
    found = next(
        ((k, m.shape) for f in files for chunk in f.values() for k, m in chunk.items() if _FC2[grouped].search(k)),
        None,
    )
    if full is None or found is None:
        return None
    key, shape = found
    local_experts = info.field_int(next(m.experts for m in info.preset.modules if m.experts)) // ep
    per_rank = shape[0] // local_experts if grouped == "legacy" else shape[1]
    if per_rank == full // tp:
        return None
    if per_rank == full:
        return 1
    raise ConvertError(
        f"{where}: {key} holds {per_rank} of an expert's {full} down-projection columns per rank: an expert TP "
        f"size of {full / max(per_rank, 1):g}; only 1 or the TP size {tp} is read"
    )


_TP_FIELDS = {"llm": "tp_size", "vit": "vit_tp_size", "audio": "audio_tp_size"}


def _module_tp(info: ModelInfo, files: list[dict[str, dict]], world: int, rest: dict) -> dict[str, int]:
    """Each module's TP size (MindSpeed-MM's vit_tp_size / audio_tp_size), from TP rank 0's shapes.

    Rank 0 holds shard 0 of every module at the module's own size, so the size is the one
    whose planned shapes match the disk. Only a model with more than one module can differ;
    the vocabulary rows are left out (their padding is read after, at the language model's size).
    """
    sizes = {"tp_size": world}
    modules = info.preset.modules
    if world == 1 or len(modules) == 1:
        return sizes
    vocab = {mp.mm for mp in info.preset.mappings if mp.pad_vocab}
    plans: dict[tuple[int, ...], dict | None] = {}

    def shapes(layout: dict[str, int]) -> dict | None:
        key = tuple(layout.values())
        if key not in plans:
            try:
                plan = build_plan(info, ParallelConfig(**layout, **rest))
            except ConvertError:
                plans[key] = None
            else:
                plans[key] = {(f.pp_rank, c): {e.key: e.shape for e in entries}
                              for f in plan.files if f.tp_rank == 0 and f.ep_rank == 0
                              for c, entries in enumerate(f.chunks)}  # fmt: skip
        return plans[key]

    chunk_names = list(files[0])
    for m in modules:
        for d in sorted((d for d in range(1, world + 1) if world % d == 0), reverse=True):
            layout = {_TP_FIELDS[n.name]: world for n in modules} | {_TP_FIELDS[m.name]: d}
            planned = shapes(layout)
            if planned is not None and all(
                planned[(s, c)].get(k) == meta.shape
                for (s, c), _ in planned.items()
                for k, meta in files[s].get(chunk_names[c], {}).items()
                if k.startswith(m.target_prefix) and not any(k.startswith(v) for v in vocab)
            ):
                if d != world:
                    sizes[_TP_FIELDS[m.name]] = d
                break
    if sizes["tp_size"] != world:  # the language model is at a smaller size: the others say the world
        for m in modules:
            sizes.setdefault(_TP_FIELDS[m.name], world)
    return sizes


def _names(tp: int, pp: int, ep: int) -> list[str]:
    return sorted(rank_dir_name(t, p, pp, e, ep) for t in range(tp) for p in range(pp) for e in range(ep))


def _vocab_step(info: ModelInfo, first_stage: dict[str, dict], tp: int) -> int | None:
    """Megatron pads every rank's embedding to the same rows: more rows than the vocabulary means padding.

    Several values of make_vocab_size_divisible_by give the same padded size (and so the same layout);
    the disk keeps only the size. The largest power of two that gives it is taken, as people choose
    (Megatron's default is 128), else the rows per rank, which always gives it.
    """
    rows = defaultdict(int)
    for chunk in first_stage.values():
        for key, meta in chunk.items():
            if key.endswith(EMBEDDING):
                rows[key] = meta.shape[0]
    for m in info.preset.modules:
        if not m.vocab or info.preset.uneven_vocab(m):
            continue
        vocab = info.field_int(m.vocab)
        for n in rows.values():
            if n * tp > vocab:
                fits = [d for d in (1 << k for k in range(n.bit_length())) if -(-vocab // (d * tp)) * d == n]
                return max(fits, default=n)
    return None
