"""Source shapes against config.json: the tensors must be the model the config describes.

Bytes alone do not say what a tensor is: a [160, 128] embedding has the bytes of a
[320, 64] one, and a conversion would split it by the wrong rows without a word. So before
planning, the matrices are checked against the config's sizes, and the error names the
config field:

- the vocabulary tables (embedding, untied output layer) are vocab_size x hidden_size;
- every other matrix of the language model, and every matrix of a vision layer, reads or
  writes its module's hidden state (hidden_size, or the vision width): a row-parallel one
  (tp = "cols": attention output, MLP down) has that many rows, the rest (q/k/v, gate/up,
  router) that many columns. The vision patch embedding and projector change width, so
  they are left out;
- gate and up are intermediate_size x hidden_size (an expert's: moe_intermediate_size
  when the family has that field);
- q holds whole heads (num_attention_heads), k and v as many heads of that size as
  num_key_value_heads says.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import ConvertError

if TYPE_CHECKING:
    from ..formats.safetensors_header import TensorMeta
    from ..planning.targets import Target
    from .hf_source import ModelInfo

# each module's width, by the field name the presets give it
HIDDEN = {"llm": "hidden_size", "vit": "vit_hidden", "audio": "audio_hidden"}
INTERMEDIATE = "intermediate_size"
MOE_INTERMEDIATE = "moe_intermediate_size"


def check_shapes(info: ModelInfo, targets: list[Target]) -> None:
    """Raise ConvertError for the first mapped tensor whose shape contradicts config.json."""
    fields = info.preset.fields
    for t in targets:
        hidden = HIDDEN[t.module.name]
        if hidden not in fields or t.param != "weight":
            continue
        mp = t.mapping
        if mp.pad_vocab and t.module.vocab:
            for src in t.sources:
                _expect(info, src, [(t.module.vocab, 0), (hidden, 1)])
            continue
        if (t.layer is None and not t.module.vocab) or mp.inner or any(len(src.shape) != 2 for src in t.sources):
            continue  # a vision encoder's patch embedding and projector; norms and other vectors
        for src in t.sources:
            _expect(info, src, [(hidden, 0 if mp.tp == "cols" else 1)])
        if mp.kind == "qkv":
            _heads(info, t)
        # a shared expert's width is n_shared_experts x moe_intermediate_size (DeepSeek) or
        # shared_expert_intermediate_size (Qwen2-MoE): a family's own field, not checked here
        if mp.kind == "gate_up" and t.module.vocab and ".shared_expert" not in mp.mm:
            inter = MOE_INTERMEDIATE if t.expert is not None and MOE_INTERMEDIATE in fields else INTERMEDIATE
            if inter in fields:
                for src in t.sources:
                    _expect(info, src, [(inter, 0)])


def _heads(info: ModelInfo, t: Target) -> None:
    """q is whole heads; k and v are the config's key/value heads of that size."""
    mp = t.mapping
    q, k, v = t.sources
    heads, groups = info.field_int(mp.heads or ""), info.field_int(mp.groups or "")
    h_path, g_path = info.field_path(mp.heads or ""), info.field_path(mp.groups or "")
    if q.shape[0] % heads:
        _fail(info, q, f"{h_path} = {heads}", f"whole heads: a multiple of {heads} rows")
    d = q.shape[0] // heads
    for src in (k, v):
        if src.shape[0] != groups * d:
            said = f"{g_path} = {groups} and q's head size is {d} ({q.shape[0]} rows / {h_path} = {heads})"
            _fail(info, src, said, f"[{groups * d}, *]")


def _expect(info: ModelInfo, src: TensorMeta, dims: list[tuple[str, int]]) -> None:
    """`src.shape[dim]` equals each named field's value, or one line naming the fields."""
    ndim = max(len(src.shape), 1 + max(d for _, d in dims))
    if len(src.shape) == ndim and all(src.shape[d] == info.field_int(f) for f, d in dims):
        return
    said = " and ".join(f"{info.field_path(f)} = {info.field_int(f)}" for f, _ in dims)
    want = ["*"] * ndim
    for f, d in dims:
        want[d] = str(info.field_int(f))
    _fail(info, src, said, f"[{', '.join(want)}]")


def _fail(info: ModelInfo, src: TensorMeta, said: str, want: str) -> None:
    raw = info.raw_names.get(src.name, src.name)
    shape = list(src.shape)
    raise ConvertError(f"{src.file}: {raw} has shape {shape}, but config.json says {said}, so it must be {want}")
