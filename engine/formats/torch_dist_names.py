"""Where a Megatron rank tensor sits in Megatron-Core's `torch_dist` checkpoint: one rule for writer and reader.

megatron-core 0.16 saves a GPTModel (`dist_checkpointing.save` of `model.sharded_state_dict()`) as global
tensors that do not depend on the layout it ran with:
- Homogeneous decoder layers are stacked on a leading axis: `decoder.layers.self_attention.linear_qkv.weight`
  is `(num_layers, rows, hidden)`; each layer of each TP rank is its own chunk `(1, rows / tp, hidden)` at
  `(layer, tp_rank * rows / tp, 0)` (TransformerBlock prepends `(0, global layer, num_layers)`). With PP and
  VPP the layer axis is still the global one.
- Norms carry Transformer Engine's names even with the local spec (its `sharded_state_dict_keys_map`):
  `input_layernorm` -> `self_attention.linear_qkv.layer_norm_weight`, `pre_mlp_layernorm` ->
  `mlp.linear_fc1.layer_norm_weight` (engine/planning/te_names.py); in MoE layers the local spec renames
  `pre_mlp_layernorm` the same way while TE's spec keeps it (`Chunker.names`). The local MLA spec
  (DeepSeek) has no such map: its `input_layernorm`, `q_layernorm`, `kv_layernorm`, `pre_mlp_layernorm`
  keep their names; every MLA projection is a ColumnParallelLinear (row chunks), `linear_proj` a
  RowParallelLinear. MTP layers are `mtp.layers.N.…` (never stacked; experts on their axis).
- A vision-language model (MindSpeed-MM's VLMModel) is each module's own sharded state dict under its prefix:
  `text_decoder.` is a GPTModel (the same rules; norms renamed by its layer spec's map),
  `image_encoder.encoder.blocks.layers.…` the vision layers stacked on their own axis (the vision spec has no
  keys map: `input_layernorm` / `pre_mlp_layernorm` stay), each module split at its own TP size
  (`vit_tp_size`); the ranks past it hold replicas.
- Experts (SequentialMLP) get a second prepended axis: `decoder.layers.mlp.experts.experts.linear_fc1.weight` is
  `(num_layers, num_experts, rows, hidden)`; with dense and MoE layers mixed nothing is stacked and each layer
  is `decoder.layers.N.…` (only the expert axis is prepended).
- A TP-split tensor's global form is the TP 1 tensor: row split at `rank * rows`, column split at
  `rank * cols`; the gated `linear_fc1` is `[gate; up]` but each rank holds two chunks, its gate block at
  `rank * n` and its up block at `tp * n + rank * n` (mlp.py `apply_swiglu_sharded_factory`). Replicated
  tensors are one chunk, written by TP rank 0 (the main replica).
- Each parallel linear module's `_extra_state` is a byte entry `<module>._extra_state/shard_<layer>_<num_layers>`
  (`shard_0_1` outside the layers) holding `torch.save([None])`, written by TP rank 0; GPTModel asks for them.
- A tied output layer is the embedding (no `output_layer.weight` at all).
Checked by loading with megatron-core (tests/engine/test_torch_dist.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import ConvertError
from ..layout import ParallelConfig
from ..planning.targets import model_targets
from ..planning.te_names import extra_state_keys, to_te
from ..preset import Mapping
from ..source.hf_source import ModelInfo
from ..source.tie import is_tied

CONFIG_NAME = "metadata.json"
COMMON_NAME = "common.pt"
METADATA_NAME = ".metadata"
# megatron-core's CheckpointingConfig as `json.dump(asdict(config))` writes it
CONFIG_TEXT = (
    '{"sharded_backend": "torch_dist", "sharded_backend_version": 1, "common_backend": "torch", '
    '"common_backend_version": 1}'
)
CONTENT_METADATA = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}
# what a trained checkpoint holds besides the model: read past, never needed
NOT_MODEL = ("optimizer.", "rng_state", "rerun_state_machine")
EXTRA_STATE = "._extra_state"

_EXPERT = re.compile(r"^(?P<head>.*)mlp\.experts\.local_experts\.(?P<expert>\d+)\.(?P<rest>.+)$")
# the modules megatron-core's tensor-parallel linears are (Column/RowParallelLinear): each has an extra state
_LINEAR = re.compile(r"^((?:.*\.)?(?:linear_[a-z0-9_]+|eh_proj))\.weight$")


@dataclass(frozen=True, slots=True)
class Chunk:
    """One chunk of a global tensor: the rows [rows) of a rank tensor, stored with the layer axis."""

    fqn: str  # the global tensor's name
    global_shape: tuple[int, ...]
    offset: tuple[int, ...]  # where the chunk starts in the global tensor
    shape: tuple[int, ...]  # the stored chunk's shape (a leading 1 for a layer)
    rows: tuple[int, int]  # the rank tensor's rows it holds

    @property
    def label(self) -> str:
        """A name unique within the checkpoint, for plans and progress: `fqn[3, 128, 0]`."""
        return f"{self.fqn}{list(self.offset)}"


def _mm_pattern(mp: Mapping) -> re.Pattern[str]:
    body = re.escape(mp.mm).replace(r"\*", r"\d+").replace(r"\#", r"\d+")
    return re.compile(body + ("$" if mp.bare else r"\.(?:weight|bias)$"))


@dataclass(frozen=True)
class _Stack:
    """One module's decoder layers: its own layer axis, numbered globally over PP stages and VPP chunks."""

    prefix: str  # `decoder.layers.`, `text_decoder.decoder.layers.`, `image_encoder.encoder.blocks.layers.`
    pattern: re.Pattern[str]
    num_layers: int
    stacked: bool  # False: each layer its own tensors `prefix N.…` (dense and MoE layers mixed)
    global_layer: dict[tuple[int, int, int], int]  # (VPP chunk, PP stage, local index) -> global layer


class Chunker:
    """The torch_dist chunks of each tensor of a legacy plan in `layout` (local names, as build_plan makes them)."""

    def __init__(
        self,
        info: ModelInfo,
        layout: ParallelConfig,
        field: str = "format",
        stacked: dict[str, bool] | None = None,
        impl: str = "local",
    ) -> None:
        preset = info.preset
        if preset.naming != "megatron_core":
            raise ConvertError(
                f"{field} = torch_dist: {preset.title} with naming {preset.naming}; torch_dist is written with "
                "Megatron-Core's module names only (naming megatron_core), or use format legacy"
            )
        if layout.noop_layers:
            raise ConvertError(
                f"{field} = torch_dist: parallel_config.noop_layers {layout.noop_layers} are MindSpeed-LLM's; "
                "Megatron-Core's torch_dist has no empty layers"
            )
        if layout.grouped:
            raise ConvertError(
                f"{field} = torch_dist: parallel_config.moe_grouped_gemm = {layout.moe_grouped_gemm} is a rank-file "
                "layout; torch_dist stores experts one by one on an expert axis whatever the training used (Megatron-"
                "Core's GroupedMLP saves them so): leave moe_grouped_gemm out"
            )
        self.impl = impl
        self.layout = layout
        self.rules = [(_mm_pattern(mp), mp) for mp in preset.mappings]
        self.preset = preset
        self.heads = {mp.heads: info.field_int(mp.heads) for mp in preset.mappings if mp.heads}
        self.vocab = {m.name: info.field_int(m.vocab) for m in preset.modules if m.vocab}
        # the local MLA spec has no sharded_state_dict_keys_map: its norms keep their own names
        self.mla = any(mp.mm.endswith("linear_kv_down_proj") for mp in preset.mappings)
        tie = preset.tie
        self.tied_copy = tie.target if tie and is_tied(info) else None
        targets = model_targets(info)
        self.stacks: list[_Stack] = []
        self.num_experts = self.per_rank = 0
        for m in preset.modules:
            counts = layout.layers_of(m.name)
            glob: dict[tuple[int, int, int], int] = {}
            for c, chunk in enumerate(counts):
                for s, k in enumerate(chunk):
                    for j in range(k):
                        glob[(c, s, j)] = len(glob)
            n = info.field_int(m.layers)
            moe = {t.layer for t in targets if t.module is m and t.expert is not None and not t.mtp}
            # megatron-core stacks layers only when all are alike; with dense and MoE layers mixed (moe_layer_freq
            # a list) each layer is its own tensor `decoder.layers.N.…` (TransformerBlock.sharded_state_dict)
            alike = not moe or len(moe) == n
            one = alike if stacked is None else stacked.get(m.name, True)
            pattern = re.compile("^" + re.escape(m.layer_prefix) + r"(\d+)\.(.+)$")
            self.stacks.append(_Stack(m.layer_prefix, pattern, len(glob), one, glob))
            if m.experts:
                self.num_experts = info.field_int(m.experts)
                self.per_rank = self.num_experts // layout.ep_size

    @property
    def num_layers(self) -> int:
        return sum(s.num_layers for s in self.stacks)

    def note(self) -> str:
        """What the plan writes, for its notes."""
        parts = [
            f"{st.prefix.rstrip('.')}: {st.num_layers} layers "
            + ("stacked" if st.stacked else "each their own tensors (dense and MoE layers mixed)")
            for st in self.stacks
        ]
        return "Megatron-Core torch_dist: " + "; ".join(parts) + "; one .distcp file per TP x PP x EP rank"

    def rule(self, key: str) -> Mapping:
        for pat, mp in self.rules:
            if pat.match(key):
                return mp
        raise ConvertError(f"torch_dist: {key} matches no mapping of the preset")  # a bug: the plan made the key

    def tp_of(self, key: str) -> int:
        """The TP size the tensor is split at: its module's (vit_tp_size, ...), the experts' own for experts."""
        if _EXPERT.match(key):
            return self.layout.etp
        return self.layout.tp_of(self.preset.module_of_target(key).name)

    def chunks(
        self, key: str, name: str, shape: tuple[int, ...], cell: tuple[int, int], tp_rank: int, ep_rank: int = 0
    ) -> list[Chunk]:
        """The chunks of rank tensor `key` (local name; `name` is its written name) of `shape`, in VPP chunk and
        PP stage `cell`, on TP rank `tp_rank` and EP rank `ep_rank`; [] when another rank writes it (a replica)
        or it is not written."""
        if key == self.tied_copy:
            return []  # the output layer of a tied model is the embedding
        mp = self.rule(key)
        tp = self.tp_of(key)
        if tp_rank >= tp:
            return []  # a module split at a smaller TP size repeats its shards over the larger group
        rule = mp.tp if tp > 1 or mp.tp == "gated" else "replicate"
        if rule == "cols" and len(shape) < 2:
            rule = "replicate"
        if tp > 1 and rule != "replicate":
            self._check_even(key, mp, tp)
        rows = shape[0] if shape else 1
        if rule == "replicate":
            if tp_rank:
                return []
            parts = [((0,) * len(shape), shape, (0, rows))]
        elif rule == "rows":
            parts = [((tp_rank * rows, *(0,) * (len(shape) - 1)), (rows * tp, *shape[1:]), (0, rows))]
        elif rule == "cols":
            cols = shape[1]
            parts = [((0, tp_rank * cols, *(0,) * (len(shape) - 2)), (rows, cols * tp, *shape[2:]), (0, rows))]
        else:  # gated: [gate; up] globally, a gate block and an up block per rank
            n = rows // 2
            rest = (0,) * (len(shape) - 1)
            g = (rows * tp, *shape[1:])
            parts = [((tp_rank * n, *rest), g, (0, n)), ((tp * n + tp_rank * n, *rest), g, (n, rows))]
        where = self._where(name, cell, ep_rank)
        if where is None:
            return []
        fqn, axes = where
        lead, sizes = tuple(i for i, _ in axes), tuple(n for _, n in axes)
        return [
            Chunk(fqn, (*sizes, *g), (*lead, *o), (*(1,) * len(axes), b - a, *shape[1:]), (a, b))
            for o, g, (a, b) in parts
        ]

    def _check_even(self, key: str, mp: Mapping, tp: int) -> None:
        """A split in whole heads is megatron-core's even row (or column) split when the heads divide by TP;
        uneven rows and heads as [q; k; v] blocks (InternViT) are not a ColumnParallelLinear's."""
        heads = self.heads.get(mp.heads, 0) if mp.heads else 0
        vocab = self.vocab.get(self.preset.module_of_target(key).name, 0) if mp.pad_vocab else 0
        uneven = mp.uneven and (not vocab or self.layout.padded_vocab(vocab) % tp)
        if uneven or mp.blocks != 1 or (mp.head_split and heads % tp):
            what = "uneven rows" if uneven else f"[q; k; v] blocks of {heads} heads" if mp.blocks != 1 else (
                f"{heads} heads")  # fmt: skip
            raise ConvertError(
                f"format = torch_dist: {key} is split over {tp} TP ranks in {what}, which no Megatron-Core "
                "parallel linear holds (use format legacy)"
            )

    def _where(self, name: str, cell: tuple[int, int], ep_rank: int) -> tuple[str, list[tuple[int, int]]] | None:
        """(global name, [(index, size)] of the axes megatron-core prepends: layer, expert), or None when
        another expert-parallel rank writes it (dense weights are the same on every EP rank)."""
        fqn, axes = name, []
        for st in self.stacks:
            m = st.pattern.match(name)
            if m is not None:
                layer = st.global_layer[(cell[0], cell[1], int(m[1]))]
                fqn, axes = (
                    (st.prefix + m[2], [(layer, st.num_layers)]) if st.stacked else (f"{st.prefix}{layer}.{m[2]}", [])
                )
                break
        x = _EXPERT.match(fqn)
        if x is None:
            return (fqn, axes) if ep_rank == 0 else None
        expert = ep_rank * self.per_rank + int(x["expert"])
        return f"{x['head']}mlp.experts.experts.{x['rest']}", [*axes, (expert, self.num_experts)]

    def extra_states(self, names: list[str], cell: tuple[int, int], tp_rank: int, ep_rank: int) -> list[str]:
        """The `_extra_state/shard_..` byte entries of one legacy chunk's modules (`names`: its written keys):
        every parallel linear's (megatron-core's Column/RowParallelLinear), Transformer Engine's modules with its
        spec, and the final norms (which TE's spec asks for; the local spec ignores them)."""
        if tp_rank:
            return []
        te = extra_state_keys(names)
        if self.impl == "local":  # the local spec's norms are torch's; the final norms' are kept for TE's spec
            te = [k for k in te if k.endswith("final_layernorm._extra_state")]
        else:  # TE's MLA spec keeps input_layernorm a TENorm of its own (an entry too many is never an error)
            te += [f"{k[: -len('.weight')]}._extra_state" for k in names if k.endswith(".input_layernorm.weight")]
        modules = dict.fromkeys([*te, *(f"{m[1]}._extra_state" for k in names if (m := _LINEAR.match(k)))])
        out = []
        for key in modules:
            where = self._where(key, cell, ep_rank)
            if where is not None:
                fqn, axes = where
                shard = "_".join(".".join(str(x) for x in t) for t in zip(*axes, strict=True)) if axes else "0_1"
                out.append(f"{fqn}/shard_{shard}")
        return out

    def names(self, keys: list[str]) -> dict[str, str]:
        """{local key: torch_dist key} for one rank chunk, as the layer specs' `sharded_state_dict_keys_map` say.

        Transformer Engine's spec fuses norms into the next linear (engine/planning/te_names.py). Megatron-core's local
        GPT spec saves `input_layernorm` / `pre_mlp_layernorm` under those names too (an MoE layer's as well),
        and so does MindSpeed-MM's language-model spec; its vision layers' spec has no such map, nor has the
        local MLA spec: their norms keep their names."""
        if self.impl != "local":
            renamed = to_te(keys)
            return {k: renamed.get(k, k) for k in keys}
        out = {k: k for k in keys}
        if self.mla:
            return out
        llm = next((s.prefix for s, m in zip(self.stacks, self.preset.modules, strict=True) if m.name == "llm"), None)
        if llm is None:
            return out
        renamed = to_te(keys)
        for k in keys:
            if not k.startswith(llm):
                continue
            if k in renamed:
                out[k] = renamed[k]
            elif m := _PRE_MLP.match(k):
                out[k] = f"{m[1]}mlp.linear_fc1.layer_norm_{m[2]}"
        return out


_PRE_MLP = re.compile(r"^(.*layers\.\d+\.)pre_mlp_layernorm\.(weight|bias)$")


def detect_impl(info: ModelInfo, fqns: list[str]) -> str:
    """Which spec's names a torch_dist checkpoint holds (it reads like either; a re-cut keeps them): TE's keeps
    an MoE layer's `pre_mlp_layernorm`, the local spec renames it; with MLA, TE fuses the q/kv norms."""
    llm = next((m.layer_prefix for m in info.preset.modules if m.name == "llm"), "decoder.layers.")
    if any(".linear_kv_down_proj." in k for k in fqns):
        return "transformer_engine" if any("linear_kv_up_proj.layer_norm_" in k for k in fqns) else "local"
    return "transformer_engine" if any(k.startswith(llm) and ".pre_mlp_layernorm." in k for k in fqns) else "local"
