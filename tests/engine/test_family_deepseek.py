"""DeepSeek-V3 (MLA, dense + MoE layers, router bias, shared experts): layout, round trips, re-split."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from engine.layout import ParallelConfig
from tests.engine.test_hf_to_mm import _assert_same, _load_dir
from tests.engine.test_llm_families import _hf_to_mm, assert_resplit_is_direct, assert_round_trip
from tests.fixtures.reference_deepseek import expected_checkpoint
from tests.fixtures.tiny_deepseek import tiny_deepseek_model
from tests.fixtures.tiny_vlm import load_hf_state

VARIANTS = ["v3", "v3_no_q_lora", "v2_lite"]
LAYOUTS = {
    # name: (tp, ep, llm_pp_layers)
    "tp1": (1, 1, [[3]]),
    "tp2": (2, 1, [[3]]),
    "pp2": (1, 1, [[1, 2]]),
    "ep2": (1, 2, [[3]]),  # local experts 0 and 1 on each EP rank
    "tp2pp2ep2": (2, 2, [[1, 2]]),
    "pp3_ep4": (1, 4, [[1, 1, 1]]),  # one expert per EP rank
}


def _pc(name: str) -> ParallelConfig:
    tp, ep, llm = LAYOUTS[name]
    return ParallelConfig(tp_size=tp, ep_size=ep, llm_pp_layers=llm)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("variant", VARIANTS)
def test_layout_matches_reference(tiny_deepseeks: dict[str, Path], tmp_path: Path, variant: str, layout: str) -> None:
    hf = tiny_deepseeks[variant]
    tp, ep, llm = LAYOUTS[layout]
    _hf_to_mm(hf, tmp_path / "out", _pc(layout))
    want = expected_checkpoint(load_hf_state(hf), tp=tp, pp_layers=llm, ep=ep, experts=4)
    _assert_same(_load_dir(tmp_path / "out"), want)


@pytest.mark.parametrize("layout", ["tp2", "pp2", "ep2", "tp2pp2ep2", "pp3_ep4"])
def test_hf_mm_hf_is_byte_identical(tiny_deepseeks: dict[str, Path], tmp_path: Path, layout: str) -> None:
    assert_round_trip(tiny_deepseeks["v3"], tmp_path, _pc(layout))


@pytest.mark.parametrize(("a", "b"), [("tp1", "tp2pp2ep2"), ("tp2pp2ep2", "pp3_ep4"), ("ep2", "tp2")])
def test_resplit_equals_direct_conversion(tiny_deepseeks: dict[str, Path], tmp_path: Path, a: str, b: str) -> None:
    assert_resplit_is_direct(tiny_deepseeks["v3"], tmp_path, _pc(a), _pc(b))


# ---- the oracle: megatron-core's MLA + MoE GPTModel on our files == transformers on the HF files ----

TOKENS = [3, 17, 99, 5, 42, 7, 64, 127, 0, 11, 23, 88]


def deepseek_arch(hf: Path):
    """megatron-core's configuration of the HF config.json (MLA, sigmoid router with bias, shared experts)."""
    from mmtui.megatron_logits import GPTArch

    c = json.loads((hf / "config.json").read_text())
    if c["model_type"] == "deepseek_v2":  # softmax over all experts, greedy top-k, not renormalised
        router = {"moe_router_pre_softmax": True}
    else:  # sigmoid + bias, group-limited top-k, renormalised
        router = {
            "moe_router_score_function": "sigmoid", "moe_router_enable_expert_bias": True,
            "moe_router_num_groups": c["n_group"], "moe_router_group_topk": c["topk_group"],
        }  # fmt: skip
    return GPTArch(
        num_layers=c["num_hidden_layers"], hidden_size=c["hidden_size"], num_attention_heads=c["num_attention_heads"],
        num_query_groups=c["num_attention_heads"], ffn_hidden_size=c["intermediate_size"], vocab_size=c["vocab_size"],
        rotary_base=c["rope_theta"], norm_epsilon=c["rms_norm_eps"], add_qkv_bias=False,
        tied=c["tie_word_embeddings"], qk_layernorm=True, kv_channels=c["v_head_dim"],
        num_moe_experts=c["n_routed_experts"], moe_router_topk=c["num_experts_per_tok"],
        moe_ffn_hidden_size=c["moe_intermediate_size"],
        moe_layer_freq=[int(i >= c["first_k_dense_replace"]) for i in range(c["num_hidden_layers"])],
        mla={
            "q_lora_rank": c["q_lora_rank"], "kv_lora_rank": c["kv_lora_rank"], "qk_head_dim": c["qk_nope_head_dim"],
            "qk_pos_emb_head_dim": c["qk_rope_head_dim"], "v_head_dim": c["v_head_dim"], "rope_type": "rope",
            "rotary_scaling_factor": 1.0,
        },
        extra=router | {
            "moe_router_topk_scaling_factor": c["routed_scaling_factor"],
            "moe_shared_expert_intermediate_size": c["moe_intermediate_size"] * c["n_shared_experts"],
        },
    )  # fmt: skip


def _ranks(mm: Path, tp: int, ep: int) -> list[dict]:
    out = []
    for e in range(ep):
        for t in range(tp):
            name = f"mp_rank_{t:02d}" + (f"_{e:03d}" if ep > 1 else "")
            out.append(torch.load(mm / "release" / name / "model_optim_rng.pt", weights_only=True)["model"])
    return out


def _hf_logits(hf: Path) -> torch.Tensor:
    model, _ = tiny_deepseek_model(hf)
    with torch.no_grad():
        return model(input_ids=torch.tensor([TOKENS])).logits[0]


@pytest.mark.oracle
# TP and EP each alone are covered exactly by the reference tests; the consumer runs unsplit and both at once
@pytest.mark.parametrize(("tp", "ep"), [(1, 1), (2, 2)])
@pytest.mark.parametrize("variant", VARIANTS)
def test_megatron_reproduces_transformers_logits(
    tiny_deepseeks: dict[str, Path], tmp_path: Path, variant: str, tp: int, ep: int
) -> None:
    pytest.importorskip("megatron.core")
    from mmtui.megatron_logits import megatron_logits

    hf = tiny_deepseeks[variant]
    mm = _hf_to_mm(hf, tmp_path / "mm", ParallelConfig(tp_size=tp, ep_size=ep, llm_pp_layers=[[3]]))
    got = megatron_logits(_ranks(mm, tp, ep), deepseek_arch(hf), TOKENS, ep=ep)
    torch.testing.assert_close(got, _hf_logits(hf), rtol=0, atol=1e-4)


@pytest.mark.oracle
def test_oracle_sees_a_wrong_down_projection_split(tiny_deepseeks: dict[str, Path], tmp_path: Path) -> None:
    """Swapping the TP halves of linear_kv_down_proj must change the logits, or the oracle proves nothing."""
    pytest.importorskip("megatron.core")
    from mmtui.megatron_logits import megatron_logits

    hf = tiny_deepseeks["v3"]
    ranks = _ranks(_hf_to_mm(hf, tmp_path / "mm", _pc("tp2")), 2, 1)
    key = "decoder.layers.1.self_attention.linear_kv_down_proj.weight"
    ranks[0][key], ranks[1][key] = ranks[1][key], ranks[0][key]
    got = megatron_logits(ranks, deepseek_arch(hf), TOKENS)
    assert (got - _hf_logits(hf)).abs().max() > 1e-3
