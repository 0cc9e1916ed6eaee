"""Transformer Engine's names for the norms it fuses into the next linear layer.

Megatron-LM's default layers (`--transformer-impl transformer_engine`) build the attention's
QKV and a dense MLP's fc1 as `TELayerNormColumnParallelLinear`, which owns the norm before
it: `input_layernorm.weight` is saved as `self_attention.linear_qkv.layer_norm_weight` and
`pre_mlp_layernorm.weight` as `mlp.linear_fc1.layer_norm_weight` (Megatron-LM's
`tools/checkpoint/schema_core.py`, `CoreTESchema`). An MoE layer keeps `pre_mlp_layernorm`
as a separate norm (its experts take the normalised input), and so does every norm with no
fused linear after it (Qwen3's q/k norms, the final norm). With multi-latent attention the
q and kv norms move into `linear_q_up_proj` / `linear_kv_up_proj` the same way.

The local names (MindSpeed's, and Megatron-Core's `--transformer-impl local`) are our
canonical ones: plans are built with them, and this module renames a plan's rank-file keys
to TE's when writing, and builds the forward plan with TE's names when reading, so the
checks against the disk are unchanged. A norm is renamed only where its layer holds the
linear that would own it, which is what tells a dense layer from an MoE layer.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Literal

from ..errors import ConvertError
from ..formats.mm_source import MmCheckpoint, read_rank_file
from ..source.hf_source import ModelInfo
from .mtp import has_mtp
from .plan import Plan

TransformerImpl = Literal["local", "transformer_engine"]
LOCAL: TransformerImpl = "local"
TE: TransformerImpl = "transformer_engine"

# local norm module -> the TE linear that owns it (within one layer); the norm's `weight`/`bias`
# become that linear's `layer_norm_weight`/`layer_norm_bias`
FUSED: tuple[tuple[str, str], ...] = (
    ("input_layernorm", "self_attention.linear_qkv"),
    ("pre_mlp_layernorm", "mlp.linear_fc1"),
    ("self_attention.q_layernorm", "self_attention.linear_q_up_proj"),  # MLA with q/kv norms
    ("self_attention.kv_layernorm", "self_attention.linear_kv_up_proj"),
)

_LAYER = re.compile(r"^(?P<layer>(?:.*\.)?layers\.\d+\.)(?P<rest>.+)$")
_LOCAL = re.compile(r"^(?P<norm>" + "|".join(re.escape(n) for n, _ in FUSED) + r")\.(?P<param>weight|bias)$")
_TE = re.compile(
    r"^(?P<linear>" + "|".join(re.escape(li) for _, li in FUSED) + r")\.layer_norm_(?P<param>weight|bias)$"
)
_OWNER = dict(FUSED)
_NORM = {li: n for n, li in FUSED}


def to_te(keys: Iterable[str]) -> dict[str, str]:
    """{local key: TE key} for the keys of one state dict (one rank file's chunk) that TE fuses."""
    keys = list(keys)
    present = set(keys)
    out = {}
    for key in keys:
        m = _LAYER.match(key)
        n = _LOCAL.match(m["rest"]) if m else None
        if m is None or n is None:
            continue
        linear = m["layer"] + _OWNER[n["norm"]]
        if f"{linear}.weight" in present:
            out[key] = f"{linear}.layer_norm_{n['param']}"
    return out


def to_local(keys: Iterable[str]) -> dict[str, str]:
    """{TE key: local key} for the fused-norm keys among `keys` (TE's names read back)."""
    out = {}
    for key in keys:
        m = _LAYER.match(key)
        t = _TE.match(m["rest"]) if m else None
        if m is not None and t is not None:
            out[key] = f"{m['layer']}{_NORM[t['linear']]}.{t['param']}"
    return out


def is_te_key(key: str) -> bool:
    m = _LAYER.match(key)
    return bool(m and _TE.match(m["rest"]))


def check_preset(info: ModelInfo, impl: TransformerImpl | None, field: str) -> None:
    """Transformer Engine's names are Megatron-LM's GPT language model's; a VLM's layers are MindSpeed-MM's."""
    preset = info.preset
    if impl == TE and ([m.name for m in preset.modules] != ["llm"] or preset.modules[0].target_prefix):
        raise ConvertError(
            f"{field} = transformer_engine: Transformer Engine names are Megatron-LM's GPT language model's; "
            f"{preset.title} is written with MindSpeed-MM's names (local); use transformer_impl local"
        )
    if impl == TE and has_mtp(info):  # TE's names for the MTP block are not known from a loader we can run
        raise ConvertError(
            f"{field} = transformer_engine: the model has multi-token-prediction layers, whose Transformer Engine "
            "names are not written yet (MindSpeed-LLM refuses the two together too); use transformer_impl local, "
            "or mtp false to leave them out"
        )


# the modules Megatron-LM's TE spec builds from Transformer Engine (gpt_layer_specs.py): their `_extra_state`
# is in the state dict a strict load expects (TE's norms too, from TE 1.13); the router, the output layer
# and the embedding are not TE modules
_TE_MODULE = re.compile(
    r"^(?:.*\.)?(?:layers\.\d+\.(?:self_attention\.(?:linear_\w+|q_layernorm|k_layernorm|kv_layernorm)"
    r"|mlp\.(?:linear_fc[12]|shared_experts\.linear_fc[12]|experts\.(?:local_experts\.\d+\.)?linear_fc[12])"
    r"|pre_mlp_layernorm)|final_layernorm)$"
)


_WEIGHT = re.compile(r"^(.*)\.weight\d*$")


def extra_state_keys(keys: Iterable[str]) -> list[str]:
    """`<module>._extra_state` for each Transformer Engine module whose weight is among `keys` (TE names);
    a grouped linear (TEGroupedMLP's `linear_fc1.weight0..N`) has one, as TE saves it in a torch checkpoint."""
    modules = dict.fromkeys(m[1] for k in keys if (m := _WEIGHT.match(k)))
    return [f"{m}._extra_state" for m in modules if _TE_MODULE.match(m)]


def rename_plan(plan: Plan, impl: TransformerImpl) -> Plan:
    """The plan with its Megatron rank-file keys in `impl`'s names (in place; `local` changes nothing), and for
    Transformer Engine each TE module's `_extra_state` written as None, as TE saves it without FP8, so a
    strict load finds every key it expects."""
    if impl == LOCAL:
        return plan
    for f in plan.files:
        if f.kind != "torch":
            continue
        for chunk in f.chunks:
            names = to_te(e.key for e in chunk)
            for e in chunk:
                e.key = names.get(e.key, e.key)
        f.empty = [extra_state_keys(e.key for e in chunk) for chunk in f.chunks]
    return plan


def detect(ckpt: MmCheckpoint) -> tuple[TransformerImpl | None, str]:
    """Which names a checkpoint on disk uses, and the key that tells (None: no layer keys at all).

    Reads rank-file metadata until a layer's norm is found; a mix of both is left to the
    key-by-key check against the layout, which names the key.
    """
    for path in ckpt.ranks.values():
        for chunk in read_rank_file(path).values():
            te = next((k for k in chunk if is_te_key(k)), None)
            if te is not None:
                return TE, te
            local = next(iter(to_te(chunk)), None)
            if local is not None:
                return LOCAL, local
    return None, ""


def resolve(
    info: ModelInfo, ckpt: MmCheckpoint, given: TransformerImpl | None, field: str, where: str
) -> TransformerImpl:
    """The names to read `ckpt` with: `given`, checked against the disk, or the disk's when not given."""
    check_preset(info, given, field)
    if ckpt.dist is not None:  # torch_dist always names norms as TE does, whatever the spec it was trained with;
        return given or LOCAL  # its reader renames, so it reads like either (and a re-cut defaults to local)
    seen, key = detect(ckpt)
    if given is None:
        impl = seen or LOCAL
        check_preset(info, impl, f"{where} {ckpt.root} (its keys, e.g. {key})")
        return impl
    if seen is not None and seen != given:
        raise ConvertError(
            f"{field} = {given}, but {where} {ckpt.root} holds {_said(seen)} names ({key}); "
            f"give {seen} or leave {field} out to read it from the disk"
        )
    return given


def _said(impl: TransformerImpl) -> str:
    return "Transformer Engine" if impl == TE else "local"
