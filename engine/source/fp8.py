"""FP8 block-quantised weights (DeepSeek-V3's hub release), dequantised while streaming.

Such a checkpoint stores a Linear's `X.weight` in float8_e4m3fn and beside it `X.weight_scale_inv`,
one float per block of `weight_block_size` (128 x 128) elements, the last blocks of a row or column
partial. The weight is `weight.float() * scale_inv` with each scale spread over its block, rounded
once to the target dtype. Users otherwise run a separate bf16 pre-pass that doubles their disk use.

The source view shows each such pair as one tensor in the target dtype (`Fp8Meta`): planning,
splitting and fusing see an ordinary tensor, and only the executor's byte reader knows to read
fp8 rows and their scales and multiply, a band of rows at a time (bounded memory, BAND bytes of
float32 at most). The way back writes the dequantised weights (re-quantising is not lossless).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import ConvertError
from ..formats.safetensors_header import TensorMeta, ViewMeta, itemsize

if TYPE_CHECKING:
    from .hf_source import ModelInfo, TensorReader

FP8 = "float8_e4m3fn"
SCALE_SUFFIX = "_scale_inv"
DEFAULT_BLOCK = (128, 128)
PARAMS_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
BAND = 4 << 20  # bytes of float32 work space per step of rows


@dataclass(frozen=True, slots=True)
class Fp8Meta(ViewMeta):
    """A dequantised weight: `raw` (fp8 bytes) times `scale` (one float per block), shown as `dtype`."""

    scale: TensorMeta | None = None
    block: tuple[int, int] = DEFAULT_BLOCK

    def fill(self, reader: TensorReader, r0: int, r1: int, c0: int, c1: int, dest: np.ndarray) -> None:
        _dequantise(reader, self, r0, r1, c0, c1, dest)


def block_size(config: dict[str, Any], where: str) -> tuple[int, int]:
    """`quantization_config.weight_block_size` of config.json (DeepSeek-V3: [128, 128])."""
    q = config.get("quantization_config")
    size = q.get("weight_block_size") if isinstance(q, dict) else None
    if size is None:
        return DEFAULT_BLOCK
    if not (isinstance(size, list) and len(size) == 2 and all(isinstance(x, int) and x > 0 for x in size)):
        raise ConvertError(
            f"{where}: quantization_config.weight_block_size = {size!r}; expected two positive integers, "
            "e.g. [128, 128]"
        )
    return size[0], size[1]


def dequantised(info: ModelInfo, dtype: str = "bfloat16") -> ModelInfo:
    """`info` with every fp8 weight and its scale shown as one `dtype` tensor; unchanged without fp8."""
    fp8 = [name for name, m in info.tensors.items() if m.dtype == FP8]
    if not fp8:
        return info
    where = str(info.hf_dir / "config.json")
    block = block_size(info.config, where)
    tensors = dict(info.tensors)
    for name in fp8:
        raw = tensors[name]
        scale = tensors.pop(name + SCALE_SUFFIX, None)
        if scale is None:
            raise ConvertError(
                f"{raw.file}: tensor {info.raw_names.get(name, name)!r} is float8_e4m3fn but has no "
                f"{name.rsplit('.', 1)[-1]}{SCALE_SUFFIX} beside it; only block-scaled FP8 weights "
                "(DeepSeek-V3's) are read"
            )
        _check(raw, scale, block, info)
        tensors[name] = Fp8Meta(
            name, dtype, raw.shape, raw.file, raw.begin, raw.numel * itemsize(dtype), raw=raw, scale=scale, block=block
        )
    stray = sorted(n for n in tensors if n.endswith(SCALE_SUFFIX) and n.removesuffix(SCALE_SUFFIX) not in fp8)
    if stray:
        raise ConvertError(
            f"{tensors[stray[0]].file}: tensor {info.raw_names.get(stray[0], stray[0])!r} scales a weight that is "
            "not float8_e4m3fn (or absent); block scales belong to FP8 weights only"
        )
    return dataclasses.replace(info, tensors=tensors)


def _check(raw: TensorMeta, scale: TensorMeta, block: tuple[int, int], info: ModelInfo) -> None:
    name = info.raw_names.get(raw.name, raw.name)
    if len(raw.shape) != 2:
        raise ConvertError(f"{raw.file}: FP8 tensor {name!r} has shape {list(raw.shape)}; only 2-D weights are read")
    want = [-(-raw.shape[0] // block[0]), -(-raw.shape[1] // block[1])]
    if list(scale.shape) != want:
        raise ConvertError(
            f"{scale.file}: {info.raw_names.get(scale.name, scale.name)!r} has shape {list(scale.shape)}; "
            f"{name} {list(raw.shape)} in blocks of {list(block)} needs {want}"
        )
    if scale.dtype not in ("float32", "bfloat16", "float16"):
        raise ConvertError(f"{scale.file}: {scale.name!r} is {scale.dtype}; FP8 scales are float32, bf16 or fp16")


def with_params_dtype(info: ModelInfo, params_dtype: str) -> ModelInfo:
    """The dequantised weights in `params_dtype` (bf16, fp16, fp32); other tensors keep their stored dtype."""
    dtype = PARAMS_DTYPES[params_dtype]
    tensors = {
        name: dataclasses.replace(m, dtype=dtype, nbytes=m.numel * itemsize(dtype)) if isinstance(m, Fp8Meta) else m
        for name, m in info.tensors.items()
    }
    return dataclasses.replace(info, tensors=tensors)


def unquantised_config(info: ModelInfo) -> str | None:
    """config.json for the way back from FP8 weights, which writes them dequantised: without its
    quantization_config (transformers would read the weights as FP8); None when nothing was FP8."""
    if not any(isinstance(m, Fp8Meta) for m in info.tensors.values()):
        return None
    config = {k: v for k, v in info.config.items() if k != "quantization_config"}
    return json.dumps(config, indent=2) + "\n"


def _dequantise(reader: TensorReader, meta: Fp8Meta, r0: int, r1: int, c0: int, c1: int, dest: np.ndarray) -> None:
    """Rows [r0, r1), columns [c0, c1) of the dequantised weight into `dest` (uint8, rows x cols x itemsize).

    A few rows at a time (BAND bytes of float32 at most), each block row's scales spread over the columns
    only: the work space is BAND plus one row of scales, whatever the tensor.
    """
    import torch

    assert meta.raw is not None and meta.scale is not None
    cols = meta.shape[1]
    br, bc = meta.block
    scale_dtype = getattr(torch, meta.scale.dtype)
    out_dtype = getattr(torch, meta.dtype)
    scale_row_bytes = meta.scale.nbytes // meta.scale.shape[0]
    step = max(1, min(br, BAND // (4 * cols)))  # never across a block row: one row of scales per step
    a = r0
    while a < r1:
        b = min(r1, a + step, (a // br + 1) * br)
        raw = np.empty((b - a) * cols, dtype=np.uint8)
        reader.read_rows_into(meta.raw, a, b, memoryview(raw))
        sbuf = np.empty(scale_row_bytes, dtype=np.uint8)
        reader.read_rows_into(meta.scale, a // br, a // br + 1, memoryview(sbuf))
        scale = torch.from_numpy(sbuf).view(scale_dtype).float().repeat_interleave(bc)[:cols]
        w = torch.from_numpy(raw).view(torch.float8_e4m3fn).reshape(b - a, cols).float()
        w.mul_(scale)
        part = w[:, c0:c1].to(out_dtype)
        dest[a - r0 : b - r0] = part.contiguous().view(torch.uint8).numpy().reshape(b - a, c1 - c0, -1)
        a = b
