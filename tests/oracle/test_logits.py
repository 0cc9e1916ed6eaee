"""The language model of hf_to_mm output reproduces transformers' logits in megatron-core (fp32, 1e-5)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.layout import ParallelConfig
from engine.planning.build import build_plan
from engine.run.execute import run
from engine.source.hf_source import inspect_hf
from mmtui.megatron_logits import GPTArch, megatron_logits
from tests.fixtures.tiny_vlm import tiny_text_model

pytest.importorskip("megatron.core")
TOKENS = [3, 17, 99, 5, 42, 7, 64, 127, 0, 11, 23, 88]
PREFIX = "text_decoder."


def _arch(hf: Path) -> GPTArch:
    f = inspect_hf(hf).fields
    return GPTArch(
        num_layers=f["llm_layers"], hidden_size=f["hidden_size"], num_attention_heads=f["llm_heads"],
        num_query_groups=f["llm_kv_heads"], ffn_hidden_size=f["intermediate_size"], vocab_size=f["vocab_size"],
        rotary_base=1e6, norm_epsilon=1e-6, add_qkv_bias=True, tied=bool(f["tie_word_embeddings"]),
    )  # fmt: skip


@pytest.mark.oracle
@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("variant", ["qwen2_vl", "qwen2_vl_tied", "qwen2_5_vl"])
def test_megatron_reproduces_transformers_logits(
    tiny_dirs: dict[str, Path], tmp_path: Path, variant: str, tp: int
) -> None:
    hf = tiny_dirs[variant]
    run(
        build_plan(inspect_hf(hf), ParallelConfig(tp_size=tp, llm_pp_layers=[[4]], vit_pp_layers=[[3]])),
        tmp_path / "mm",
    )
    ranks = []
    for r in range(tp):
        model = torch.load(tmp_path / "mm" / "release" / f"mp_rank_{r:02d}" / "model_optim_rng.pt", weights_only=True)
        ranks.append({k[len(PREFIX) :]: v for k, v in model["model"].items() if k.startswith(PREFIX)})
    got = megatron_logits(ranks, _arch(hf), TOKENS)

    model, _ = tiny_text_model(hf)
    with torch.no_grad():
        want = model(input_ids=torch.tensor([TOKENS])).logits[0]
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@pytest.mark.oracle
def test_oracle_is_sensitive_to_a_wrong_layout(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    """Swapping two KV groups in linear_qkv must change the logits, or the oracle proves nothing."""
    hf = tiny_dirs["qwen2_vl"]
    run(build_plan(inspect_hf(hf), ParallelConfig(llm_pp_layers=[[4]], vit_pp_layers=[[3]])), tmp_path / "mm")
    model = torch.load(tmp_path / "mm" / "release" / "mp_rank_00" / "model_optim_rng.pt", weights_only=True)
    state = {k[len(PREFIX) :]: v for k, v in model["model"].items() if k.startswith(PREFIX)}
    qkv = state["decoder.layers.0.self_attention.linear_qkv.weight"]
    state["decoder.layers.0.self_attention.linear_qkv.weight"] = torch.cat(qkv.chunk(2)[::-1])
    got = megatron_logits([state], _arch(hf), TOKENS)
    hf_model, _ = tiny_text_model(hf)
    with torch.no_grad():
        want = hf_model(input_ids=torch.tensor([TOKENS])).logits[0]
    assert (got - want).abs().max() > 1e-3
