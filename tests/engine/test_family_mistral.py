"""The README's worked example of adding a family: Mistral is presets/mistral.toml plus this file.

A tiny checkpoint made by transformers; the naive reference layout, the byte-exact way
back, and megatron-core's logits are the three checks every family gets.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.layout import ParallelConfig
from engine.source.hf_source import inspect_hf
from tests.engine.test_hf_to_mm import _assert_same, _load_dir
from tests.engine.test_llm_families import TOKENS, _arch, _hf_to_mm, _rank_models, assert_round_trip
from tests.fixtures.reference_layout import expected_checkpoint
from tests.fixtures.tiny_llm import build_tiny_llm, tiny_llm_model
from tests.fixtures.tiny_vlm import load_hf_state

TP2_PP2 = ParallelConfig(tp_size=2, llm_pp_layers=[[1, 3]])


@pytest.fixture(scope="module")
def mistral(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llm(tmp_path_factory.mktemp("hf") / "mistral", family="mistral", shards=2)


def test_detected_from_config(mistral: Path) -> None:
    preset = inspect_hf(mistral).preset
    assert (preset.name, preset.converter) == ("mistral", "MistralConverter")


def test_every_rank_file_matches_the_reference(mistral: Path, tmp_path: Path) -> None:
    mm = _hf_to_mm(mistral, tmp_path / "mm", TP2_PP2)
    want = expected_checkpoint(
        load_hf_state(mistral), family="mistral", num_heads=4, num_kv_heads=2, vit_num_heads=0, tied=False,
        tp=2, llm_pp_layers=[[1, 3]], vit_pp_layers=None, prefix="",
    )  # fmt: skip
    _assert_same(_load_dir(mm), want)


def test_way_back_is_byte_identical(mistral: Path, tmp_path: Path) -> None:
    assert_round_trip(mistral, tmp_path, TP2_PP2)


@pytest.mark.oracle
def test_megatron_reproduces_transformers_logits(mistral: Path, tmp_path: Path) -> None:
    pytest.importorskip("megatron.core")
    from mmtui.megatron_logits import megatron_logits

    mm = _hf_to_mm(mistral, tmp_path / "mm", ParallelConfig(tp_size=2, llm_pp_layers=[[4]]))
    got = megatron_logits(_rank_models(mm, 2), _arch(mistral), TOKENS)
    model, _ = tiny_llm_model(mistral)
    with torch.no_grad():
        want = model(input_ids=torch.tensor([TOKENS])).logits[0]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
