"""Source shapes against config.json: the tensors must be the model the config describes.

Bytes alone do not say what a tensor is: a [160, 128] embedding has the bytes of a
[320, 64] one, and a conversion would split it by the wrong rows without a word. So before
planning, the language model's matrices are checked against the config's sizes, and the
error names the config field:

- the vocabulary tables (embedding, untied output layer) are vocab_size x hidden_size;
- every other matrix of the language model reads or writes the hidden state: a
  row-parallel one (tp = "cols": attention output, MLP down) has hidden_size rows, the
  rest (q/k/v, gate/up, router) hidden_size columns;
- gate and up are intermediate_size x hidden_size (an expert's: moe_intermediate_size
  when the family has that field);
- q, k and v hold whole heads (checked where the plan fuses them, engine/plan.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import ConvertError

if TYPE_CHECKING:
    from .hf_source import ModelInfo
    from .plan import _Target
    from .safetensors_header import TensorMeta

HIDDEN = "hidden_size"  # the language model's width, by the name every LLM preset gives it
INTERMEDIATE = "intermediate_size"
MOE_INTERMEDIATE = "moe_intermediate_size"


def check_shapes(info: ModelInfo, targets: list[_Target]) -> None:
    """Raise ConvertError for the first mapped tensor whose shape contradicts config.json."""
    fields = info.preset.fields
    hidden = info.field_int(HIDDEN) if HIDDEN in fields else None
    for t in targets:
        vocab_field = t.module.vocab
        if vocab_field is None or hidden is None or t.param != "weight":
            continue  # only the language model's matrices have sizes the config names
        mp = t.mapping
        if mp.pad_vocab:
            for src in t.sources:
                _expect(info, src, [(vocab_field, 0), (HIDDEN, 1)])
            continue
        if any(len(src.shape) != 2 for src in t.sources):
            continue
        if mp.tp == "cols":
            for src in t.sources:
                _expect(info, src, [(HIDDEN, 0)])
            continue
        for src in t.sources:
            _expect(info, src, [(HIDDEN, 1)])
        if mp.kind == "gate_up":
            inter = MOE_INTERMEDIATE if t.expert is not None and MOE_INTERMEDIATE in fields else INTERMEDIATE
            if inter in fields:
                for src in t.sources:
                    _expect(info, src, [(inter, 0)])


def _expect(info: ModelInfo, src: TensorMeta, dims: list[tuple[str, int]]) -> None:
    """`src.shape[dim]` equals each named field's value, or one line naming the fields."""
    ndim = max(len(src.shape), 1 + max(d for _, d in dims))
    if len(src.shape) == ndim and all(src.shape[d] == info.field_int(f) for f, d in dims):
        return
    said = " and ".join(f"{info.field_path(f)} = {info.field_int(f)}" for f, _ in dims)
    want = ["*"] * ndim
    for f, d in dims:
        want[d] = str(info.field_int(f))
    raw = info.raw_names.get(src.name, src.name)
    raise ConvertError(
        f"{src.file}: {raw} has shape {list(src.shape)}, but config.json says {said}, so it must be [{', '.join(want)}]"
    )
