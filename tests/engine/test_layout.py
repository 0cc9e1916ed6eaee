"""Layout validation: every rule of the engine issue, with its exact message."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from engine.errors import ConvertError
from engine.layout import ParallelConfig, layout_problems, validate_layout
from engine.source.hf_source import inspect_hf


def test_flat_list_is_one_chunk() -> None:
    pc = ParallelConfig(llm_pp_layers=[1, 3], vit_pp_layers=[3, 0])
    assert pc.llm_pp_layers == [[1, 3]] and pc.vit_pp_layers == [[3, 0]]
    assert (pc.pp_size, pc.vpp_size) == (2, 1)


def test_chunk_lists_must_have_equal_length() -> None:
    pc = ParallelConfig(llm_pp_layers=[[1, 1], [1, 1]], vit_pp_layers=[[3, 0]])
    assert pc.shape_problems() == [
        "parallel_config.vit_pp_layers has 1 VPP chunk(s) but llm_pp_layers has 2; give one list per chunk for both"
    ]
    pc = ParallelConfig(llm_pp_layers=[[1, 1], [1, 1, 0]], vit_pp_layers=[[3, 0], [0, 0]])
    assert pc.shape_problems() == [
        "parallel_config.llm_pp_layers[1] = [1, 1, 0] has 3 stage(s); every chunk needs 2 (the length of llm_pp_layers[0])"
    ]
    assert ParallelConfig(llm_pp_layers=[], vit_pp_layers=[[3]]).shape_problems() == [
        "parallel_config.llm_pp_layers is empty; give layer counts per stage, e.g. [[1,10,10,7]]"
    ]


def test_negative_counts_rejected() -> None:
    with pytest.raises(ValidationError):
        ParallelConfig(llm_pp_layers=[[5, -1]], vit_pp_layers=[[3, 0]])


def _problems(hf: Path, **kw) -> list[str]:
    return layout_problems(ParallelConfig(**kw), inspect_hf(hf))


def test_sums_must_match_config(qwen2vl_dir: Path) -> None:
    (msg,) = _problems(qwen2vl_dir, llm_pp_layers=[[1, 2]], vit_pp_layers=[[3, 0]])
    assert msg == (
        "parallel_config.llm_pp_layers [[1, 2]] sums to 3 but qwen2_vl/config.json has "
        "num_hidden_layers = 4; the sum must equal 4"
    )
    (msg,) = _problems(qwen2vl_dir, llm_pp_layers=[[1, 3]], vit_pp_layers=[[2, 0]])
    assert msg.startswith(
        "parallel_config.vit_pp_layers [[2, 0]] sums to 2 but qwen2_vl/config.json has vision_config."
    )


def test_tp_must_divide_heads_and_vocab(qwen2vl_dir: Path) -> None:
    probs = _problems(qwen2vl_dir, llm_pp_layers=[[4]], vit_pp_layers=[[3]], tp_size=3)
    assert probs == [
        "parallel_config.tp_size 3 does not divide vision_config.num_heads = 4 (qwen2_vl/config.json); "
        "use a tp_size among: 1, 2, 4",
        "parallel_config.tp_size 3 does not divide num_key_value_heads = 2 (qwen2_vl/config.json); "
        "use a tp_size among: 1, 2",
        "parallel_config.tp_size 3 does not divide vocab_size = 128 (qwen2_vl/config.json); "
        "use a tp_size among: 1, 2, 4, 8, 16, 32, 64, 128 or pad it with parallel_config.make_vocab_size_divisible_by",
    ]


def test_empty_stage_is_an_error(qwen2vl_dir: Path) -> None:
    (msg,) = _problems(qwen2vl_dir, llm_pp_layers=[[0, 4, 0]], vit_pp_layers=[[3, 0, 0]])
    assert msg == "parallel_config: pipeline stage 2 holds no layers of any module; every stage needs at least one"
    assert _problems(qwen2vl_dir, llm_pp_layers=[[2, 1], [0, 1]], vit_pp_layers=[[3, 0], [0, 0]]) == [
        "parallel_config: pipeline stage 0 of chunk 1 holds no layers of any module; every stage needs at least one"
    ]


def test_module_may_sit_on_some_stages(qwen2vl_dir: Path) -> None:
    assert _problems(qwen2vl_dir, llm_pp_layers=[[0, 1, 3]], vit_pp_layers=[[2, 1, 0]]) == []
    assert _problems(qwen2vl_dir, llm_pp_layers=[[1, 1], [1, 1]], vit_pp_layers=[[3, 0], [0, 0]]) == []


def test_validate_raises_first_problem(qwen2vl_dir: Path) -> None:
    with pytest.raises(ConvertError, match="sums to 3"):
        validate_layout(ParallelConfig(llm_pp_layers=[[3]], vit_pp_layers=[[3]]), inspect_hf(qwen2vl_dir))
