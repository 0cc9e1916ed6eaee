"""LoRA adapters: read a PEFT adapter from metadata, and attach it to a plan so the output is merged.

A merged weight is W' = W + scale * B @ A with scale = alpha / r (alpha / sqrt(r) with
rsLoRA). The plan stays data: each output entry lists, in `Entry.lora`, the blocks of
canonical (HF) tensors that carry an adapter, in the entry's own coordinates. The
executor adds scale * B[rows] @ A[:, cols] to exactly those blocks, in float32, and
casts back to the base dtype once. Fusions and TP splits need nothing else: a fused QKV
row block of q_proj takes q_proj's B rows, a column-split linear_proj block takes A's
columns. So every output format and layout can be written merged, from an HF or a
Megatron base.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from pydantic import BaseModel, ConfigDict, PositiveInt, ValidationError

from ..errors import ConvertError
from ..formats.safetensors_header import TensorMeta, read_header, read_metadata
from ..source.hf_source import ModelInfo, canonical_name
from .plan import Entry, Piece, Plan

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.default)?\.weight$")


class PeftConfig(BaseModel):
    """The fields of PEFT's adapter_config.json that decide the merge (others are ignored)."""

    model_config = ConfigDict(extra="ignore")

    r: PositiveInt
    lora_alpha: float
    use_rslora: bool = False
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    use_dora: bool = False
    fan_in_fan_out: bool = False
    bias: str = "none"
    modules_to_save: list[str] | None = None
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    peft_type: str = "LORA"

    @property
    def scale(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


@dataclass(frozen=True)
class LoraPair:
    """The adapter of one base weight: A [r, in] and B [out, r] as blocks of adapter tensors, and the
    factor on B @ A. Blocks, so an adapter cut over Megatron rank files serves as well as a PEFT file."""

    a: Entry
    b: Entry
    scale: float


@dataclass
class Adapter:
    path: Path
    config: PeftConfig
    pairs: dict[str, LoraPair]  # canonical base tensor name -> its adapter
    sources: dict[str, TensorMeta]  # the tensors the pairs' blocks read
    raw_names: dict[str, str] = field(default_factory=dict)  # canonical adapter tensor -> key in the file
    order: list[str] = field(default_factory=list)  # keys as the file lists them
    metadata: dict[str, str] | None = None  # the file's __metadata__
    config_text: str | None = None  # adapter_config.json as written
    zero_blocks: set[str] = field(default_factory=set)  # source tensors with rank blocks no pair reads (all zero)
    dropped: dict[str, str] = field(default_factory=dict)  # source tensors no pair reads (TP replicas)


def adapter_name(base: str, half: str) -> str:
    """Canonical name of an adapter tensor: `model.layers.0.self_attn.q_proj.lora_A.weight`."""
    return f"{base.removesuffix('.weight')}.lora_{half}.weight"


def whole(meta: TensorMeta) -> Entry:
    """A tensor as an entry made of all of itself."""
    return Entry(meta.name, meta.shape, meta.dtype, (Piece(meta.name, (0, meta.shape[0])),), "")


def _unsupported(cfg: PeftConfig) -> str | None:
    if cfg.peft_type.upper() != "LORA":
        return f"peft_type = {cfg.peft_type!r} (only LORA adapters merge)"
    if cfg.use_dora:
        return "use_dora = true (DoRA's magnitude vectors are not merged yet)"
    if cfg.fan_in_fan_out:
        return "fan_in_fan_out = true (Conv1D models such as GPT-2 are not a supported family)"
    if cfg.bias != "none":
        return f"bias = {cfg.bias!r} (adapters that train biases are not merged yet; use 'none')"
    if cfg.modules_to_save:
        return f"modules_to_save = {cfg.modules_to_save} (whole replaced modules are not merged yet)"
    if cfg.rank_pattern or cfg.alpha_pattern:
        return "rank_pattern / alpha_pattern (per-module r or alpha are not merged yet)"
    return None


def read_peft_adapter(adapter_dir: Path | str, info: ModelInfo, field: str = "lora.adapter_dir") -> Adapter:
    """adapter_config.json + adapter_model.safetensors, checked against the base model; no tensor data read."""
    path = Path(adapter_dir)
    cfg_path = path / CONFIG_NAME
    if not path.is_dir():
        raise ConvertError(f"{field} {path}: no such directory (a PEFT adapter: {CONFIG_NAME} + {WEIGHTS_NAME})")
    if not cfg_path.is_file():
        raise ConvertError(f"{cfg_path}: missing (a PEFT adapter directory holds {CONFIG_NAME})")
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        pickled = (path / "adapter_model.bin").exists()
        raise ConvertError(f"{weights}: missing" + (" (adapter_model.bin needs unpickling and is not read)" * pickled))
    try:
        cfg = PeftConfig.model_validate(json.loads(cfg_path.read_text()))
    except (OSError, ValueError) as e:
        if isinstance(e, ValidationError):
            err = e.errors()[0]
            loc = ".".join(str(p) for p in err["loc"])
            raise ConvertError(f"{cfg_path}: {loc} = {err.get('input')!r}: {err['msg']}") from None
        raise ConvertError(f"{cfg_path}: not valid JSON ({e})") from None
    problem = _unsupported(cfg)
    if problem:
        raise ConvertError(f"{cfg_path}: {problem}")
    halves: dict[str, dict[str, TensorMeta]] = {}
    modules: dict[str, str] = {}  # canonical base tensor -> module name as peft sees it
    header = read_header(weights)
    raw_names = {}
    for key, meta in header.items():
        m = _KEY.match(key)
        if not m:
            raise ConvertError(
                f"{weights}: tensor {key!r} is not a LoRA A/B weight (base_model.model.<module>.lora_A.weight); "
                "only plain LoRA adapters are merged"
            )
        base, _ = canonical_name(info.preset, m["module"] + ".weight")
        name = adapter_name(base, m["ab"])
        raw_names[name] = key
        halves.setdefault(base, {})[m["ab"]] = replace(meta, name=name)
        modules[base] = m["module"]
    pairs = {base: _pair(base, ab, cfg, info, weights, raw_names) for base, ab in halves.items()}
    _check_targets(cfg, pairs, info, cfg_path)
    unselected = sorted(modules[base] for base in pairs if not peft_selects(cfg, modules[base]))
    if unselected:
        more = f" (and {len(unselected) - 1} more)" if len(unselected) > 1 else ""
        raise ConvertError(
            f"{weights}: holds lora_A/lora_B for {unselected[0]}{more}, which adapter_config.json does not select "
            f"(target_modules {cfg.target_modules!r}{_restrictions(cfg)}), so peft would not merge it; "
            "make the two agree"
        )
    sources = {m.name: m for ab in halves.values() for m in ab.values()}
    order = sorted(header, key=lambda k: header[k].begin)
    return Adapter(path, cfg, pairs, sources, raw_names, order, read_metadata(weights), cfg_path.read_text())


def _pair(
    base: str, ab: dict[str, TensorMeta], cfg: PeftConfig, info: ModelInfo, weights: Path, raw: dict[str, str]
) -> LoraPair:
    if set(ab) != {"A", "B"}:
        have, lack = next(iter(ab)), ({"A", "B"} - set(ab)).pop()
        raise ConvertError(f"{weights}: {raw[ab[have].name]} has no lora_{lack} partner")
    a, b = ab["A"], ab["B"]
    w = info.tensors.get(base)
    if w is None:
        raise ConvertError(f"{weights}: {raw[a.name]} targets {base}, which the base model in {info.hf_dir} lacks")
    if len(w.shape) != 2:
        raise ConvertError(f"{weights}: {raw[a.name]} targets {base} {list(w.shape)}; only 2-D (linear) weights merge")
    out, inp = w.shape
    if len(a.shape) != 2 or a.shape[0] != cfg.r:
        raise ConvertError(
            f"{weights}: {raw[a.name]} is {list(a.shape)} but adapter_config.json has r = {cfg.r}; "
            f"expected [{cfg.r}, {inp}] for {base} {list(w.shape)}"
        )
    if a.shape[1] != inp or list(b.shape) != [out, cfg.r]:
        raise ConvertError(
            f"{weights}: {raw[a.name]} {list(a.shape)} and {raw[b.name]} {list(b.shape)} do not fit "
            f"{base} {list(w.shape)}; expected [{cfg.r}, {inp}] and [{out}, {cfg.r}]"
        )
    return LoraPair(whole(a), whole(b), cfg.scale)


def peft_selects(cfg: PeftConfig, module: str) -> bool:
    """Whether peft would put an adapter on `module` (its full name in the base model), by peft's own rule
    (`check_target_module_exists`): exclude_modules, then target_modules as a regex matched against the
    whole name or a list of names matched as suffixes, narrowed by layers_to_transform / layers_pattern."""
    excluded = cfg.exclude_modules
    if isinstance(excluded, str) and re.fullmatch(excluded, module):
        return False
    if isinstance(excluded, list) and any(module == x or module.endswith("." + x) for x in excluded):
        return False
    targets = cfg.target_modules
    if targets is None:
        return True  # peft saves the resolved list; an adapter without one is taken as it is
    if isinstance(targets, str):
        if targets.lower() == "all-linear":
            return True  # every linear layer but the output layer; the pair checks keep to 2-D weights
        return re.fullmatch(targets, module) is not None
    if module in targets:
        return True
    if not any(module.endswith("." + t) for t in targets):
        return False
    layers = cfg.layers_to_transform
    if layers is None or layers == []:
        return True
    patterns = [cfg.layers_pattern] if isinstance(cfg.layers_pattern, str) else (cfg.layers_pattern or [])
    found = None
    if not patterns:
        found = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module)
    for pattern in patterns:
        found = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", module)
        if found:
            break
    if found is None:
        return False
    index = int(found["idx"])
    return index == layers if isinstance(layers, int) else index in layers


def _restrictions(cfg: PeftConfig) -> str:
    given = {k: getattr(cfg, k) for k in ("exclude_modules", "layers_to_transform", "layers_pattern")}
    return "".join(f", {k} {v!r}" for k, v in given.items() if v not in (None, []))


def _check_targets(cfg: PeftConfig, pairs: dict[str, LoraPair], info: ModelInfo, where: Path) -> None:
    """target_modules selects something in the base: each listed name (PEFT's suffix rule), or for a regex
    at least one module (peft raises NoMatchingPeftModuleError otherwise)."""
    if isinstance(cfg.target_modules, str) and cfg.target_modules.lower() != "all-linear":
        modules = [raw.removesuffix(".weight") for raw in info.raw_names.values() if raw.endswith(".weight")]
        if not any(re.fullmatch(cfg.target_modules, m) for m in modules):
            raise ConvertError(
                f"{where}: target_modules {cfg.target_modules!r} matches no module of the base model in "
                f"{info.hf_dir} (peft would refuse it: NoMatchingPeftModuleError)"
            )
        return
    if not isinstance(cfg.target_modules, list):
        return
    modules = {name.removesuffix(".weight") for name in info.tensors if name.endswith(".weight")}
    for target in cfg.target_modules:
        if not any(m == target or m.endswith("." + target) for m in modules):
            raise ConvertError(
                f"{where}: target_modules names {target!r}, which matches no module of the base model in {info.hf_dir}"
            )


def attach(plan: Plan, adapter: Adapter) -> Plan:
    """Mark every entry block that comes from an adapted canonical tensor; call before `retarget`."""
    for f in plan.files:
        for e in f.entries:
            blocks = tuple(p for p in e.pieces if p.source in adapter.pairs)
            if blocks:
                e.lora = blocks
                e.transform = f"{e.transform} + LoRA" if e.transform != "copy" else "LoRA merged"
    return merging(plan, adapter)


def merging(plan: Plan, adapter: Adapter) -> Plan:
    """Give a plan whose entries are marked (`Entry.lora`) the adapter they read, after checking that
    every adapted weight is merged somewhere, unless the output leaves that module out (save_vit_only).

    A tied model's lm_head is written from the embedding: an adapter on lm_head would be lost.
    """
    applied = {p.source for f in plan.files for e in f.entries for p in e.lora}
    for base in adapter.pairs:
        reason = plan.dropped.get(base, "")
        if base not in applied and not reason.startswith("save_vit_only"):
            why = f" ({reason})" if reason else ""
            raise ConvertError(
                f"{adapter.path}: the adapter changes {base}, which this output does not write as itself{why}; "
                "merging would lose that update"
            )
    plan.lora, plan.lora_sources = dict(adapter.pairs), dict(adapter.sources)
    n = len(adapter.pairs)
    plan.notes.append(f"LoRA: {n} weights merged from {adapter.path} (scale {adapter.config.scale:g}, in float32)")
    return plan
