"""A model family as data: the schema of `presets/<family>.toml`.

A preset reads like a table: one entry per HF -> Megatron mapping with `*` standing for
the layer index and `#` for the expert index of a mixture-of-experts layer (global in HF
names, local to the expert-parallel rank in Megatron names). The mapping kinds (rename,
qkv, qkv_per_head, gate_up) and the TP rules (rows, cols, gated, replicate) are
implemented once in the engine; a preset only picks them.
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
MappingKind = Literal["rename", "qkv", "qkv_per_head", "gate_up"]

_SOURCES_PER_KIND = {"rename": 1, "qkv": 3, "qkv_per_head": 1, "gate_up": 2}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Mapping(_Strict):
    """HF prefix(es) -> one target prefix; applies to each parameter (weight, bias) present."""

    kind: MappingKind = "rename"
    hf: list[str]
    mm: str
    tp: TpRule = "replicate"
    heads: str | None = None  # config field: attention heads (qkv, qkv_per_head)
    groups: str | None = None  # config field: key/value heads (qkv)
    pad_vocab: bool = False  # vocabulary rows: padded with zeros when the layout asks (embedding, output layer)

    @field_validator("hf", mode="before")
    @classmethod
    def _one_or_many(cls, v: object) -> object:
        return [v] if isinstance(v, str) else v

    @model_validator(mode="after")
    def _check(self) -> Mapping:
        want = _SOURCES_PER_KIND[self.kind]
        if len(self.hf) != want:
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
        if self.kind == "gate_up" and self.tp != "gated":
            raise ValueError("kind 'gate_up' needs tp = 'gated'")
        if self.pad_vocab and (self.kind != "rename" or self.tp != "rows"):
            raise ValueError("pad_vocab needs kind 'rename' and tp = 'rows' (vocabulary rows split over TP)")
        return self


class Module(_Strict):
    """A part of the model that is pipelined on its own (vision encoder, language model)."""

    name: Literal["vit", "llm"]  # also the layout field prefix (`vit_pp_layers`)
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
    """When `field` is true the output layer is the embedding (written only with PP > 1)."""

    field: str
    source: str  # HF name of the embedding
    target: str  # target name of the output layer
    drop: list[str] = []  # HF names ignored when tied (some checkpoints still carry lm_head)


class Preset(_Strict):
    name: str
    title: str
    converter: str  # the `mm-convert` subcommand, e.g. "Qwen2VLConverter"
    model_types: list[str]
    architectures: list[str]
    aliases: dict[str, str] = {}  # other HF spellings of a prefix -> the canonical one
    fields: dict[str, list[str]]  # logical name -> config.json paths, preferred first
    defaults: dict[str, bool | int | float | str] = {}
    modules: list[Module]
    mappings: list[Mapping]
    tie: Tie | None = None

    @model_validator(mode="after")
    def _check(self) -> Preset:
        known = set(self.fields)
        used = [m.layers for m in self.modules]
        used += [f for m in self.modules for f in (m.heads, m.vocab, m.experts) if f]
        used += [f for mp in self.mappings for f in (mp.heads, mp.groups) if f]
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
        return self

    def module_of_target(self, key: str) -> Module:
        for m in self.modules:
            if key.startswith(m.target_prefix):
                return m
        raise KeyError(key)

    def module_of_source(self, key: str) -> Module | None:
        for m in self.modules:
            if any(key.startswith(p) for p in m.hf_prefixes):
                return m
        return None


def _read_toml(path: Path) -> dict:
    try:
        return tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConvertError(f"{path}: cannot read preset ({e})") from None


def load_preset_file(path: Path) -> Preset:
    """A preset file; `extends = "llama"` starts from presets/llama.toml, and every top-level key
    the file gives replaces the base's (a family with Llama's tensors but its own names is five lines)."""
    data = _read_toml(path)
    base = data.pop("extends", None)
    if base is not None:
        base_path = path.with_name(f"{base}.toml")
        if not isinstance(base, str) or not base_path.is_file():
            raise ConvertError(f"{path}: extends {base!r}, but there is no {base_path.name} next to it")
        parent = _read_toml(base_path)
        if "extends" in parent:
            raise ConvertError(f"{path}: extends {base!r}, which extends another preset; extend the base itself")
        data = parent | data
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


def preset_for_converter(converter: str) -> Preset:
    for p in builtin_presets().values():
        if p.converter == converter:
            return p
    names = ", ".join(sorted(p.converter for p in builtin_presets().values()))
    raise ConvertError(f"converter {converter!r} is unknown; available: {names}")
