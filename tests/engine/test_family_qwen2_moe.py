"""Qwen2-MoE (Qwen3-MoE's names, QKV biases, a shared expert scaled by a sigmoid gate): layout, round trips, logits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.layout import ParallelConfig
from engine.preset import builtin_presets
from tests.engine.test_hf_to_mm import _assert_same, _load_dir
from tests.engine.test_llm_families import (
    TOKENS,
    _arch,
    _cfg,
    _hf_to_mm,
    assert_resplit_is_direct,
    assert_round_trip,
)
from tests.fixtures.reference_layout import expected_checkpoint
from tests.fixtures.tiny_llm import tiny_llm_model
from tests.fixtures.tiny_vlm import load_hf_state

LAYOUTS = {
    # name: (tp, ep, llm_pp_layers)
    "tp1": (1, 1, [[4]]),
    "tp2": (2, 1, [[4]]),
    "tp2pp2ep2": (2, 2, [[1, 3]]),
    "vpp_ep4": (1, 4, [[1, 1], [1, 1]]),
}


def _pc(name: str) -> ParallelConfig:
    tp, ep, llm = LAYOUTS[name]
    return ParallelConfig(tp_size=tp, ep_size=ep, llm_pp_layers=llm)


def test_preset_is_qwen3_moe_plus_the_shared_expert() -> None:
    qwen2, qwen3 = builtin_presets()["qwen2_moe"], builtin_presets()["qwen3_moe"]
    assert qwen2.mappings[: len(qwen3.mappings)] == qwen3.mappings
    assert [m.mm for m in qwen2.mappings[len(qwen3.mappings) :]] == [
        "decoder.layers.*.mlp.shared_experts.linear_fc1",
        "decoder.layers.*.mlp.shared_experts.linear_fc2",
        "decoder.layers.*.mlp.shared_experts.gate_weight",
    ]


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_reference(tiny_llms: dict[str, Path], tmp_path: Path, layout: str) -> None:
    hf = tiny_llms["qwen2_moe"]
    tp, ep, llm = LAYOUTS[layout]
    _hf_to_mm(hf, tmp_path / "out", _pc(layout))
    cfg = _cfg(hf)
    want = expected_checkpoint(
        load_hf_state(hf), family="qwen2_moe", num_heads=cfg["num_attention_heads"],
        num_kv_heads=cfg["num_key_value_heads"], vit_num_heads=0, tied=False, tp=tp, llm_pp_layers=llm,
        vit_pp_layers=None, prefix="", ep=ep,
    )  # fmt: skip
    _assert_same(_load_dir(tmp_path / "out"), want)


@pytest.mark.parametrize("layout", ["tp2pp2ep2", "vpp_ep4"])
def test_hf_mm_hf_is_byte_identical(tiny_llms: dict[str, Path], tmp_path: Path, layout: str) -> None:
    assert_round_trip(tiny_llms["qwen2_moe"], tmp_path, _pc(layout))


def test_resplit_equals_direct_conversion(tiny_llms: dict[str, Path], tmp_path: Path) -> None:
    assert_resplit_is_direct(tiny_llms["qwen2_moe"], tmp_path, _pc("tp2pp2ep2"), _pc("vpp_ep4"))


@pytest.mark.oracle
@pytest.mark.parametrize(("tp", "ep"), [(1, 1), (2, 2)])
def test_megatron_reproduces_transformers_logits(tiny_llms: dict[str, Path], tmp_path: Path, tp: int, ep: int) -> None:
    pytest.importorskip("megatron.core")
    from mmtui.megatron_logits import megatron_logits

    hf = tiny_llms["qwen2_moe"]
    c = _cfg(hf)
    arch = _arch(
        hf, add_qkv_bias=True, num_moe_experts=c["num_experts"], moe_router_topk=c["num_experts_per_tok"],
        moe_ffn_hidden_size=c["moe_intermediate_size"],
        moe_layer_freq=[0 if i in c["mlp_only_layers"] else 1 for i in range(c["num_hidden_layers"])],
        extra={
            "moe_shared_expert_intermediate_size": c["shared_expert_intermediate_size"],
            "moe_shared_expert_gate": True,
            "moe_router_pre_softmax": True,  # softmax over all experts, top-k weights not renormalised
        },
    )  # fmt: skip
    mm = _hf_to_mm(hf, tmp_path / "mm", ParallelConfig(tp_size=tp, ep_size=ep, llm_pp_layers=[[4]]))
    ranks = []
    for e in range(ep):
        for t in range(tp):
            name = f"mp_rank_{t:02d}" + (f"_{e:03d}" if ep > 1 else "")
            ranks.append(torch.load(mm / "release" / name / "model_optim_rng.pt", weights_only=True)["model"])
    got = megatron_logits(ranks, arch, TOKENS, ep=ep)
    model, _ = tiny_llm_model(hf)
    with torch.no_grad():
        want = model(input_ids=torch.tensor([TOKENS])).logits[0]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_more_mappings_needs_extends(tmp_path: Path) -> None:
    from engine.errors import ConvertError
    from engine.preset import load_preset_file

    path = tmp_path / "x.toml"
    path.write_text('name = "x"\n[[more_mappings]]\nhf = "a"\nmm = "b"\n')
    with pytest.raises(ConvertError) as err:
        load_preset_file(path)
    assert str(err.value) == f"{path}: more_mappings adds to the mappings of the preset it extends; set `extends`"
