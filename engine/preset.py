"""A model family as data: the schema of `presets/<family>.toml`.

A preset reads like a table: one entry per HF -> Megatron mapping with `*` standing for
the layer index and `#` for the expert index of a mixture-of-experts layer (global in HF
names, local to the expert-parallel rank in Megatron names). The mapping kinds (rename,
qkv, qkv_per_head, gate_up) and the TP rules (rows, cols, gated, replicate) are
implemented once in the engine; a preset only picks them. `concat` stacks two or more tensors
along rows (MindSpeed-LLM's MLA linear_qkv = [q_a_proj; kv_a_proj_with_mqa]).

A family may have more than one preset, one per `naming` (whose names the output takes: Megatron-Core's,
the default, or MindSpeed-LLM's where they differ); a job picks one with its `naming` field.

A vision-language preset may take its language model from another preset
(`[language_model]`): the LLM preset's names, fields and modules are nested under
prefixes, picked by the architecture the model's config names. So InternVL with an
InternLM2, Qwen2 or Llama inside is one file plus the LLM presets that already exist.
"""

from __future__ import annotations

import tomllib
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from .errors import ConvertError

TpRule = Literal["rows", "cols", "gated", "replicate"]
MappingKind = Literal["rename", "qkv", "qkv_per_head", "gate_up", "concat", "fused_experts"]

_SOURCES_PER_KIND = {"rename": 1, "qkv": 3, "qkv_per_head": 1, "gate_up": 2, "fused_experts": 1}  # concat: two or more
FUSED = "[#]"  # a fused_experts hf name ends with it: expert # of the one tensor that holds them all


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Mapping(_Strict):
    """HF prefix(es) -> one target prefix; applies to each parameter (weight, bias) present."""

    kind: MappingKind = "rename"
    hf: list[str]
    mm: str
    tp: TpRule = "replicate"
    heads: str | None = None  # config field: attention heads (qkv, qkv_per_head; a rename split in whole heads)
    groups: str | None = None  # config field: key/value heads (qkv)
    pad_vocab: bool = False  # vocabulary rows: padded with zeros when the layout asks (embedding, output layer)
    # A rename with `heads` and tp rows/cols splits in whole heads; when the heads do not divide
    # by TP the first heads % tp ranks take one more. `blocks` = 3 reads the rows as [q; k; v],
    # each block holding every head and split alike (InternViT's QKV).
    blocks: int = 1
    uneven: bool = False  # tp rows that do not divide: the first rows % tp ranks take one more row
    bare: bool = False  # names are whole tensor names (InternViT's ls1, class_embedding), not .weight/.bias prefixes
    inner: bool = False  # reads a width other than the module's hidden state (MLA's up-projections): not shape-checked
    # A config list (e.g. Qwen3-VL's deepstack_visual_indexes): the hf name's `*` is a position in it, and the
    # target's `*` the layer that position names, so the tensor lives (and is renumbered) with that layer.
    layer_from: str | None = None
    # kind qkv: a k bias the model does not have (Whisper's k_proj has none) is zeros in the fused bias,
    # as MindSpeed-MM's QVToQKVMergeOp writes it; the way back checks those rows are zero and drops them
    zero_k: bool = False

    @field_validator("hf", mode="before")
    @classmethod
    def _one_or_many(cls, v: object) -> object:
        return [v] if isinstance(v, str) else v

    @model_validator(mode="after")
    def _check(self) -> Mapping:
        if self.kind == "concat":
            if len(self.hf) < 2:
                raise ValueError(f"kind 'concat' takes two or more hf names, got {len(self.hf)}: {self.hf}")
            if self.tp not in ("rows", "replicate"):
                raise ValueError("kind 'concat' needs tp = 'rows' or 'replicate'")
        elif len(self.hf) != (want := _SOURCES_PER_KIND[self.kind]):
            raise ValueError(f"kind {self.kind!r} takes {want} hf name(s), got {len(self.hf)}: {self.hf}")
        for mark, what in (("*", "layer"), ("#", "expert")):
            counts = {name.count(mark) for name in [*self.hf, self.mm]}
            if len(counts) != 1 or counts.pop() > 1:
                raise ValueError(
                    f"hf {self.hf} and mm {self.mm!r} must all hold the same single {mark!r} ({what} index) or none"
                )
        if "#" in self.mm and "*" not in self.mm:
            raise ValueError(f"mm {self.mm!r}: experts live in layers; a '#' needs a '*' too")
        if self.kind in ("qkv", "qkv_per_head") and not self.heads:
            raise ValueError(f"kind {self.kind!r} needs `heads` (a config field name)")
        if self.kind == "qkv" and not self.groups:
            raise ValueError("kind 'qkv' needs `groups` (the key/value heads config field)")
        if self.zero_k and self.kind != "qkv":
            raise ValueError("zero_k needs kind 'qkv' (a fused q, k, v whose k has no bias)")
        if self.kind == "gate_up" and self.tp != "gated":
            raise ValueError("kind 'gate_up' needs tp = 'gated'")
        if self.pad_vocab and (self.kind != "rename" or self.tp != "rows"):
            raise ValueError("pad_vocab needs kind 'rename' and tp = 'rows' (vocabulary rows split over TP)")
        if self.kind == "rename" and self.heads and self.tp not in ("rows", "cols"):
            raise ValueError("a rename with `heads` splits in whole heads: it needs tp = 'rows' or 'cols'")
        if self.blocks != 1 and not (self.kind == "rename" and self.heads and self.tp == "rows"):
            raise ValueError("`blocks` needs kind 'rename', `heads` and tp = 'rows' (e.g. [q; k; v] split by heads)")
        if self.kind == "fused_experts" and not (self.hf[0].endswith(FUSED) and self.bare and "#" in self.mm):
            raise ValueError(
                f"kind 'fused_experts' reads expert # of one [experts, in, out] tensor: hf ends with {FUSED!r}, "
                "the mm name holds '#', and bare = true"
            )
        if self.layer_from and "*" not in self.mm:
            raise ValueError("`layer_from` maps the layer index: hf and mm need a '*'")
        if self.uneven and (self.kind != "rename" or self.tp != "rows" or self.heads):
            raise ValueError("`uneven` needs kind 'rename' and tp = 'rows' without `heads` (heads split unevenly)")
        return self

    @property
    def head_split(self) -> bool:
        """Split over TP in whole heads (an uneven head count allowed)."""
        return self.kind == "rename" and self.heads is not None


class Module(_Strict):
    """A part of the model that is pipelined on its own (vision encoder, language model)."""

    name: Literal["vit", "audio", "llm"]  # also the layout field prefix (`vit_pp_layers`)
    title: str
    target_prefix: str  # every target key of the module starts with it
    hf_prefixes: list[str]  # every source key of the module starts with one of these
    layers: str  # config field holding the layer count
    layer_prefix: str  # target prefix before the layer index
    first: list[str]  # target prefixes placed with the module's first layer
    last: list[str]  # target prefixes placed with the module's last layer
    heads: str | None = None  # config field that TP must divide
    vocab: str | None = None  # config field that TP must divide (embedding rows)
    experts: str | None = None  # config field: experts per MoE layer (split over ep_size ranks)


class Tie(_Strict):
    """When `field` is true the output layer is the embedding (written only with PP > 1).

    As transformers reads it: true when any of the field's config.json paths says true
    (Qwen2-VL's top-level key or its text_config's), else the preset's [defaults] value,
    which is `config_class`'s own default.
    """

    field: str
    source: str  # HF name of the embedding
    target: str  # target name of the output layer
    drop: list[str] = []  # HF names ignored when tied (some checkpoints still carry lm_head)
    config_class: str = ""  # the transformers config class whose default applies when config.json omits it


class LanguageModel(_Strict):
    """The language model is another preset's, chosen by the architecture the config names.

    Its HF names get `hf_prefix`, its target names `mm_prefix`, its config paths `config_prefix`.
    """

    architecture: str  # config path of the LLM's architectures list (its first entry picks the preset)
    config_prefix: str  # "llm_config."
    hf_prefix: str  # "language_model."
    mm_prefix: str  # "text_decoder."
    uneven_vocab: bool = False  # vocabulary rows that do not divide by TP: the first ranks take one more


class Mtp(_Strict):
    """Multi-token-prediction layers (DeepSeek-V3's `model.layers.61`): numbered after the decoder layers.

    Their HF names are read as `canonical` + MTP index (`model.mtp.0.enorm.weight`), so mappings can tell
    them from decoder layers; each decoder-layer mapping (`model.layers.*.X` -> `decoder.layers.*.Y`) gets
    a twin `canonical*.X` -> `target_prefix*.transformer_layer` + `Y`. They are placed with the module's
    last layer. `copies` are tensors HF keeps per MTP layer that Megatron shares with the main model
    (embedding, output head): not written, and written back from the tensor they copy.
    """

    field: list[str]  # config.json paths of their count (num_nextn_predict_layers); absent: none
    hf_prefix: str = "model.layers."  # the HF prefix before the layer index
    canonical: str = "model.mtp."  # the prefix the mappings name them by
    target_prefix: str = "mtp.layers."  # the Megatron prefix before the MTP index
    block: str = "mtp."  # every target under it belongs to the MTP block (MindSpeed-LLM's mtp.final_layernorms.N)
    transformer_layer: str = "transformer_layer."  # the decoder layer's names go under it
    copies: dict[str, str] = {}  # canonical name with `*` -> the main model's tensor it duplicates
    renames: dict[str, str] = {}  # target -> target when MTP layers are written (MindSpeed-LLM's final norm)


class Preset(_Strict):
    name: str
    title: str
    converter: str  # the `mm-convert` subcommand, e.g. "Qwen2VLConverter"
    model_types: list[str]
    architectures: list[str]
    aliases: dict[str, str] = {}  # other HF spellings of a prefix -> the canonical one
    fields: dict[str, list[str]]  # logical name -> config.json paths, preferred first
    defaults: dict[str, bool | int | float | str | list[int]] = {}  # a list default makes the field a list
    modules: list[Module]
    mappings: list[Mapping]
    tie: Tie | None = None
    language_model: LanguageModel | None = None
    mtp: Mtp | None = None
    naming: str = "megatron_core"  # which consumer's names: one preset per (family, naming)
    # HF prefixes of weights the target model has no place for (Qwen2.5-Omni's talker and token2wav):
    # not written, said in the plan's notes, and copied back from hf_dir on the way back
    ignore: list[str] = []

    @model_validator(mode="after")
    def _check(self) -> Preset:
        if self.language_model and any(m.name == "llm" for m in self.modules):
            raise ValueError("a preset with [language_model] takes its llm module from there; drop its own")
        known = set(self.fields)
        used = [m.layers for m in self.modules]
        used += [f for m in self.modules for f in (m.heads, m.vocab, m.experts) if f]
        used += [f for mp in self.mappings for f in (mp.heads, mp.groups, mp.layer_from) if f]
        if self.tie:
            used.append(self.tie.field)
        missing = sorted({f for f in used if f not in known})
        if missing:
            raise ValueError(f"config fields {missing} are used but not declared under [fields]")
        for mp in self.mappings:
            if not any(mp.mm.startswith(m.target_prefix) for m in self.modules):
                raise ValueError(f"mapping target {mp.mm!r} belongs to no module's target_prefix")
            if "#" in mp.mm and not self.module_of_target(mp.mm).experts:
                raise ValueError(f"mapping target {mp.mm!r} has an expert index but its module sets no `experts` field")
            if mp.layer_from and not isinstance(self.defaults.get(mp.layer_from), list):
                raise ValueError(f"layer_from {mp.layer_from!r}: give it a list default under [defaults] (e.g. [])")
        return self

    def module_of_target(self, key: str) -> Module:
        for m in self.modules:
            if key.startswith(m.target_prefix):
                return m
        raise KeyError(key)

    def uneven_vocab(self, module: Module) -> bool:
        """Whether the module's vocabulary rows may split unevenly (then TP need not divide them)."""
        return any(mp.uneven for mp in self.mappings if mp.pad_vocab and self.module_of_target(mp.mm) is module)

    def module_of_source(self, key: str) -> Module | None:
        for m in self.modules:
            if any(key.startswith(p) for p in m.hf_prefixes):
                return m
        return None


def _mtp_twins(data: dict) -> dict:
    """The preset's mappings plus, with an [mtp] section, each decoder-layer mapping's MTP twin."""
    mtp, mappings = data.get("mtp"), data.get("mappings")
    if not isinstance(mtp, dict) or not isinstance(mappings, list):
        return data
    layer = next((m.get("layer_prefix") for m in data.get("modules", []) if m.get("name") == "llm"), None)
    hf, canonical = mtp.get("hf_prefix", "model.layers."), mtp.get("canonical", "model.mtp.")
    target = mtp.get("target_prefix", "mtp.layers.") + "*." + mtp.get("transformer_layer", "transformer_layer.")
    twins = []
    for mp in mappings:
        names = [mp["hf"]] if isinstance(mp.get("hf"), str) else mp.get("hf") or []
        mm = mp.get("mm", "")
        if layer and names and all(n.startswith(hf + "*.") for n in names) and mm.startswith(layer + "*."):
            hf_twin = [canonical + n[len(hf) :] for n in names]
            twins.append(mp | {"hf": hf_twin, "mm": target + mm[len(layer) + 2 :]})
    return data | {"mappings": [*mappings, *twins]}


def _read_toml(path: Path) -> dict:
    try:
        return tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConvertError(f"{path}: cannot read preset ({e})") from None


def _resolved(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """The file's data with its base's under it: `extends`, `without` and `more_mappings` applied."""
    if path in seen:
        raise ConvertError(f"{path}: extends itself through {' -> '.join(p.stem for p in seen)}")
    data = _read_toml(path)
    base = data.pop("extends", None)
    more = data.pop("more_mappings", None)
    without = data.pop("without", None)
    if (more is not None or without is not None) and base is None:
        what = "more_mappings adds to" if more is not None else "without takes from"
        raise ConvertError(f"{path}: {what} the mappings of the preset it extends; set `extends`")
    if base is None:
        return data
    base_path = path.with_name(f"{base}.toml")
    if not isinstance(base, str) or not base_path.is_file():
        raise ConvertError(f"{path}: extends {base!r}, but there is no {base_path.name} next to it")
    data = _resolved(base_path, (*seen, path)) | data
    if without is not None:
        mappings = data.get("mappings", [])
        unknown = sorted(set(without) - {m.get("mm") for m in mappings})
        if unknown:
            raise ConvertError(f"{path}: without names {unknown[0]!r}, which no mapping of {base!r} targets")
        data["mappings"] = [m for m in mappings if m.get("mm") not in without]
    if more is not None:
        data["mappings"] = [*data.get("mappings", []), *more]
    return data


def load_preset_file(path: Path) -> Preset:
    """A preset file; `extends = "llama"` starts from presets/llama.toml (which may extend another), and every
    top-level key the file gives replaces the base's (a family with Llama's tensors but its own names is five
    lines). `without = [targets]` leaves out the base's mappings to those targets, and `[[more_mappings]]` are
    appended (a family with a few tensors more, or another consumer's names for a few)."""
    data = _resolved(path)
    data = _mtp_twins(data)
    try:
        return Preset.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "literal_error":
            msg += f" (got {err['input']!r})"
        raise ConvertError(f"{path}: {_where(err['loc'], data)}: {msg}") from None


def _where(loc: tuple[int | str, ...], data: dict) -> str:
    """`mappings[3].tp (the mapping to 'decoder...')`: the TOML path and which entry it is."""
    parts: list[str] = []
    for p in loc:
        if isinstance(p, int) and parts:
            parts[-1] += f"[{p}]"
        else:
            parts.append(str(p))
    where = ".".join(parts) or "preset"
    if len(loc) >= 2 and loc[0] == "mappings" and isinstance(loc[1], int):
        entry = data["mappings"][loc[1]]
        if isinstance(entry, dict) and entry.get("mm"):
            where += f" (the mapping to {entry['mm']!r})"
    return where


@cache
def builtin_presets() -> dict[str, Preset]:
    """Every preset shipped under presets/, by name."""
    out = {}
    for entry in sorted(resources.files("presets").iterdir(), key=lambda p: p.name):
        if entry.name.endswith(".toml"):
            preset = load_preset_file(Path(str(entry)))
            out[preset.name] = preset
    return out


def _nested(llm: Preset, lm: LanguageModel) -> dict:
    """The parts of an LLM preset with its names and config paths put under the VLM's prefixes."""
    hf, mm = lm.hf_prefix, lm.mm_prefix
    modules = [
        m.model_copy(
            update={
                "target_prefix": mm + m.target_prefix,
                "hf_prefixes": [hf + p for p in m.hf_prefixes],
                "layer_prefix": mm + m.layer_prefix,
                "first": [mm + p for p in m.first],
                "last": [mm + p for p in m.last],
            }
        )
        for m in llm.modules
    ]
    mappings = [
        mp.model_copy(
            update={"hf": [hf + h for h in mp.hf], "mm": mm + mp.mm, "uneven": mp.pad_vocab and lm.uneven_vocab}
        )
        for mp in llm.mappings
    ]
    tie = llm.tie and Tie(
        field=llm.tie.field, source=hf + llm.tie.source, target=mm + llm.tie.target,
        drop=[hf + d for d in llm.tie.drop], config_class=llm.tie.config_class,
    )  # fmt: skip
    return {
        "fields": {k: [lm.config_prefix + p for p in paths] for k, paths in llm.fields.items()},
        "aliases": {hf + a: hf + c for a, c in llm.aliases.items()},
        "defaults": llm.defaults,
        "modules": modules,
        "mappings": mappings,
        "tie": tie,
    }


def with_language_model(preset: Preset, config: dict, where: Path) -> Preset:
    """A VLM preset completed with the LLM preset its config's architecture names; others as they are."""
    lm = preset.language_model
    if lm is None:
        return preset
    node: object = config
    for part in lm.architecture.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    arch = node[0] if isinstance(node, list) and node else node
    candidates = {
        a: p for p in default_presets() if p.language_model is None and [m.name for m in p.modules] == ["llm"]
        for a in p.architectures
    }  # fmt: skip
    llm = candidates.get(arch) if isinstance(arch, str) else None
    if llm is None:
        raise ConvertError(
            f"{where}: {lm.architecture} = {node!r} is not a language model {preset.title} can hold; "
            f"supported: {', '.join(sorted(candidates))}"
        )
    nested = _nested(llm, lm)
    clash = sorted(set(nested["fields"]) & set(preset.fields))
    if clash:
        raise ConvertError(f"preset {preset.name}: fields {clash} are also declared by the {llm.name} preset")
    return Preset.model_validate(
        preset.model_dump(exclude={"language_model"})
        | {
            "title": f"{preset.title} · {llm.title}",
            "fields": preset.fields | nested["fields"],
            "aliases": preset.aliases | nested["aliases"],
            "defaults": preset.defaults | nested["defaults"],
            "modules": [*preset.modules, *nested["modules"]],
            "mappings": [*preset.mappings, *nested["mappings"]],
            "tie": nested["tie"],
        }
    )


DEFAULT_NAMING = "megatron_core"


def default_presets() -> list[Preset]:
    """One preset per family: its Megatron-Core naming (the others are that family's variants)."""
    return [p for p in builtin_presets().values() if p.naming == DEFAULT_NAMING]


def preset_for_converter(converter: str, model_type: object = None, naming: str = DEFAULT_NAMING) -> Preset:
    """The family's preset in `naming` (a family whose names are the same in every naming has one preset).
    One converter may serve several families (Qwen3-VL dense and MoE, as MindSpeed-MM's
    Qwen3VLMegatronConverter does): then config.json's model_type picks, else the first."""
    family = [p for p in builtin_presets().values() if p.converter == converter]
    if not family:
        names = ", ".join(sorted({p.converter for p in default_presets()}))
        raise ConvertError(f"converter {converter!r} is unknown; available: {names}")
    named = [p for p in family if p.naming == naming] or [p for p in family if p.naming == DEFAULT_NAMING]
    return next((p for p in named if model_type in p.model_types), named[0])
