"""torch_dist of a DeepSeek-V3-class model: multi-latent attention, a dense first layer then MoE layers with
shared experts and a router bias, and a multi-token-prediction layer. The expected global tensors are restated
from megatron-core 0.16's `sharded_state_dict` of GPTModel with the local MLA spec (printed once from the model
and written down here): nothing is stacked (dense and MoE layers mixed), norms keep their own names (the local
MLA spec has no keys map), experts sit on an expert axis, the MTP block is `mtp.layers.0.…`, and every parallel
linear has an `_extra_state`."""

from __future__ import annotations

import filecmp
from pathlib import Path

import pytest
import torch

from engine.errors import ConvertError
from engine.job import prepare
from tests.engine.test_deepseek_mtp import mtp_state, without_mtp
from tests.engine.test_torch_dist import _dcp_tensors, _index, _job, _same_tree, _structure, convert
from tests.fixtures.reference_deepseek import full_state
from tests.fixtures.tiny_deepseek import build_tiny_deepseek
from tests.fixtures.tiny_vlm import load_hf_state

TOKENS = [3, 17, 99, 5, 42, 7, 64, 127, 0, 11, 23, 88]
E = 4  # routed experts
LINEARS = (
    "self_attention.linear_q_down_proj", "self_attention.linear_q_up_proj", "self_attention.linear_kv_down_proj",
    "self_attention.linear_kv_up_proj", "self_attention.linear_proj",
)  # fmt: skip
CONVERTER = "DeepseekV3Converter"


def _cfg(hf: Path, out: Path, fmt: str, tp: int, ep: int, pp: list[int]) -> dict:
    layout = {"tp_size": tp, "ep_size": ep, "llm_pp_layers": [pp]}
    return {"mm_dir": str(out), "hf_config": {"hf_dir": str(hf)}, "parallel_config": layout, "format": fmt}


def outputs(root: Path) -> dict[str, Path]:
    """The `mla` fixture (tests/engine/conftest.py): the HF models and our conversions of them."""
    out = {
        "hf": build_tiny_deepseek(root / "hf", mtp_layers=1, shards=2),
        "hf_plain": build_tiny_deepseek(root / "hf_plain"),  # the same model without MTP, for transformers
    }
    for name, fmt, tp, ep, pp in (
        ("td_split", "torch_dist", 2, 2, [1, 2]),
        ("td_one", "torch_dist", 1, 1, [3]),
        ("legacy_split", "legacy", 2, 2, [1, 2]),
    ):
        out[name] = convert("hf_to_mm", _cfg(out["hf"], root / name, fmt, tp, ep, pp), root / name, CONVERTER)
    return out


def _naive_global(hf: Path) -> dict[str, torch.Tensor]:
    """megatron-core's global tensors built from the HF weights by hand: the reference's full Megatron state,
    each layer's experts stacked on a leading expert axis."""
    w = load_hf_state(hf)
    full = full_state(without_mtp(w)) | mtp_state(w)
    out: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[int, torch.Tensor]] = {}
    for key, t in full.items():
        if ".local_experts." in key:
            head, tail = key.split(".mlp.experts.local_experts.")
            e, rest = tail.split(".", 1)
            experts.setdefault(f"{head}.mlp.experts.experts.{rest}", {})[int(e)] = t
        else:
            out[key] = t
    for key, per in experts.items():
        out[key] = torch.stack([per[e] for e in range(E)])
    return out


def _expected_objects() -> set[str]:
    out = set()
    for p in ("decoder.layers.0.", "decoder.layers.1.", "decoder.layers.2.", "mtp.layers.0.transformer_layer."):
        out |= {f"{p}{m}._extra_state/shard_0_1" for m in LINEARS}
        if p == "decoder.layers.0.":
            out |= {f"{p}mlp.linear_fc{i}._extra_state/shard_0_1" for i in (1, 2)}
        else:
            out |= {f"{p}mlp.shared_experts.linear_fc{i}._extra_state/shard_0_1" for i in (1, 2)}
            out |= {f"{p}mlp.experts.experts.linear_fc{i}._extra_state/shard_{e}_{E}" for i in (1, 2) for e in range(E)}
    out.add("mtp.layers.0.eh_proj._extra_state/shard_0_1")
    # the final norms': not asked for by the local spec (its norms are torch's), written for TE's
    return out | {
        "mtp.layers.0.final_layernorm._extra_state/shard_0_1",
        "decoder.final_layernorm._extra_state/shard_0_1",
    }


def test_global_tensors_are_megatron_cores(mla: dict[str, Path]) -> None:
    want = _naive_global(mla["hf"])
    assert "decoder.layers.0.input_layernorm.weight" in want and "mtp.layers.0.eh_proj.weight" in want
    for name in ("td_split", "td_one"):
        it = mla[name] / "release"
        got = _dcp_tensors(it)  # torch's own DCP reader
        assert sorted(got) == sorted(want), name
        for k in want:
            assert torch.equal(got[k], want[k]), (name, k)
        assert _structure(_index(it))[1] == _expected_objects()
    tensors, _ = _structure(_index(mla["td_split"] / "release"))
    # TP 2: every MLA projection a row block per rank, linear_proj a column block; the embedding once although
    # the MTP stage holds a copy of it
    assert tensors["decoder.layers.1.self_attention.linear_kv_down_proj.weight"] == [
        ((0, 0), (12, 64)),
        ((12, 0), (12, 64)),
    ]
    assert tensors["decoder.layers.1.self_attention.linear_proj.weight"] == [((0, 0), (64, 32)), ((0, 32), (64, 32))]
    assert tensors["embedding.word_embeddings.weight"] == [((0, 0), (64, 64)), ((64, 0), (64, 64))]
    assert tensors["decoder.layers.2.mlp.router.expert_bias"] == [((0,), (E,))]


def test_way_back_to_hf_and_to_legacy(mla: dict[str, Path], tmp_path: Path) -> None:
    hf = mla["hf"]
    cfg = {"mm_dir": str(mla["td_split"]), "save_hf_dir": str(tmp_path / "hf"), "hf_config": {"hf_dir": str(hf)}}
    out = convert("mm_to_hf", cfg, tmp_path / "hf", CONVERTER)
    for f in hf.glob("*.safetensors"):
        assert filecmp.cmp(f, out / f.name, shallow=False), f.name
    # legacy -> torch_dist -> legacy, byte for byte
    cfg = {"source_dir": str(mla["legacy_split"]), "target_dir": str(tmp_path / "td"), "hf_config": {"hf_dir": str(hf)}}
    layout = {"tp_size": 1, "ep_size": 1, "llm_pp_layers": [[3]]}
    td = convert(
        "resplit", cfg | {"format": "torch_dist", "target_parallel_config": layout}, tmp_path / "td", CONVERTER
    )
    _same_tree(td, mla["td_one"])
    cfg = {"source_dir": str(td), "target_dir": str(tmp_path / "back"), "hf_config": {"hf_dir": str(hf)}}
    layout = {"tp_size": 2, "ep_size": 2, "llm_pp_layers": [[1, 2]]}
    back = convert(
        "resplit", cfg | {"format": "legacy", "target_parallel_config": layout}, tmp_path / "back", CONVERTER
    )
    _same_tree(back, mla["legacy_split"])


def test_transformer_engine_names(mla: dict[str, Path], tmp_path: Path) -> None:
    """TE's MLA spec (gpt_layer_specs.py, megatron-core 0.16) fuses the q/kv norms into the up projections and a
    dense layer's pre-MLP norm into fc1; input_layernorm and an MoE layer's pre-MLP norm stay norms of their own.
    Written so with transformer_impl transformer_engine (no MTP: refused with TE), read back without being told."""
    hf = mla["hf_plain"]
    cfg = _cfg(hf, tmp_path / "te", "torch_dist", 2, 1, [3]) | {"transformer_impl": "transformer_engine"}
    td = convert("hf_to_mm", cfg, tmp_path / "te", CONVERTER)
    tensors, objects = _structure(_index(td / "release"))
    for name in (
        "decoder.layers.0.input_layernorm.weight", "decoder.layers.0.mlp.linear_fc1.layer_norm_weight",
        "decoder.layers.1.self_attention.linear_q_up_proj.layer_norm_weight",
        "decoder.layers.1.self_attention.linear_kv_up_proj.layer_norm_weight", "decoder.layers.1.pre_mlp_layernorm.weight",
    ):  # fmt: skip
        assert name in tensors, name
    assert not any("q_layernorm" in k or "kv_layernorm" in k for k in tensors)
    assert "decoder.layers.0.pre_mlp_layernorm.weight" not in tensors
    assert "decoder.layers.1.input_layernorm._extra_state/shard_0_1" in objects
    cfg = {"mm_dir": str(td), "save_hf_dir": str(tmp_path / "hf"), "hf_config": {"hf_dir": str(hf)}}
    out = convert("mm_to_hf", cfg, tmp_path / "hf", CONVERTER)
    for f in hf.glob("*.safetensors"):
        assert filecmp.cmp(f, out / f.name, shallow=False), f.name


def test_mindspeed_llm_names_are_refused(mla: dict[str, Path], tmp_path: Path) -> None:
    cfg = _cfg(mla["hf"], tmp_path / "o", "torch_dist", 1, 1, [3])
    with pytest.raises(ConvertError) as e:
        prepare(_job("hf_to_mm", cfg | {"naming": "mindspeed_llm"}, CONVERTER))
    assert str(e.value) == (
        "format = torch_dist: DeepSeek-V3 with naming mindspeed_llm; torch_dist is written with Megatron-Core's "
        "module names only (naming megatron_core), or use format legacy"
    )
    assert not (tmp_path / "o").exists()


def oracle_tasks(mla: dict[str, Path]) -> list:
    """megatron-core's loads (run with the VLM's in one start of megatron-core: tests/engine/conftest.py)."""
    from tests.engine.test_family_deepseek import deepseek_arch
    from tests.fixtures.megatron_dist import Load

    arch = deepseek_arch(mla["hf"])
    arch.extra = (arch.extra or {}) | {"mtp_num_layers": 1}
    return [Load(mla["td_one"] / "release", arch, 2), Load(mla["td_split"] / "release", arch, 1, 2)]


@pytest.mark.oracle
def test_megatron_core_loads_it_strictly_with_transformers_logits(mla: dict[str, Path], td_oracle: dict) -> None:
    """dist_checkpointing.load into GPTModel (MLA, MoE, MTP block; local spec), load_state_dict(strict=True), at
    TP 2 from the checkpoint written at TP 1, and at TP 1 / EP 2 from the one written at TP 2 / EP 2 / PP 2."""
    from tests.fixtures.tiny_deepseek import tiny_deepseek_model

    model, _ = tiny_deepseek_model(mla["hf_plain"])
    with torch.no_grad():
        want = model(input_ids=torch.tensor([TOKENS])).logits[0]
    assert len(td_oracle["mla"]) == 2
    for logits in td_oracle["mla"]:
        torch.testing.assert_close(logits, want, rtol=0, atol=1e-5)
