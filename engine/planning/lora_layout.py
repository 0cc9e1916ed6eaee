"""A LoRA adapter in Megatron/MindSpeed layout, and the way between it and PEFT, without merging.

Beside each adapted base weight `<target>.weight` a rank file holds
`<target>.lora_A.default.weight` [R, in] and `<target>.lora_B.default.weight` [out, R],
cut like the base: lora_B takes the base's rows (grouped QKV order, gate/up halves, TP
row blocks) and lora_A is whole, except beside a row-parallel (column-split) base, whose
lora_A takes the same columns and whose lora_B is whole.

A fused target has one PEFT adapter per source (q, k, v each with its own A), and
MindSpeed's LoRA has one A per module. Both are kept exactly with R = K x r, K the most
sources of any adapted target: source j's A is rows [j r, (j+1) r) of lora_A and its B
the columns [j r, (j+1) r) of its rows in lora_B, other blocks zero, so lora_B @ lora_A
is the sum of the per-source updates. Training with it in MindSpeed means
--lora-r R --lora-alpha K x alpha (same alpha / r). `lora_layout.json` beside the rank
files records this, so the way back gives the PEFT files byte for byte. An adapter
trained in MindSpeed (no such file) has one A per module: r and alpha come from the
user, and on the way back each source of a fused target gets that A and its rows of B.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

from ..errors import ConvertError
from ..formats.mm_source import MmCheckpoint, open_checkpoint, read_rank_file
from ..formats.safetensors_header import TensorMeta
from ..layout import ParallelConfig
from ..source.hf_source import ModelInfo, TensorReader
from ..source.mm_view import MmView, open_view
from .build import build_plan
from .experts import is_expert_key
from .lora import CONFIG_NAME, WEIGHTS_NAME, Adapter, LoraPair, PeftConfig, adapter_name, whole
from .plan import TRACKER_NAME, Entry, OutputFile, Piece, Plan

SIDE_NAME = "lora_layout.json"
SIDE_FORMAT = "mmtui lora layout 1"


def mm_key(base_key: str, half: str) -> str:
    return f"{base_key.removesuffix('.weight')}.lora_{half}.default.weight"


def _blocks(base: Plan, pairs: dict[str, LoraPair]) -> int:
    """K: the most sources of any base entry an adapter touches."""
    k = 1
    for f in base.files:
        for e in f.entries:
            sources = {p.source for p in e.pieces}
            if sources & pairs.keys():
                k = max(k, len(sources))
    return k


def build_adapter_plan(
    info: ModelInfo, adapter: Adapter, layout: ParallelConfig, *, shared: bool = False, iteration: str = "release"
) -> tuple[Plan, int, dict[str, str]]:
    """PEFT adapter -> its Megatron layout for `layout` (metadata only).

    Also returns K and, with `shared` (one A per target, R = r: a MindSpeed-trained
    adapter, laid out to be read back), which sources' A is another's.
    """
    base = build_plan(info, layout, iteration=iteration)
    k = 1 if shared else _blocks(base, adapter.pairs)
    aliases: dict[str, str] = {}
    for f in base.files:
        f.chunks = [[x for e in chunk for x in _lora_entries(e, adapter, k, shared, aliases)] for chunk in f.chunks]
    plan = Plan(base.files, dict(adapter.sources), {}, iteration, [])
    plan.texts[TRACKER_NAME] = plan.tracker_text
    return plan, k, aliases


def _lora_entries(e: Entry, adapter: Adapter, k: int, shared: bool, aliases: dict[str, str]) -> list[Entry]:
    order = list(dict.fromkeys(p.source for p in e.pieces))
    adapted = [s for s in order if s in adapter.pairs]
    if adapted and is_expert_key(e.key) and not e.key.endswith(".weight"):
        raise ConvertError(
            f"{e.key}: the adapter changes {adapted[0]}, but LoRA adapters are laid out for SequentialMLP experts "
            "only; write the adapter with parallel_config.moe_grouped_gemm false"
        )
    if not adapted or not e.key.endswith(".weight"):
        return []
    r = adapter.config.r
    a_pieces: list[Piece] = []
    b_pieces: list[Piece] = []
    for p in e.pieces:
        if p.source not in adapter.pairs:
            continue
        j = 0 if shared else order.index(p.source)
        b_pieces.append(Piece(adapter_name(p.source, "B"), p.rows, None, at=p.at, col_at=j * r))
        a_name = adapter_name(p.source, "A")
        if shared and p.source != adapted[0]:
            aliases[a_name] = adapter_name(adapted[0], "A")
        elif all(q.source != a_name for q in a_pieces):
            a_pieces.append(Piece(a_name, (0, r), p.cols, at=j * r))
    dtype = adapter.pairs[adapted[0]].a.dtype
    out, inp = e.shape
    how = "LoRA of " + e.key.removesuffix(".weight").rsplit(".", 1)[-1]
    a_area = sum(p.nrows * (p.cols[1] - p.cols[0] if p.cols else inp) for p in a_pieces)
    b_area = sum(p.nrows * r for p in b_pieces)
    a = Entry(mm_key(e.key, "A"), (k * r, inp), dtype, tuple(a_pieces), how, zero_fill=a_area < k * r * inp)
    b = Entry(mm_key(e.key, "B"), (out, k * r), dtype, tuple(b_pieces), how, zero_fill=b_area < out * k * r)
    return [a, b]


def peft_to_mm_plan(info: ModelInfo, adapter: Adapter, layout: ParallelConfig) -> Plan:
    """The plan that writes a PEFT adapter in Megatron layout, with lora_layout.json beside it."""
    plan, k, _ = build_adapter_plan(info, adapter, layout)
    cfg = adapter.config
    rank = k * cfg.r
    alpha = cfg.lora_alpha * (math.sqrt(k) if cfg.use_rslora else k)
    side = {
        "format": SIDE_FORMAT,
        "peft_r": cfg.r,
        "blocks_per_target": k,
        "lora_r": rank,
        "lora_alpha": alpha,
        "adapter_config": adapter.config_text,
        "peft_keys": adapter.order,
        "raw_names": adapter.raw_names,
        "metadata": adapter.metadata,
    }
    plan.texts[SIDE_NAME] = json.dumps(side, indent=2) + "\n"
    plan.notes.append(
        f"LoRA in Megatron layout: R = {rank} ({k} x r = {cfg.r}); train on in MindSpeed with "
        f"--lora-r {rank} --lora-alpha {alpha:g}" + (" --lora-use-rslora" if cfg.use_rslora else "")
    )
    return plan


def open_mm_adapter(
    info: ModelInfo,
    mm_dir: Path,
    layout: ParallelConfig,
    *,
    r: int | None = None,
    alpha: float | None = None,
    use_rslora: bool = False,
    target_modules: list[str] | None = None,
    field: str = "lora.adapter_dir",
    layout_file: bool = True,
) -> Adapter:
    """A Megatron LoRA checkpoint seen as PEFT pairs: each A and B as blocks of the rank files.

    One written by mmtui (lora_layout.json) gives back its PEFT tensors; if it was trained
    further, its zero blocks are not zero any more and it is read as any MindSpeed adapter.
    """
    ckpt = open_checkpoint(mm_dir, field)
    side_path = ckpt.root / SIDE_NAME
    side = json.loads(side_path.read_text()) if layout_file and side_path.is_file() else None
    if side is not None and side.get("format") != SIDE_FORMAT:
        raise ConvertError(f"{side_path}: format {side.get('format')!r} is not {SIDE_FORMAT!r}")
    if side is not None:
        config_text = side["adapter_config"]
        cfg = PeftConfig.model_validate(json.loads(config_text))
        raw_names = dict(side["raw_names"])
        bases = _in_file_order(info, {name.rsplit(".lora_", 1)[0] + ".weight" for name in raw_names})
        order = list(side["peft_keys"])
        metadata = side.get("metadata")
    else:
        if r is None or alpha is None:
            raise ConvertError(
                f"{field} {mm_dir}: a Megatron LoRA checkpoint not written by mmtui; give lora.r and lora.alpha "
                "(the --lora-r and --lora-alpha it was trained with)"
            )
        base_plan = build_plan(info, layout, iteration=ckpt.iteration)
        bases = _in_file_order(info, _trained_targets(base_plan, ckpt, target_modules, field))
        modules = sorted({b.removesuffix(".weight").rsplit(".", 1)[-1] for b in bases})
        cfg = PeftConfig(r=r, lora_alpha=alpha, use_rslora=use_rslora, target_modules=modules)
        config_text = json.dumps(_peft_config_dict(cfg, info), indent=2)
        raw_names = {
            adapter_name(b, h): f"base_model.model.{info.raw_names.get(b, b).removesuffix('.weight')}.lora_{h}.weight"
            for b in bases
            for h in "AB"
        }
        order = [raw_names[adapter_name(b, h)] for b in bases for h in "AB"]
        metadata = {"format": "pt"}
    synthetic = _synthetic(info, bases, cfg)
    forward, _, aliases = build_adapter_plan(info, synthetic, layout, shared=side is None, iteration=ckpt.iteration)
    view = open_view(info, ckpt, layout, field, forward=forward)
    pairs = {}
    for base in bases:
        a_name, b_name = adapter_name(base, "A"), adapter_name(base, "B")
        a_blocks = view.blocks[aliases.get(a_name, a_name)]
        a_dtype = view.dtypes[aliases.get(a_name, a_name)]
        a = Entry(a_name, synthetic.sources[a_name].shape, a_dtype, a_blocks, "")
        b = Entry(b_name, synthetic.sources[b_name].shape, view.dtypes[b_name], view.blocks[b_name], "")
        pairs[base] = LoraPair(a, b, cfg.scale)
    if side is not None and not _zero_where_unread(view):
        return open_mm_adapter(
            info,
            mm_dir,
            layout,
            r=side["lora_r"],
            alpha=side["lora_alpha"],
            use_rslora=cfg.use_rslora,
            field=field,
            layout_file=False,
        )  # fmt: skip  (trained after mmtui wrote it: one A of rank K x r per module is exact)
    adapter = Adapter(Path(mm_dir), cfg, pairs, dict(view.sources), raw_names, order, metadata, config_text)
    adapter.zero_blocks, adapter.dropped = set(view.zero_blocks), dict(view.dropped)
    return adapter


def _zero_where_unread(view: MmView) -> bool:
    """Whether the rank blocks no PEFT tensor comes from are still zeros (reads those small tensors)."""
    import numpy as np

    from ..run.execute import assemble_from

    covered: dict[str, list[Piece]] = {}
    for blocks in view.blocks.values():
        for p in blocks:
            covered.setdefault(p.source, []).append(p)
    reader = TensorReader()
    try:
        for name in view.zero_blocks - view.dropped.keys():  # a TP replica's blocks are read from its twin
            meta = view.sources[name]
            data = assemble_from(whole(meta), view.sources, reader).view(np.uint8).reshape(meta.shape[0], -1)
            mask = np.ones(data.shape, dtype=bool)
            size = meta.itemsize
            for p in covered.get(name, []):
                c0, c1 = p.cols or (0, meta.shape[1])
                mask[p.rows[0] : p.rows[1], c0 * size : c1 * size] = False
            if data[mask].any():
                return False
    finally:
        reader.close()
    return True


def _in_file_order(info: ModelInfo, names: set[str] | list[str]) -> list[str]:
    position = {name: i for i, name in enumerate(info.tensors)}
    return sorted(set(names), key=lambda n: position[n])


def _peft_config_dict(cfg: PeftConfig, info: ModelInfo) -> dict:
    """What PEFT needs to load the adapter back onto the base model."""
    return {
        "base_model_name_or_path": str(info.hf_dir),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "lora_alpha": cfg.lora_alpha,
        "lora_dropout": 0.0,
        "peft_type": "LORA",
        "r": cfg.r,
        "target_modules": cfg.target_modules,
        "task_type": "CAUSAL_LM",
        "use_rslora": cfg.use_rslora,
    }


def _synthetic(info: ModelInfo, bases: list[str], cfg: PeftConfig) -> Adapter:
    """Adapter tensors as they would be in PEFT (shapes only), to lay out and invert."""
    sources: dict[str, TensorMeta] = {}
    pairs = {}
    for base in bases:
        w = info.tensors[base]
        out, inp = w.shape
        for half, shape in (("A", (cfg.r, inp)), ("B", (out, cfg.r))):
            name = adapter_name(base, half)
            sources[name] = TensorMeta(name, w.dtype, shape, Path(), 0, 0)
        a, b = (whole(sources[adapter_name(base, h)]) for h in "AB")
        pairs[base] = LoraPair(a, b, cfg.scale)
    return Adapter(Path(), cfg, pairs, sources)


def _trained_targets(base_plan: Plan, ckpt: MmCheckpoint, target_modules: list[str] | None, field: str) -> list[str]:
    """Canonical base weights whose Megatron targets carry lora_A / lora_B in the rank files."""
    on_disk: set[str] = set()
    for f in base_plan.files:
        path = ckpt.ranks.get(f.dir_name)
        if path is None:
            continue  # open_view names the missing rank directory
        for chunk in read_rank_file(path).values():
            on_disk |= set(chunk)
    bases: list[str] = []
    found_modules: set[str] = set()
    for f in base_plan.files:
        for e in f.entries:
            if mm_key(e.key, "A") in on_disk:
                module = e.key.removesuffix(".weight").rsplit(".", 1)[-1]
                if target_modules is not None and module not in target_modules:
                    continue
                found_modules.add(module)
                bases += [p.source for p in e.pieces if p.source not in bases]
    if target_modules is not None:
        missing = sorted(set(target_modules) - found_modules)
        if missing:
            raise ConvertError(
                f"lora.target_modules names {missing[0]!r}, but {ckpt.root} has no lora_A beside any {missing[0]}"
            )
    if not bases:
        raise ConvertError(f"{field} {ckpt.root}: no <module>.lora_A.default.weight in the rank files")
    return bases


def peft_plan(adapter: Adapter) -> Plan:
    """An adapter (PEFT or read from rank files) written as PEFT files: adapter_model.safetensors + config."""
    by_raw = {raw: name for name, raw in adapter.raw_names.items()}
    entries = []
    for raw in adapter.order:
        base, half = by_raw[raw].rsplit(".lora_", 1)
        pair = adapter.pairs[base + ".weight"]
        src = pair.a if half.startswith("A") else pair.b
        entries.append(replace(src, key=raw, transform=f"LoRA {half[0]}"))
    f = OutputFile(WEIGHTS_NAME, 0, 0, 0, [entries], kind="safetensors", metadata=adapter.metadata)
    plan = Plan([f], dict(adapter.sources), dict(adapter.dropped), "release", [])
    assert adapter.config_text is not None  # read with the adapter, or made for it
    plan.texts[CONFIG_NAME] = adapter.config_text
    plan.zero_blocks = set(adapter.zero_blocks)
    return plan
