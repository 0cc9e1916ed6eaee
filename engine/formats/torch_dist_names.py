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
  `pre_mlp_layernorm` the same way while TE's spec keeps it (`written_names`).
- Experts (SequentialMLP) get a second prepended axis: `decoder.layers.mlp.experts.experts.linear_fc1.weight` is
  `(num_layers, num_experts, rows, hidden)`; with dense and MoE layers mixed nothing is stacked and each layer
  is `decoder.layers.N.…` (only the expert axis is prepended).
- A TP-split tensor's global form is the TP 1 tensor: row split at `rank * rows`, column split at
  `rank * cols`; the gated `linear_fc1` is `[gate; up]` but each rank holds two chunks, its gate block at
  `rank * n` and its up block at `tp * n + rank * n` (mlp.py `apply_swiglu_sharded_factory`). Replicated
  tensors are one chunk, written by TP rank 0 (the main replica).
- Each linear module's `_extra_state` is a byte entry `<module>._extra_state/shard_<layer>_<num_layers>`
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

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_EXPERT = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.(.+)$")


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


class Chunker:
    """The torch_dist chunks of each tensor of a legacy plan in `layout` (local names, as build_plan makes them)."""

    def __init__(
        self, info: ModelInfo, layout: ParallelConfig, field: str = "format", stacked: bool | None = None
    ) -> None:
        preset = info.preset
        if [m.name for m in preset.modules] != ["llm"] or preset.modules[0].target_prefix:
            raise ConvertError(
                f"{field} = torch_dist: Megatron-Core's torch_dist is written for GPT language models; "
                f"{preset.title} is not one (use format legacy)"
            )
        if any(mp.mm.endswith("linear_kv_down_proj") for mp in preset.mappings):
            raise ConvertError(
                f"{field} = torch_dist: {preset.title} has multi-latent attention, which torch_dist does not write "
                "yet (use format legacy)"
            )
        if layout.noop_layers:
            raise ConvertError(
                f"{field} = torch_dist: parallel_config.noop_layers {layout.noop_layers} are MindSpeed-LLM's; "
                "Megatron-Core's torch_dist has no empty layers"
            )
        self.tp = layout.tp_size
        self.rules = [(_mm_pattern(mp), mp) for mp in preset.mappings]
        counts = layout.layers_of("llm")
        self.num_layers = sum(map(sum, counts))
        self.global_layer: dict[tuple[int, int, int], int] = {}
        n = 0
        for c, chunk in enumerate(counts):
            for s, k in enumerate(chunk):
                for j in range(k):
                    self.global_layer[(c, s, j)] = n
                    n += 1
        tie = preset.tie
        self.tied_copy = tie.target if tie and is_tied(info) else None
        module = preset.modules[0]
        self.num_experts = info.field_int(module.experts) if module.experts else 0
        self.per_rank = self.num_experts // layout.ep_size if self.num_experts else 0
        moe = {t.layer for t in model_targets(info) if t.expert is not None}
        # megatron-core stacks layers only when all are alike; with dense and MoE layers mixed (moe_layer_freq
        # a list) each layer is its own tensor `decoder.layers.N.…` (TransformerBlock.sharded_state_dict)
        self.stacked = (not moe or len(moe) == info.field_int(module.layers)) if stacked is None else stacked

    def rule(self, key: str) -> Mapping:
        for pat, mp in self.rules:
            if pat.match(key):
                return mp
        raise ConvertError(f"torch_dist: {key} matches no mapping of the preset")  # a bug: the plan made the key

    def chunks(
        self, key: str, name: str, shape: tuple[int, ...], cell: tuple[int, int], tp_rank: int, ep_rank: int = 0
    ) -> list[Chunk]:
        """The chunks of rank tensor `key` (local name; `name` is its written name) of `shape`, in VPP chunk and
        PP stage `cell`, on TP rank `tp_rank` and EP rank `ep_rank`; [] when another rank writes it (a replica)
        or it is not written."""
        if key == self.tied_copy:
            return []  # the output layer of a tied model is the embedding
        mp = self.rule(key)
        rule = mp.tp if self.tp > 1 or mp.tp == "gated" else "replicate"
        if rule == "cols" and len(shape) < 2:
            rule = "replicate"
        if self.tp > 1 and rule != "replicate" and (mp.uneven or mp.head_split):
            raise ConvertError(
                f"format = torch_dist: {key} is split in whole heads or uneven rows, which torch_dist does not "
                "write yet (use format legacy)"
            )
        rows = shape[0] if shape else 1
        if rule == "replicate":
            if tp_rank:
                return []
            parts = [((0,) * len(shape), shape, (0, rows))]
        elif rule == "rows":
            parts = [((tp_rank * rows, *(0,) * (len(shape) - 1)), (rows * self.tp, *shape[1:]), (0, rows))]
        elif rule == "cols":
            cols = shape[1]
            parts = [((0, tp_rank * cols, *(0,) * (len(shape) - 2)), (rows, cols * self.tp, *shape[2:]), (0, rows))]
        else:  # gated: [gate; up] globally, a gate block and an up block per rank
            n = rows // 2
            rest = (0,) * (len(shape) - 1)
            g = (rows * self.tp, *shape[1:])
            parts = [((tp_rank * n, *rest), g, (0, n)), ((self.tp * n + tp_rank * n, *rest), g, (n, rows))]
        where = self._where(name, cell, ep_rank)
        if where is None:
            return []
        fqn, axes = where
        lead, sizes = tuple(i for i, _ in axes), tuple(n for _, n in axes)
        return [
            Chunk(fqn, (*sizes, *g), (*lead, *o), (*(1,) * len(axes), b - a, *shape[1:]), (a, b))
            for o, g, (a, b) in parts
        ]

    def _where(self, name: str, cell: tuple[int, int], ep_rank: int) -> tuple[str, list[tuple[int, int]]] | None:
        """(global name, [(index, size)] of the axes megatron-core prepends: layer, expert), or None when
        another expert-parallel rank writes it (dense weights are the same on every EP rank)."""
        m = _LAYER.match(name)
        if m is None:
            return (name, []) if ep_rank == 0 else None
        layer = self.global_layer[(cell[0], cell[1], int(m[1]))]
        prefix, axes = (
            ("decoder.layers.", [(layer, self.num_layers)]) if self.stacked else (f"decoder.layers.{layer}.", [])
        )
        x = _EXPERT.match(m[2])
        if x is None:
            return (prefix + m[2], axes) if ep_rank == 0 else None
        expert = ep_rank * self.per_rank + int(x[1])
        return f"{prefix}mlp.experts.experts.{x[2]}", [*axes, (expert, self.num_experts)]

    def extra_states(self, names: list[str], cell: tuple[int, int], tp_rank: int, ep_rank: int) -> list[str]:
        """The `_extra_state/shard_..` byte entries of one legacy chunk's modules (`names`: its written keys)."""
        if tp_rank:
            return []
        out = []
        for key in extra_state_keys(names):
            where = self._where(key, cell, ep_rank)
            if where is not None:
                fqn, axes = where
                shard = "_".join(".".join(str(x) for x in t) for t in zip(*axes, strict=True)) if axes else "0_1"
                out.append(f"{fqn}/shard_{shard}")
        return out


_PRE_MLP = re.compile(r"^(.*layers\.\d+\.)pre_mlp_layernorm\.(weight|bias)$")


def written_names(keys: list[str], impl: str = "local") -> dict[str, str]:
    """{local key: torch_dist key} for one rank chunk: Transformer Engine's names for the fused norms. An MoE
    layer's `pre_mlp_layernorm` is a norm of its own in TE's spec, but megatron-core's local spec saves it as
    `mlp.linear_fc1.layer_norm_*` all the same (its sharded_state_dict_keys_map): `impl` says which spec."""
    renamed = to_te(keys)
    out = {k: renamed.get(k, k) for k in keys}
    if impl == "local":
        for k, v in out.items():
            if k == v and (m := _PRE_MLP.match(k)):
                out[k] = f"{m[1]}mlp.linear_fc1.layer_norm_{m[2]}"
    return out
