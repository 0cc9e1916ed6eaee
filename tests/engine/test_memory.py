"""Peak memory does not grow with the model: a 1.1 GB conversion needs about what a tiny one does.

Each conversion runs as `mm-convert` in its own process and its peak RSS is read from
wait4, as bench/bench_convert.py does; the tiny fixture's peak is the baseline (Python,
numpy, pydantic, the CLI). The model is the bench generator's `mid` size, written
sparse (headers only; the data reads as zeros), so it costs no disk to make. What is
allowed on top of the baseline is a few bands and CRC windows per file writer
(engine/run/execute.py BAND, engine/formats/torch_zip.py); holding the model, a file or a large
share of either would exceed it.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
from pathlib import Path

import pytest

from tests.test_cli import BIN

REPO = Path(__file__).resolve().parents[2]
ALLOWED_MB = 192  # above the tiny model's peak, for a model of 1,137 MB


def _generator():
    spec = importlib.util.spec_from_file_location("make_qwen2vl_2b", REPO / "bench" / "make_qwen2vl_2b.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _peak_mb(*args: str) -> float:
    with subprocess.Popen([BIN / "mm-convert", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) as proc:
        _, status, usage = os.wait4(proc.pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, proc.stderr.read().decode() if proc.stderr else ""
    return usage.ru_maxrss / 1024


def _there_and_back(hf: Path, out: Path, llm: str, vit: str) -> tuple[float, float]:
    layout = [
        "--cfg.parallel_config.llm_pp_layers", llm, "--cfg.parallel_config.vit_pp_layers", vit,
        "--cfg.parallel_config.tp_size", "2",
    ]  # fmt: skip
    hf_arg = ["--cfg.hf_config.hf_dir", str(hf)]
    to_mm = _peak_mb("Qwen2VLConverter", "hf_to_mm", "--cfg.mm_dir", str(out / "mm"), *hf_arg, *layout)
    back = _peak_mb(
        "Qwen2VLConverter", "mm_to_hf", "--cfg.save_hf_dir", str(out / "hf"), "--cfg.mm_dir", str(out / "mm"),
        *hf_arg, *layout,
    )  # fmt: skip
    return to_mm, back


@pytest.mark.skipif(not hasattr(os, "wait4"), reason="peak RSS is read with wait4")
def test_peak_memory_does_not_grow_with_the_model(qwen2vl_dir: Path, tmp_path: Path) -> None:
    mid = tmp_path / "mid"
    nbytes = _generator().write_checkpoint(mid, "mid", sparse=True)
    assert nbytes > 1_100_000_000
    base = _there_and_back(qwen2vl_dir, tmp_path / "tiny", "[[1,3]]", "[[3,0]]")
    big = _there_and_back(mid, tmp_path / "big", "[[4,4]]", "[[4,0]]")  # TP2/PP2: cuts, gathers, 4 files at once
    assert (tmp_path / "big" / "hf" / "model-00002-of-00002.safetensors").stat().st_size == 555_187_800
    for name, b, m in zip(("hf_to_mm", "mm_to_hf"), base, big, strict=True):
        assert m - b < ALLOWED_MB, f"{name}: peak {m:.0f} MB against {b:.0f} MB for the tiny model"
        assert m < 1024
