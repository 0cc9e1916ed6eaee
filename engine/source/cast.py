"""Weights cast to another float dtype while streaming (`--cfg.params_dtype`, MindSpeed-LLM's `--params-dtype`).

Megatron holds every parameter in its params dtype; a checkpoint for it is written in that
dtype. As with FP8 dequantisation (engine/source/fp8.py), the source view shows each cast tensor in
the target dtype (`CastMeta`), so planning, splitting and fusing see an ordinary tensor, and
only the executor's byte reader converts, a band of rows at a time (bounded memory). Each value
is rounded once, as `tensor.to(dtype)` rounds it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..formats.safetensors_header import TensorMeta, ViewMeta, itemsize
from .fp8 import PARAMS_DTYPES

if TYPE_CHECKING:
    from .hf_source import ModelInfo, TensorReader

FLOATS = ("float16", "bfloat16", "float32", "float64")
BAND = 4 << 20  # bytes of the source read per step


@dataclass(frozen=True, slots=True)
class CastMeta(ViewMeta):
    """`raw`'s values in `dtype`."""

    def fill(self, reader: TensorReader, r0: int, r1: int, c0: int, c1: int, dest: np.ndarray) -> None:
        _cast(reader, self, r0, r1, c0, c1, dest)


def with_params_dtype(info: ModelInfo, params_dtype: str | None) -> ModelInfo:
    """`info` with every float weight shown in `params_dtype` (bf16, fp16, fp32); None keeps each tensor's own
    dtype (FP8 weights are then dequantised to bf16). Integer tensors are never cast."""
    if params_dtype is None:
        return info
    dtype = PARAMS_DTYPES[params_dtype]
    tensors: dict[str, TensorMeta] = {}
    for name, m in info.tensors.items():
        if isinstance(m, ViewMeta):  # converted by its own fill, which casts too
            tensors[name] = dataclasses.replace(m, dtype=dtype, nbytes=m.numel * itemsize(dtype))
        elif m.dtype in FLOATS and m.dtype != dtype:
            tensors[name] = CastMeta(name, dtype, m.shape, m.file, m.begin, m.numel * itemsize(dtype), raw=m)
        else:
            tensors[name] = m
    return dataclasses.replace(info, tensors=tensors)


def _cast(reader: TensorReader, meta: CastMeta, r0: int, r1: int, c0: int, c1: int, dest: np.ndarray) -> None:
    """Rows [r0, r1), columns [c0, c1) of the cast tensor into `dest` (uint8, rows x cols x itemsize)."""
    import torch

    raw = meta.raw
    assert raw is not None
    rows = raw.shape[0] if raw.shape else 1
    row_bytes = raw.nbytes // rows if rows else 0
    cols = raw.shape[1] if len(raw.shape) >= 2 else 1  # the block model's columns: dim 1, the rest rides along
    src, out = getattr(torch, raw.dtype), getattr(torch, meta.dtype)
    step = max(1, BAND // max(1, row_bytes))
    for a in range(r0, r1, step):
        b = min(r1, a + step)
        buf = np.empty((b - a) * row_bytes, dtype=np.uint8)
        reader.read_rows_into(raw, a, b, memoryview(buf))
        values = torch.from_numpy(buf).view(src).reshape(b - a, cols, -1)[:, c0:c1].to(out)  # a conv's 5-D too
        dest[a - r0 : b - r0] = values.contiguous().view(torch.uint8).numpy().reshape(b - a, c1 - c0, -1)
