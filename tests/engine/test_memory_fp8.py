"""Dequantising FP8 weights while streaming keeps peak memory bounded: a 0.6 GB FP8 DeepSeek-V3-shaped
model (1.2 GB once dequantised to bf16) converts in about what the tiny FP8 fixture needs.

Like tests/engine/test_memory.py: each conversion is an `mm-convert` process whose peak RSS is read
from wait4; the big model is written sparse by bench/make_deepseek_v3.py (headers only; its zeros
dequantise to zeros). The dequantisation works on a band of rows at a time (engine/source/fp8.py BAND of
float32 work space, beside the writers' bands).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from tests.engine.test_memory import _peak_mb

REPO = Path(__file__).resolve().parents[2]
ALLOWED_MB = 256  # above the tiny model's peak, for 1.2 GB of dequantised output


def _generator():
    spec = importlib.util.spec_from_file_location("make_deepseek_v3", REPO / "bench" / "make_deepseek_v3.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _to_mm(hf: Path, out: Path, llm: str) -> float:
    return _peak_mb(
        "DeepseekV3Converter", "hf_to_mm", "--cfg.mm_dir", str(out), "--cfg.hf_config.hf_dir", str(hf),
        "--cfg.parallel_config.llm_pp_layers", llm, "--cfg.parallel_config.tp_size", "2",
        "--cfg.parallel_config.ep_size", "2",
    )  # fmt: skip


@pytest.mark.skipif(not hasattr(os, "wait4"), reason="peak RSS is read with wait4")
def test_peak_memory_of_fp8_dequantisation_does_not_grow_with_the_model(
    tiny_deepseeks: dict[str, Path], tmp_path: Path
) -> None:
    mid = tmp_path / "mid"
    nbytes = _generator().write_sparse(mid, "mid")
    assert nbytes > 550_000_000
    base = _to_mm(tiny_deepseeks["v3_fp8"], tmp_path / "tiny", "[[1,2]]")
    big = _to_mm(mid, tmp_path / "big", "[[2,2]]")
    written = sum(p.stat().st_size for p in (tmp_path / "big").rglob("*.pt"))
    assert written > 2 * nbytes  # bf16 is twice fp8, and the dense weights are on both EP ranks
    assert big - base < ALLOWED_MB, f"peak {big:.0f} MB against {base:.0f} MB for the tiny model"
    assert big < 1024
