"""Multi-token-prediction (MTP) layers: DeepSeek-V3 keeps them after its decoder layers (`model.layers.61`).

HF numbers an MTP layer as one more decoder layer; Megatron-Core keeps it in a block of its own
(`mtp.layers.0.{enorm, hnorm, eh_proj, transformer_layer.*, final_layernorm}`) on the last pipeline
stage, and shares the embedding and the output head with the main model, where HF stores a copy
of each per MTP layer (`embed_tokens`, `shared_head.head`). So, from the preset's [mtp] section:

- the MTP layers' HF names are read under another prefix (`model.mtp.0.`), so the mappings tell them
  from decoder layers (engine/preset.py gives every decoder-layer mapping its MTP twin);
- their targets go with the module's last layer, numbered by MTP index;
- the copies are not written; the way back writes each from the tensor it copies;
- with PP > 1 the MTP stage holds its own embedding (Megatron-Core builds one wherever there is
  pre-processing or MTP), a copy of the first stage's, as a tied output layer is.
`mtp = false` leaves the MTP layers out of the plan, with a note.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
from typing import TYPE_CHECKING, Any

from ..errors import ConvertError

if TYPE_CHECKING:
    from ..formats.safetensors_header import TensorMeta
    from ..layout import Placement
    from ..preset import Preset
    from ..source.hf_source import ModelInfo, TensorReader
    from .plan import Plan
    from .targets import Target


def mtp_count(preset: Preset, config: dict[str, Any], where: object) -> int:
    """How many MTP layers config.json declares (0 when the field is absent or the preset has none)."""
    from ..source.hf_source import lookup

    if preset.mtp is None:
        return 0
    path = next((p for p in preset.mtp.field if lookup(config, p) is not None), None)
    if path is None:
        return 0
    value = lookup(config, path)
    if type(value) is not int or value < 0:
        raise ConvertError(f"{where}: {path} = {value!r}; expected a whole number >= 0 (MTP layers)")
    return value


def with_mtp_names(preset: Preset, config: dict[str, Any], fields: dict[str, Any], where: object) -> Preset:
    """The preset with the MTP layers' HF prefixes read as `model.mtp.N.` (aliases, so names round-trip)."""
    n = mtp_count(preset, config, where)
    if not n or preset.mtp is None:
        return preset
    llm = next(m for m in preset.modules if m.name == "llm")
    first = fields[llm.layers]
    aliases = {f"{preset.mtp.hf_prefix}{first + i}.": f"{preset.mtp.canonical}{i}." for i in range(n)}
    return preset.model_copy(update={"aliases": preset.aliases | aliases})


def is_mtp_target(preset: Preset, mm: str) -> bool:
    return preset.mtp is not None and mm.startswith(preset.mtp.block)


def has_mtp(info: ModelInfo) -> bool:
    mtp = info.preset.mtp
    return mtp is not None and any(name.startswith(mtp.canonical) for name in info.tensors)


def _copy_patterns(preset: Preset) -> list[tuple[re.Pattern[str], str]]:
    mtp = preset.mtp
    if mtp is None:
        return []
    return [(re.compile(re.escape(k).replace(r"\*", r"\d+") + "$"), v) for k, v in mtp.copies.items()]


def copy_of(info: ModelInfo, name: str) -> str | None:
    """The main model's tensor an MTP copy duplicates (the tied embedding when the output head is tied)."""
    from ..source.tie import is_tied

    for pat, source in _copy_patterns(info.preset):
        if pat.match(name):
            tie = info.preset.tie
            if tie and is_tied(info) and source in tie.drop:
                return tie.source
            return source
    return None


def same_pairs(info: ModelInfo, dropped: dict[str, str]) -> list[tuple[str, str, str]]:
    """(copy, the tensor it copies, both named as in the files) for each MTP copy the plan drops."""
    raw = info.raw_names
    pairs = [(name, src) for name in info.tensors if name in dropped and (src := copy_of(info, name)) is not None]
    return [(a, b, f"{raw.get(a, a)} differs from {raw.get(b, b)}") for a, b in pairs]


def check_copies(plan: Plan) -> None:
    """Before writing: the MTP copies a plan drops (MTP's embedding and output head) are copies."""
    if plan.same:
        from ..source.hf_source import TensorReader  # hf_source imports this module

        with contextlib.closing(TensorReader()) as reader:
            check_same(plan, reader)


def check_same(plan: Plan, reader: TensorReader) -> None:
    """Every dropped copy holds the bytes of the tensor written for it (`plan.same`), read in bands;
    else the way back could not give it back, and Megatron-Core has nowhere to keep it."""
    for copy, source, said in plan.same:
        a, b = _stored(plan.sources[copy]), _stored(plan.sources[source])
        if len(a) != len(b) or not all(_same_bytes(reader, x, y) for x, y in zip(a, b, strict=True)):
            raise ConvertError(
                f"{a[0].file}: {said}, which Megatron-Core's MTP layer shares instead of keeping a copy; "
                "convert with mtp false to leave the MTP layers out"
            )


def _stored(meta: TensorMeta) -> list[TensorMeta]:
    """The tensors as stored in the files: a cast or dequantised view's raw tensor (and its block scales)."""
    raw = getattr(meta, "raw", None) or meta
    scale = getattr(meta, "scale", None)
    return [raw, scale] if scale is not None else [raw]


def _same_bytes(reader: TensorReader, a: TensorMeta, b: TensorMeta, band: int = 16 << 20) -> bool:
    if (a.dtype, a.shape) != (b.dtype, b.shape):
        return False
    fa, sa, n = reader.row_span(a, 0, a.shape[0] if a.shape else 1)
    fb, sb, _ = reader.row_span(b, 0, b.shape[0] if b.shape else 1)
    return all(os.pread(fa, min(band, n - at), sa + at) == os.pread(fb, min(band, n - at), sb + at)
               for at in range(0, n, band))  # fmt: skip


def dropped_copies(info: ModelInfo) -> dict[str, str]:
    """MTP copies of shared tensors -> why they are not written."""
    out = {}
    for name in info.tensors:
        source = copy_of(info, name)
        if source is not None:
            if source not in info.tensors:
                raise ConvertError(
                    f"{info.hf_dir}: {info.raw_names.get(name, name)} copies {info.raw_names.get(source, source)}, "
                    "which the weights do not hold"
                )
            a, b = info.tensors[name], info.tensors[source]
            if (a.shape, a.dtype) != (b.shape, b.dtype):
                raise ConvertError(
                    f"{info.hf_dir}: {info.raw_names.get(name, name)} ({a.dtype} {list(a.shape)}) should be a copy of "
                    f"{info.raw_names.get(source, source)} ({b.dtype} {list(b.shape)}), as the MTP layer shares it"
                )
            out[name] = f"the MTP layer's copy of {info.raw_names.get(source, source)}, which Megatron shares"
    return out


def copy_note(info: ModelInfo, copies: dict[str, str]) -> str:
    names = sorted(info.raw_names.get(n, n) for n in copies)
    return (
        f"MTP: {', '.join(names)} not written: Megatron-Core shares the embedding and output layer with the "
        "MTP layers; the way back writes them from those"
    )


def drops(info: ModelInfo, dropped: dict[str, str], notes: list[str]) -> set[str]:
    """Record the MTP copies and the layers left out as dropped, with a note each; the copies' names."""
    copies = dropped_copies(info)
    if copies:
        dropped |= copies
        notes.append(copy_note(info, copies))
    if info.left_out:
        dropped |= info.left_out
        notes.append(left_out_note(info) or "")
    return set(copies)


def without_mtp(info: ModelInfo) -> ModelInfo:
    """The model with its MTP layers left out (`mtp = false`): recorded in `left_out`, never planned."""
    mtp = info.preset.mtp
    if mtp is None:
        return info
    gone = {k for k in info.tensors if k.startswith(mtp.canonical)}
    if not gone:
        return info
    tensors = {k: v for k, v in info.tensors.items() if k not in gone}
    left = dict(info.left_out) | {k: "mtp = false: the MTP layers are left out" for k in sorted(gone)}
    return dataclasses.replace(info, tensors=tensors, left_out=left)


def left_out_note(info: ModelInfo) -> str | None:
    if not info.left_out:
        return None
    prefixes = sorted({".".join(info.raw_names.get(k, k).split(".")[:3]) for k in info.left_out})
    return f"mtp = false: the MTP layer(s) {', '.join(prefixes)} are left out ({len(info.left_out)} tensors)"


def check_numbers(info: ModelInfo, targets: list[Target]) -> None:
    """Decoder layers past num_hidden_layers are MTP layers config.json omits; the MTP layers present are
    0..n-1 of the n it declares (none present is fine: many published checkpoints drop them, keeping n)."""
    llm = next((m for m in info.preset.modules if m.name == "llm"), None)
    if llm is not None:
        error = past_decoder_error(
            info,
            sorted({t.layer for t in targets if t.module is llm and t.layer is not None and not t.mtp}),
            llm.layers,
        )
        if error:
            raise error
    indices = {t.layer for t in targets if t.mtp and t.layer is not None}
    if not indices:
        return
    n = mtp_count(info.preset, info.config, info.hf_dir / "config.json")
    if sorted(indices) != list(range(n)):
        mtp = info.preset.mtp
        assert mtp is not None
        raise ConvertError(
            f"{info.hf_dir}/config.json: {mtp.field[0]} = {n} but the weights hold MTP layers "
            f"{sorted(indices)} (counted after the decoder layers)"
        )


def past_decoder_error(info: ModelInfo, layers: list[int], field: str) -> ConvertError | None:
    """A clear error for decoder layer numbers past num_hidden_layers that are MTP layers config.json omits."""
    mtp = info.preset.mtp
    want = info.field_int(field)
    extra = [n for n in layers if n >= want]
    if mtp is None or not extra:
        return None
    n = mtp_count(info.preset, info.config, info.hf_dir / "config.json")
    return ConvertError(
        f"{info.hf_dir}/config.json: {info.field_path(field)} = {want} and {mtp.field[0]} = {n}, but the weights "
        f"hold layer(s) {extra[0]}..{extra[-1]} past them; set {mtp.field[0]} to the number of MTP layers"
    )


def renamed(preset: Preset, targets: list[Target]) -> dict[str, str]:
    """{key: key written} for the targets a naming moves when MTP layers are written (MindSpeed-LLM's final
    norm goes from the decoder to the model: `final_layernorm`); placed as before."""
    if preset.mtp is None or not preset.mtp.renames or not any(t.mtp for t in targets):
        return {}
    out = {}
    for t in targets:
        for old, new in preset.mtp.renames.items():
            if t.layer is None and t.key.startswith(old + "."):
                out[t.key] = new + t.key[len(old) :]
    return out


def mtp_embedding(info: ModelInfo, targets: list[Target], placements: dict[str, Placement]) -> list[Target]:
    """With the MTP block on another stage (or VPP chunk) than the embedding, that one's own copy of it:
    Megatron-Core builds an embedding wherever there is pre-processing or MTP."""
    from .targets import Target

    if not any(t.mtp for t in targets):
        return []
    emb = next((t for t in targets if t.layer is None and any(t.key.startswith(p) for p in t.module.first)), None)
    if emb is None:
        return []
    pl = placements[emb.module.name]
    if pl.first_cell is None or pl.first_cell == pl.last_cell:
        return []
    order = (emb.order[0], 3)
    return [Target(emb.key, emb.module, None, None, emb.param, emb.mapping, emb.sources, order, mtp=True)]
