"""Matching a preset's mappings against the source tensors: which target each tensor makes, in which
module, layer and expert; and each module's parameters per layer (for balancing), from the same match.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import ConvertError
from ..formats.safetensors_header import TensorMeta
from ..layout import Placement
from ..preset import Mapping, Module
from ..source.hf_source import ModelInfo
from ..source.tie import is_tied
from . import mtp as mtp_layers
from .plan import PARAMS


def target_pattern(name: str, bare: bool = False) -> re.Pattern[str]:
    body = re.escape(name).replace(r"\*", r"(?P<layer>\d+)").replace(r"\#", r"(?P<expert>\d+)")
    return re.compile(body + ("$" if bare else r"\.(?P<param>" + "|".join(PARAMS) + r")$"))


def _with_param(name: str, param: str) -> str:
    """A tensor name: the mapping's name plus `.weight`/`.bias`, or the name alone for a bare tensor."""
    return f"{name}.{param}" if param else name


@dataclass
class Target:
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


def match_targets(
    info: ModelInfo, sources: dict[str, TensorMeta], modules: list[Module]
) -> tuple[list[Target], set[str]]:
    preset = info.preset
    wanted = {m.name for m in modules}
    targets: list[Target] = []
    claimed: set[str] = set()
    for mi, mp in enumerate(preset.mappings):
        module = preset.module_of_target(mp.mm)
        pat = target_pattern(mp.hf[0], mp.bare)
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
            targets.append(Target(key, module, layer, expert, param, mp, [sources[n] for n in names], order, mtp))
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


def model_targets(info: ModelInfo) -> list[Target]:
    """Every target tensor of the model, with its layer, expert and sources (metadata only)."""
    return match_targets(info, dict(info.tensors), list(info.preset.modules))[0]


def _fill(name: str, layer: int | None, expert: int | None = None) -> str:
    if layer is not None:
        name = name.replace("*", str(layer))
    if expert is not None:
        name = name.replace("#", str(expert))
    return name


def check_layers(info: ModelInfo, targets: list[Target]) -> None:
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


def cell_of(t: Target, placements: dict[str, Placement]) -> tuple[int, int, int | None] | None:
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
    targets, _ = match_targets(info, dict(info.tensors), list(preset.modules))
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
