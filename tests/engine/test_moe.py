"""Mixture-of-experts models (Mixtral, Qwen3-MoE) with expert parallel: layout, round trips, re-split, logits."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from engine.errors import ConvertError
from engine.job import HfConfig, MmToHfConfig, prepare
from engine.layout import ParallelConfig, layout_problems
from engine.planning.build import build_plan
from engine.source.hf_source import inspect_hf
from tests.engine.test_hf_to_mm import _assert_same, _load_dir
from tests.engine.test_llm_families import (
    TOKENS,
    _arch,
    _cfg,
    _hf_to_mm,
    _job,
    assert_resplit_is_direct,
    assert_round_trip,
)
from tests.engine.test_way_back import _same_tree
from tests.fixtures.reference_layout import expected_checkpoint
from tests.fixtures.tiny_llm import tiny_llm_model
from tests.fixtures.tiny_vlm import load_hf_state

VARIANTS = ["mixtral", "qwen3_moe"]  # 4 experts, 2 per token; qwen3_moe's layer 1 is a dense MLP
LAYOUTS = {
    # name: (tp, ep, llm_pp_layers)
    "tp1": (1, 1, [[4]]),
    "tp2": (2, 1, [[4]]),
    "ep2": (1, 2, [[4]]),  # mp_rank_00_000, mp_rank_00_001
    "tp2ep2": (2, 2, [[4]]),
    "tp2pp2ep2": (2, 2, [[1, 3]]),  # mp_rank_TT_PPP_EEE
    "vpp_ep4": (1, 4, [[1, 1], [1, 1]]),  # one expert per rank
}


def _pc(name: str) -> ParallelConfig:
    tp, ep, llm = LAYOUTS[name]
    return ParallelConfig(tp_size=tp, ep_size=ep, llm_pp_layers=llm)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("variant", VARIANTS)
def test_layout_matches_reference(tiny_llms: dict[str, Path], tmp_path: Path, variant: str, layout: str) -> None:
    hf = tiny_llms[variant]
    tp, ep, llm = LAYOUTS[layout]
    _hf_to_mm(hf, tmp_path / "out", _pc(layout))
    cfg = _cfg(hf)
    want = expected_checkpoint(
        load_hf_state(hf), family=cfg["model_type"], num_heads=cfg["num_attention_heads"],
        num_kv_heads=cfg["num_key_value_heads"], vit_num_heads=0, tied=False, tp=tp, llm_pp_layers=llm,
        vit_pp_layers=None, prefix="", ep=ep,
    )  # fmt: skip
    _assert_same(_load_dir(tmp_path / "out"), want)


def test_rank_directories_and_local_expert_numbers(tiny_llms: dict[str, Path]) -> None:
    plan = build_plan(inspect_hf(tiny_llms["mixtral"]), _pc("tp2pp2ep2"))
    assert [f.dir_name for f in plan.files] == [
        "mp_rank_00_000_000", "mp_rank_00_000_001", "mp_rank_00_001_000", "mp_rank_00_001_001",
        "mp_rank_01_000_000", "mp_rank_01_000_001", "mp_rank_01_001_000", "mp_rank_01_001_001",
    ]  # fmt: skip
    by_name = {f.dir_name: f for f in plan.files}
    # EP rank 1 holds global experts 2 and 3 as local experts 0 and 1, TP-split like a dense MLP
    fc1 = {e.key: e for e in by_name["mp_rank_01_001_001"].entries if "local_experts" in e.key}
    assert sorted(k for k in fc1 if k.startswith("decoder.layers.0.")) == [
        f"decoder.layers.0.mlp.experts.local_experts.{i}.{fc}.weight" for i in (0, 1) for fc in ("linear_fc1", "linear_fc2")
    ]  # fmt: skip
    local1 = fc1["decoder.layers.0.mlp.experts.local_experts.1.linear_fc1.weight"]
    assert local1.sources == [
        "model.layers.1.block_sparse_moe.experts.3.w1.weight",
        "model.layers.1.block_sparse_moe.experts.3.w3.weight",
    ]
    assert local1.shape == (2 * 128 // 2, 64) and local1.transform == "gate+up · gated 2/2"
    # the router and everything dense are the same on both EP ranks
    dense = [{e.key for e in by_name[f"mp_rank_00_001_00{e}"].entries if "local_experts" not in e.key} for e in (0, 1)]
    assert dense[0] == dense[1] and "decoder.layers.0.mlp.router.weight" in dense[0]


@pytest.mark.parametrize("layout", ["ep2", "tp2pp2ep2", "vpp_ep4"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_hf_mm_hf_is_byte_identical(tiny_llms: dict[str, Path], tmp_path: Path, variant: str, layout: str) -> None:
    assert_round_trip(tiny_llms[variant], tmp_path, _pc(layout))


@pytest.mark.parametrize(("a", "b"), [("ep2", "tp2"), ("tp2pp2ep2", "vpp_ep4"), ("tp1", "tp2ep2")])
@pytest.mark.parametrize("variant", VARIANTS)
def test_resplit_to_another_ep_equals_direct_conversion(
    tiny_llms: dict[str, Path], tmp_path: Path, variant: str, a: str, b: str
) -> None:
    assert_resplit_is_direct(tiny_llms[variant], tmp_path, _pc(a), _pc(b))


def test_layout_errors_name_the_expert_count(tiny_llms: dict[str, Path]) -> None:
    mixtral = inspect_hf(tiny_llms["mixtral"])
    assert layout_problems(ParallelConfig(ep_size=3, llm_pp_layers=[[4]]), mixtral) == [
        "parallel_config.ep_size 3 does not divide num_local_experts = 4 (mixtral/config.json); "
        "use an ep_size among: 1, 2, 4"
    ]
    assert layout_problems(ParallelConfig(ep_size=2, llm_pp_layers=[[4]]), inspect_hf(tiny_llms["llama"])) == [
        "parallel_config.ep_size 2: Llama has no experts; use 1"
    ]


def test_config_expert_count_must_match_the_weights(tiny_llms: dict[str, Path], tmp_path: Path) -> None:
    hf = tmp_path / "mixtral"
    shutil.copytree(tiny_llms["mixtral"], hf)
    cfg = _cfg(hf) | {"num_local_experts": 8}
    (hf / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConvertError, match=r"num_local_experts = 8 but the weights hold experts 0\.\.3 \(4 experts\)"):
        build_plan(inspect_hf(hf), ParallelConfig(llm_pp_layers=[[4]]))


def test_wrong_source_ep_is_named(tiny_llms: dict[str, Path], tmp_path: Path) -> None:
    """mp_rank_00_001 is EP rank 1 here (PP = 1); read with EP 1 it is not part of the layout."""
    hf = tiny_llms["qwen3_moe"]
    mm = _hf_to_mm(hf, tmp_path / "mm", _pc("ep2"))
    cfg = MmToHfConfig(
        save_hf_dir=tmp_path / "back", mm_dir=mm, hf_config=HfConfig(hf_dir=hf), parallel_config=_pc("tp1")
    )
    with pytest.raises(ConvertError, match=r"2 rank directories on disk \(mp_rank_00_000, mp_rank_00_001\), the layout names 1 \(mp_rank_00\): mp_rank_00 is missing; the layout \(tp_size=1, llm_pp_layers=\[\[4\]\]\) is not the one"):  # fmt: skip
        prepare(_job(hf, "mm_to_hf", cfg))
    # read as PP 2 (same directory names), the layer counts on disk disagree
    as_pp2 = cfg.model_copy(update={"parallel_config": ParallelConfig(llm_pp_layers=[[2, 2]])})
    with pytest.raises(ConvertError, match=r"mp_rank_00_000/model_optim_rng.pt \[model\]: decoder.layers.2.input_layernorm.weight is on disk but not in the layout"):  # fmt: skip
        prepare(_job(hf, "mm_to_hf", as_pp2))


# ---- the oracle: megatron-core's MoE GPTModel on our files == transformers on the HF files ----


def _moe_arch(hf: Path):
    c = _cfg(hf)
    dense = c.get("mlp_only_layers", [])
    return _arch(
        hf,
        num_moe_experts=c.get("num_local_experts") or c["num_experts"],
        moe_router_topk=c["num_experts_per_tok"],
        moe_ffn_hidden_size=c.get("moe_intermediate_size", c["intermediate_size"]),
        moe_layer_freq=[0 if i in dense else 1 for i in range(c["num_hidden_layers"])],
        qk_layernorm=c["model_type"] == "qwen3_moe",
        kv_channels=c.get("head_dim"),
    )


@pytest.mark.oracle
# TP and EP each alone are covered exactly by the reference tests; the consumer runs unsplit and both at once
@pytest.mark.parametrize(("tp", "ep"), [(1, 1), (2, 2)])
@pytest.mark.parametrize("variant", VARIANTS)
def test_megatron_moe_reproduces_transformers_logits(
    tiny_llms: dict[str, Path], tmp_path: Path, variant: str, tp: int, ep: int
) -> None:
    pytest.importorskip("megatron.core")
    from mmtui.megatron_logits import megatron_logits

    hf = tiny_llms[variant]
    mm = _hf_to_mm(hf, tmp_path / "mm", ParallelConfig(tp_size=tp, ep_size=ep, llm_pp_layers=[[4]]))
    ranks = []
    for e in range(ep):
        for t in range(tp):
            name = f"mp_rank_{t:02d}" + (f"_{e:03d}" if ep > 1 else "")
            ranks.append(torch.load(mm / "release" / name / "model_optim_rng.pt", weights_only=True)["model"])
    got = megatron_logits(ranks, _moe_arch(hf), TOKENS, ep=ep)
    model, _ = tiny_llm_model(hf)
    with torch.no_grad():
        want = model(input_ids=torch.tensor([TOKENS])).logits[0]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_command_line_with_ep(tiny_llms: dict[str, Path], tmp_path: Path) -> None:
    from tests.test_cli import mm_convert

    hf = tiny_llms["mixtral"]
    r = mm_convert(
        "MixtralConverter", "hf_to_mm", "--cfg.mm_dir", str(tmp_path / "cli"), "--cfg.hf_config.hf_dir", str(hf),
        "--cfg.parallel_config.llm_pp_layers", "[[1,3]]", "--cfg.parallel_config.tp_size", "2",
        "--cfg.parallel_config.ep_size", "2",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    _same_tree(_hf_to_mm(hf, tmp_path / "api", _pc("tp2pp2ep2")), tmp_path / "cli")
    r = mm_convert(
        "MixtralConverter", "hf_to_mm", "--cfg.mm_dir", str(tmp_path / "bad"), "--cfg.hf_config.hf_dir", str(hf),
        "--cfg.parallel_config.llm_pp_layers", "[[4]]", "--cfg.parallel_config.ep_size", "3",
    )  # fmt: skip
    assert r.returncode == 2 and not (tmp_path / "bad").exists()
    assert r.stderr.strip().endswith("use an ep_size among: 1, 2, 4")


def test_verify_reads_an_expert_parallel_checkpoint(tiny_llms: dict[str, Path], tmp_path: Path) -> None:
    from tests.test_verify import verify

    hf = tiny_llms["qwen3_moe"]
    mm = _hf_to_mm(hf, tmp_path / "mm", _pc("tp2pp2ep2"))
    layout = ["--b-tp", "2", "--b-ep", "2", "--b-llm-pp-layers", "[[1,3]]"]
    r = verify(str(hf), str(mm), *layout)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "identical" in r.stdout
    r = verify(str(hf), str(mm), *layout[:2], *layout[4:])  # EP 1: the directories do not fit
    assert r.returncode == 2 and "rank directories on disk" in r.stderr
