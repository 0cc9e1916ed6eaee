"""Build the plan: the targets matched, split by the layout's TP rule and placed on their ranks.

Reads no tensor data: HF metadata and a layout in, a `Plan` out (engine/planning/plan.py).
"""

from __future__ import annotations

from ..errors import ConvertError
from ..layout import ParallelConfig, one_stage, placement, validate_layout
from ..source.hf_source import ModelInfo
from ..source.shape_check import check_shapes
from ..source.tie import is_tied, tie_said
from . import mtp as mtp_layers
from .megatron_args import rank_head
from .plan import TRACKER_NAME, Entry, OutputFile, Piece, Plan, rank_path, stack
from .row_maps import ZEROS, row_map, tp_shards
from .targets import Target, cell_of, check_layers, match_targets


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
    validate_layout(layout, info)
    preset = info.preset
    sources = info.tensors
    modules = [m for m in preset.modules if not save_vit_only or m.name == "vit"]
    targets, claimed = match_targets(info, sources, modules)
    check_layers(info, targets)
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
        OutputFile(rank_path(iteration, r, s, pp, e, ep), r, s, e, [[] for _ in range(vpp)])
        for r in range(tp)
        for s in range(pp)
        for e in range(ep)
    ]
    by_rank = {(f.tp_rank, f.pp_rank, f.ep_rank): f for f in files}

    if preset.tie and tied and pp > 1 and preset.module_of_target(preset.tie.target) in modules:
        emb = next(t for t in targets if t.sources[0].name == preset.tie.source)
        tie = Target(preset.tie.target, emb.module, None, None, emb.param, emb.mapping, emb.sources, (emb.order[0], 3))
        targets.append(tie)
    mtp_emb = mtp_layers.mtp_embedding(info, targets, placements)
    if mtp_emb:
        targets += mtp_emb
        notes.append(f"MTP: the MTP layers' stage also holds {mtp_emb[0].key}, a copy, as Megatron-Core builds it")
    targets.sort(key=lambda t: t.order)
    renamed = mtp_layers.renamed(preset, targets)
    for t in targets:
        cell = cell_of(t, placements)
        if cell is None:
            continue
        c, s, local_layer = cell
        if t.expert is None:  # dense weights: the same on every expert-parallel rank
            ep_ranks, key = range(ep), renamed.get(t.key) or t.local_key(local_layer, None)
        else:
            per_rank = info.field_int(t.module.experts or "") // ep
            ep_ranks, key = [t.expert // per_rank], t.local_key(local_layer, t.expert % per_rank)
        segs = row_map(t.mapping, t.sources, info, t.key)
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
        shards = tp_shards(t.mapping, segs, split_tp, first, t.key, padded, heads)
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
