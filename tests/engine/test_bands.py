"""Tensors built band by band write exactly the bytes of tensors built whole.

The writers get a cut or gathered tensor BAND bytes at a time (engine.run.execute.bands).
Here BAND is one byte, so every band is one row and every column cut maps one source
row at a time, and the kernel copy of whole rows is switched off so that every tensor
goes through the bands. The outputs must equal, file for file, the default run's,
which the family tests check against independent references.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.job import (
    HfConfig,
    HfToDcpConfig,
    HfToMmConfig,
    Job,
    LoraConfig,
    LoraHfToMmConfig,
    MmToHfConfig,
    prepare,
)
from engine.layout import ParallelConfig
from engine.planning.plan import Entry, Piece, Plan
from engine.run import execute
from engine.run.execute import bands, run
from engine.source.hf_source import TensorReader, inspect_hf
from tests.engine.test_way_back import _same_tree
from tests.fixtures.tiny_lora import build_peft_adapter

VL_TP2_PP2 = ParallelConfig(tp_size=2, llm_pp_layers=[[1, 3]], vit_pp_layers=[[3, 0]])


def _both_ways(job: Job, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run the job by default and with one-row bands and no kernel copy; assert the same files."""
    _, plan = prepare(job, check_out=False)
    run(plan, tmp_path / "default")
    with monkeypatch.context() as m:
        m.setattr(execute, "BAND", 1)
        m.setattr(execute, "whole_row_spans", lambda *_, **__: None)
        run(plan, tmp_path / "bands")
    _same_tree(tmp_path / "default", tmp_path / "bands")
    return tmp_path / "default"


def test_vision_language_both_ways(tiny_dirs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    hf = tiny_dirs["qwen2_vl_tied"]
    cfg = HfToMmConfig(mm_dir=tmp_path / "unused", hf_config=HfConfig(hf_dir=hf), parallel_config=VL_TP2_PP2)
    mm = _both_ways(Job(converter="Qwen2VLConverter", command="hf_to_mm", cfg=cfg), tmp_path / "to", monkeypatch)
    back = MmToHfConfig(
        save_hf_dir=tmp_path / "x", mm_dir=mm, hf_config=HfConfig(hf_dir=hf), parallel_config=VL_TP2_PP2
    )
    _both_ways(Job(converter="Qwen2VLConverter", command="mm_to_hf", cfg=back), tmp_path / "back", monkeypatch)


def test_padded_vocabulary_and_dcp(tiny_llms: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    hf = tiny_llms["qwen3_vocab99"]
    layout = ParallelConfig(tp_size=2, llm_pp_layers=[[4]], make_vocab_size_divisible_by=8)
    cfg = HfToMmConfig(mm_dir=tmp_path / "unused", hf_config=HfConfig(hf_dir=hf), parallel_config=layout)
    _both_ways(Job(converter="Qwen3Converter", command="hf_to_mm", cfg=cfg), tmp_path / "pad", monkeypatch)
    dcp = HfToDcpConfig(dcp_dir=tmp_path / "unused", hf_config=HfConfig(hf_dir=hf))
    _both_ways(Job(converter="Qwen3Converter", command="hf_to_dcp", cfg=dcp), tmp_path / "dcp", monkeypatch)


def test_internvl_uneven_heads(tiny_internvls: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    layout = ParallelConfig(tp_size=4, llm_pp_layers=[[1, 3]], vit_pp_layers=[[3, 0]])
    cfg = HfToMmConfig(
        mm_dir=tmp_path / "u", hf_config=HfConfig(hf_dir=tiny_internvls["qwen2"]), parallel_config=layout
    )
    _both_ways(Job(converter="InternVLConverter", command="hf_to_mm", cfg=cfg), tmp_path / "ivl", monkeypatch)


def test_adapter_with_zero_blocks(tiny_llms: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    hf = tiny_llms["llama"]
    adapter = tmp_path / "adapter"
    build_peft_adapter(hf, adapter)
    cfg = LoraHfToMmConfig(
        mm_dir=tmp_path / "u", hf_config=HfConfig(hf_dir=hf), lora=LoraConfig(adapter_dir=adapter),
        parallel_config=ParallelConfig(tp_size=2, llm_pp_layers=[[1, 3]]),
    )  # fmt: skip
    _both_ways(Job(converter="LlamaConverter", command="lora_hf_to_mm", cfg=cfg), tmp_path / "lora", monkeypatch)


def test_a_column_cut_comes_in_bands_of_band_size(qwen2vl_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    info = inspect_hf(qwen2vl_dir)
    meta = info.tensors["model.embed_tokens.weight"]
    rows, cols = meta.shape
    half_row = meta.nbytes // rows // 2
    monkeypatch.setattr(execute, "BAND", 3 * half_row)  # three target rows a band
    entry = Entry("right", (rows, cols // 2), meta.dtype, (Piece(meta.name, (0, rows), (cols // 2, cols)),), "")
    reader = TensorReader()
    try:
        got = [bytes(view) for view in bands(entry, Plan([], {meta.name: meta}, {}), reader)]
        expect = reader.read(meta)[:, cols // 2 :].contiguous().view(-1).view(torch.uint8).numpy().tobytes()
    finally:
        reader.close()
    assert [len(g) for g in got] == [3 * half_row] * (rows // 3) + ([rows % 3 * half_row] if rows % 3 else [])
    assert b"".join(got) == expect
