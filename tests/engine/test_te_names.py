"""Transformer Engine names (issue 18 item 3): Megatron-LM's TE layers own the norm before QKV and a dense fc1.

The expected names are spelled out here from Megatron-LM itself, not from engine/planning/te_names.py:
- tools/checkpoint/schema_core.py, CoreTESchema: `self_attn_norm_weight` is
  `self_attention.linear_qkv.layer_norm_weight` (`_bias`), `mlp_norm_weight` is
  `mlp.linear_fc1.layer_norm_weight`; CoreMoETESchema keeps `pre_mlp_layernorm.weight` beside
  `mlp.router.weight` and `mlp.experts.local_experts.N.linear_fc{1,2}.weight`.
- megatron/core/models/gpt/gpt_layer_specs.py, get_gpt_layer_with_transformer_engine_submodules:
  linear_qkv is TELayerNormColumnParallelLinear, input_layernorm is left IdentityOp (no key);
  pre_mlp_layernorm is a separate TENorm only with experts; q_layernorm/k_layernorm are TENorm
  (Qwen3: `self_attention.q_layernorm.weight` stays); with MLA and q/k norms,
  linear_q_up_proj / linear_kv_up_proj are TELayerNormColumnParallelLinear.
Transformer Engine is not installed here (it needs CUDA), so megatron-core's GPTModel with the TE
spec cannot be built on this CPU; the key sets below are what those spec files build.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from engine.errors import ConvertError
from engine.job import (
    HfConfig,
    HfToMmConfig,
    Job,
    LoraConfig,
    LoraHfToMmConfig,
    MmToHfConfig,
    ResplitConfig,
    load_job,
    prepare,
)
from engine.layout import ParallelConfig
from engine.planning.check import check_plan
from engine.planning.te_names import to_local, to_te
from engine.run.execute import run
from engine.run.verify import compare, identical, open_side
from engine.source.hf_source import inspect_hf
from tests.engine.test_llm_families import _assert_back_to_original
from tests.fixtures.tiny_lora import build_peft_adapter

TE = "transformer_engine"

# local name -> Transformer Engine name, for a dense layer (Megatron-LM's CoreLocalSchema vs CoreTESchema)
DENSE_TE = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "input_layernorm.bias": "self_attention.linear_qkv.layer_norm_bias",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
    "pre_mlp_layernorm.bias": "mlp.linear_fc1.layer_norm_bias",
}


def _job(hf: Path, command: str, cfg) -> Job:
    return Job(converter=inspect_hf(hf).preset.converter, command=command, cfg=cfg)


def _convert(hf: Path, command: str, cfg) -> Path:
    _, plan = prepare(_job(hf, command, cfg))
    assert check_plan(plan) == []
    run(plan, cfg.out_dir)
    return Path(cfg.out_dir)


def _hf_to_mm(hf: Path, out: Path, layout: ParallelConfig, impl: str = "local") -> Path:
    cfg = HfToMmConfig(mm_dir=out, hf_config=HfConfig(hf_dir=hf), parallel_config=layout, transformer_impl=impl)
    return _convert(hf, "hf_to_mm", cfg)


def _load(out: Path) -> dict[str, dict[str, torch.Tensor]]:
    it = (out / "latest_checkpointed_iteration.txt").read_text().strip()
    it_dir = out / ("release" if it == "release" else f"iter_{int(it):07d}")
    return {d.name: torch.load(d / "model_optim_rng.pt", weights_only=True)["model"] for d in sorted(it_dir.iterdir())}


# ---- the rename itself ---------------------------------------------------------------------------


def test_dense_layer_with_biases_and_everything_else_unchanged() -> None:
    keys = [
        "embedding.word_embeddings.weight",
        "decoder.layers.0.input_layernorm.weight",
        "decoder.layers.0.input_layernorm.bias",
        "decoder.layers.0.self_attention.linear_qkv.weight",
        "decoder.layers.0.self_attention.linear_qkv.bias",
        "decoder.layers.0.self_attention.linear_proj.weight",
        "decoder.layers.0.self_attention.q_layernorm.weight",
        "decoder.layers.0.self_attention.k_layernorm.weight",
        "decoder.layers.0.pre_mlp_layernorm.weight",
        "decoder.layers.0.pre_mlp_layernorm.bias",
        "decoder.layers.0.mlp.linear_fc1.weight",
        "decoder.layers.0.mlp.linear_fc2.weight",
        "decoder.final_layernorm.weight",
        "decoder.final_layernorm.bias",
        "output_layer.weight",
    ]
    assert to_te(keys) == {
        "decoder.layers.0.input_layernorm.weight": "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight",
        "decoder.layers.0.input_layernorm.bias": "decoder.layers.0.self_attention.linear_qkv.layer_norm_bias",
        "decoder.layers.0.pre_mlp_layernorm.weight": "decoder.layers.0.mlp.linear_fc1.layer_norm_weight",
        "decoder.layers.0.pre_mlp_layernorm.bias": "decoder.layers.0.mlp.linear_fc1.layer_norm_bias",
    }
    renamed = [to_te(keys).get(k, k) for k in keys]
    assert to_local(renamed) == {v: k for k, v in to_te(keys).items()}


def test_moe_layer_keeps_pre_mlp_layernorm_and_dense_layer_beside_it_fuses() -> None:
    keys = [
        "decoder.layers.0.input_layernorm.weight",
        "decoder.layers.0.self_attention.linear_qkv.weight",
        "decoder.layers.0.pre_mlp_layernorm.weight",
        "decoder.layers.0.mlp.router.weight",
        "decoder.layers.0.mlp.experts.local_experts.0.linear_fc1.weight",
        "decoder.layers.0.mlp.experts.local_experts.0.linear_fc2.weight",
        "decoder.layers.1.input_layernorm.weight",
        "decoder.layers.1.self_attention.linear_qkv.weight",
        "decoder.layers.1.pre_mlp_layernorm.weight",
        "decoder.layers.1.mlp.linear_fc1.weight",
    ]
    assert to_te(keys) == {
        "decoder.layers.0.input_layernorm.weight": "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight",
        "decoder.layers.1.input_layernorm.weight": "decoder.layers.1.self_attention.linear_qkv.layer_norm_weight",
        "decoder.layers.1.pre_mlp_layernorm.weight": "decoder.layers.1.mlp.linear_fc1.layer_norm_weight",
    }


def test_mla_q_and_kv_norms_move_into_the_up_projections() -> None:
    keys = [
        "decoder.layers.3.input_layernorm.weight",  # MLA: a separate norm (no linear_qkv)
        "decoder.layers.3.self_attention.linear_q_down_proj.weight",
        "decoder.layers.3.self_attention.q_layernorm.weight",
        "decoder.layers.3.self_attention.linear_q_up_proj.weight",
        "decoder.layers.3.self_attention.linear_kv_down_proj.weight",
        "decoder.layers.3.self_attention.kv_layernorm.weight",
        "decoder.layers.3.self_attention.linear_kv_up_proj.weight",
    ]
    assert to_te(keys) == {
        "decoder.layers.3.self_attention.q_layernorm.weight": (
            "decoder.layers.3.self_attention.linear_q_up_proj.layer_norm_weight"
        ),
        "decoder.layers.3.self_attention.kv_layernorm.weight": (
            "decoder.layers.3.self_attention.linear_kv_up_proj.layer_norm_weight"
        ),
    }


def test_look_alike_names_are_not_renamed() -> None:
    keys = [
        "decoder.layers.0.input_layernorm.weight",  # its layer has no linear_qkv here
        "decoder.layers.1.self_attention.linear_qkv.weight",
        "decoder.layers.0.input_layernorm.weight_scale",
        "decoder.layers.x.input_layernorm.weight",
        "decoder.final_layernorm.weight",
    ]
    assert to_te(keys) == {}
    assert to_local(["decoder.layers.0.mlp.linear_fc2.layer_norm_weight", "decoder.final_layernorm.weight"]) == {}


# ---- hf_to_mm: the key sets Megatron-LM's TE GPT layers build ----------------------------------------


# Transformer Engine modules carry `_extra_state` (their FP8 metadata; None without FP8), and a strict load
# expects it for each TE module of the TE spec: the linears, and from TE 1.13 its norms (TENorm)
TE_EXTRA = "_extra_state"


def _llama_te_layer(i: int) -> set[str]:
    p = f"decoder.layers.{i}."
    return {
        p + "self_attention.linear_qkv.layer_norm_weight",
        p + "self_attention.linear_qkv.weight",
        p + "self_attention.linear_qkv._extra_state",
        p + "self_attention.linear_proj.weight",
        p + "self_attention.linear_proj._extra_state",
        p + "mlp.linear_fc1.layer_norm_weight",
        p + "mlp.linear_fc1.weight",
        p + "mlp.linear_fc1._extra_state",
        p + "mlp.linear_fc2.weight",
        p + "mlp.linear_fc2._extra_state",
    }


def test_llama_tp2_pp2_exact_te_keys_and_the_same_tensors(tiny_llms: dict[str, Path], tmp_path: Path) -> None:
    hf = tiny_llms["llama"]  # 4 layers, untied
    layout = ParallelConfig(tp_size=2, llm_pp_layers=[[1, 3]])
    local = _load(_hf_to_mm(hf, tmp_path / "local", layout))
    te = _load(_hf_to_mm(hf, tmp_path / "te", layout, TE))
    first = {"embedding.word_embeddings.weight"} | _llama_te_layer(0)
    last = _llama_te_layer(0) | _llama_te_layer(1) | _llama_te_layer(2)
    last |= {"decoder.final_layernorm.weight", "decoder.final_layernorm._extra_state", "output_layer.weight"}
    want = {"mp_rank_00_000": first, "mp_rank_01_000": first, "mp_rank_00_001": last, "mp_rank_01_001": last}
    assert {rank: set(sd) for rank, sd in te.items()} == want
    assert all(v is None for sd in te.values() for k, v in sd.items() if k.endswith(TE_EXTRA))
    for rank, sd in local.items():
        for key, value in sd.items():
            layer, _, rest = key.partition(".layers.")
            n, _, tail = rest.partition(".")
            te_key = f"{layer}.layers.{n}.{DENSE_TE[tail]}" if tail in DENSE_TE else key
            assert torch.equal(te[rank][te_key], value), (rank, key)


def test_qwen3_keeps_its_q_k_norms(tiny_llms: dict[str, Path], tmp_path: Path) -> None:
    hf = tiny_llms["qwen3"]
    te = _load(_hf_to_mm(hf, tmp_path / "te", ParallelConfig(tp_size=1, llm_pp_layers=[[4]]), TE))
    (sd,) = te.values()
    layer0 = {k.removeprefix("decoder.layers.0.") for k in sd if k.startswith("decoder.layers.0.")}
    assert layer0 == {
        "self_attention.linear_qkv.layer_norm_weight",
        "self_attention.linear_qkv.weight",
        "self_attention.linear_qkv._extra_state",
        "self_attention.linear_proj.weight",
        "self_attention.linear_proj._extra_state",
        "self_attention.q_layernorm.weight",
        "self_attention.q_layernorm._extra_state",
        "self_attention.k_layernorm.weight",
        "self_attention.k_layernorm._extra_state",
        "mlp.linear_fc1.layer_norm_weight",
        "mlp.linear_fc1.weight",
        "mlp.linear_fc1._extra_state",
        "mlp.linear_fc2.weight",
        "mlp.linear_fc2._extra_state",
    }


def test_qwen3_moe_ep2_moe_and_dense_layers(tiny_llms: dict[str, Path], tmp_path: Path) -> None:
    hf = tiny_llms["qwen3_moe"]  # 4 layers, 4 experts, layer 1 dense (mlp_only_layers)
    cfg = json.loads((hf / "config.json").read_text())
    assert cfg["mlp_only_layers"] == [1] and cfg["num_experts"] == 4
    te = _load(_hf_to_mm(hf, tmp_path / "te", ParallelConfig(tp_size=1, ep_size=2, llm_pp_layers=[[4]]), TE))
    attention = {
        "self_attention.linear_qkv.layer_norm_weight",
        "self_attention.linear_qkv.weight",
        "self_attention.linear_qkv._extra_state",
        "self_attention.linear_proj.weight",
        "self_attention.linear_proj._extra_state",
        "self_attention.q_layernorm.weight",
        "self_attention.q_layernorm._extra_state",
        "self_attention.k_layernorm.weight",
        "self_attention.k_layernorm._extra_state",
    }
    moe = attention | {"pre_mlp_layernorm.weight", "pre_mlp_layernorm._extra_state", "mlp.router.weight"}
    moe |= {f"mlp.experts.local_experts.{e}.linear_fc{n}.{p}" for e in (0, 1) for n in (1, 2)
            for p in ("weight", "_extra_state")}  # fmt: skip
    dense = attention | {"mlp.linear_fc1.layer_norm_weight", "mlp.linear_fc1.weight", "mlp.linear_fc1._extra_state",
                         "mlp.linear_fc2.weight", "mlp.linear_fc2._extra_state"}  # fmt: skip
    for sd in te.values():
        for i in range(4):
            got = {k.removeprefix(f"decoder.layers.{i}.") for k in sd if k.startswith(f"decoder.layers.{i}.")}
            assert got == (dense if i == 1 else moe), i
    assert sorted(te) == ["mp_rank_00_000", "mp_rank_00_001"]


# ---- reading TE names back: mm_to_hf, resplit, verify ---------------------------------------------


def test_way_back_reads_te_names_from_the_disk(tiny_llms: dict[str, Path], tmp_path: Path) -> None:
    hf = tiny_llms["llama"]
    layout = ParallelConfig(tp_size=2, llm_pp_layers=[[1, 3]])
    mm = _hf_to_mm(hf, tmp_path / "te", layout, TE)
    _assert_back_to_original(hf, mm, tmp_path / "back", layout)  # transformer_impl left out: the disk says
    cfg = MmToHfConfig(save_hf_dir=tmp_path / "back2", mm_dir=mm, hf_config=HfConfig(hf_dir=hf), transformer_impl=TE)
    _convert(hf, "mm_to_hf", cfg)  # given, and agreeing with the disk
    a = open_side(hf, inspect_hf(hf), None, "A")
    b = open_side(mm, inspect_hf(hf), None, "B")
    rows = list(compare(a, b))
    assert identical(rows) and len(rows) == len(inspect_hf(hf).tensors)


def test_given_names_that_disagree_with_the_disk_are_one_line(tiny_llms: dict[str, Path], tmp_path: Path) -> None:
    hf = tiny_llms["llama"]
    layout = ParallelConfig(tp_size=1, llm_pp_layers=[[4]])
    te = _hf_to_mm(hf, tmp_path / "te", layout, TE)
    local = _hf_to_mm(hf, tmp_path / "local", layout)
    cfg = MmToHfConfig(save_hf_dir=tmp_path / "o", mm_dir=te, hf_config=HfConfig(hf_dir=hf), transformer_impl="local")
    with pytest.raises(ConvertError) as e:
        prepare(_job(hf, "mm_to_hf", cfg))
    assert str(e.value) == (
        f"transformer_impl = local, but mm_dir {te} holds Transformer Engine names "
        "(decoder.layers.0.self_attention.linear_qkv.layer_norm_weight); give transformer_engine or leave "
        "transformer_impl out to read it from the disk"
    )
    cfg = ResplitConfig(source_dir=local, target_dir=tmp_path / "o2", hf_config=HfConfig(hf_dir=hf),
                        target_parallel_config=layout, source_transformer_impl=TE)  # fmt: skip
    with pytest.raises(ConvertError, match=r"^source_transformer_impl = transformer_engine, but source_dir .* holds "
                       r"local names \(decoder\.layers\.0\.input_layernorm\.weight\)"):  # fmt: skip
        prepare(_job(hf, "resplit", cfg))
    assert not (tmp_path / "o").exists() and not (tmp_path / "o2").exists()


@pytest.mark.parametrize(("source", "target"), [(TE, None), (TE, "local"), ("local", TE)])
def test_resplit_equals_a_direct_conversion(
    tiny_llms: dict[str, Path], tmp_path: Path, source: str, target: str | None
) -> None:
    """TE -> TE (the default keeps the source's names), TE -> local and local -> TE."""
    hf = tiny_llms["qwen3"]
    a = ParallelConfig(tp_size=2, llm_pp_layers=[[1, 3]])
    b = ParallelConfig(tp_size=1, llm_pp_layers=[[2, 1, 1]])
    src = _hf_to_mm(hf, tmp_path / "src", a, source)
    cfg = ResplitConfig(source_dir=src, target_dir=tmp_path / "out", hf_config=HfConfig(hf_dir=hf),
                        target_parallel_config=b, transformer_impl=target)  # fmt: skip
    got = _load(_convert(hf, "resplit", cfg))
    want = _load(_hf_to_mm(hf, tmp_path / "direct", b, target or source))
    assert {r: list(sd) for r, sd in got.items()} == {r: list(sd) for r, sd in want.items()}
    for rank, sd in want.items():
        for key, value in sd.items():
            assert (got[rank][key] is None is value) or torch.equal(got[rank][key], value), (rank, key)


# ---- unhappy paths and the other commands -----------------------------------------------------------


def test_a_vlm_is_refused_in_one_line(qwen2vl_dir: Path, tmp_path: Path) -> None:
    layout = ParallelConfig(tp_size=1, llm_pp_layers=[[1, 1]], vit_pp_layers=[[2, 0]])
    cfg = HfToMmConfig(mm_dir=tmp_path / "o", hf_config=HfConfig(hf_dir=qwen2vl_dir), parallel_config=layout,
                       transformer_impl=TE)  # fmt: skip
    with pytest.raises(ConvertError) as e:
        prepare(_job(qwen2vl_dir, "hf_to_mm", cfg))
    assert str(e.value) == (
        "transformer_impl = transformer_engine: Transformer Engine names are Megatron-LM's GPT language model's; "
        "Qwen2-VL is written with MindSpeed-MM's names (local); use transformer_impl local"
    )
    assert "\n" not in str(e.value) and not (tmp_path / "o").exists()


@pytest.mark.parametrize("value", ["te", "TE", "transformer-engine", "", 1, None])
def test_bad_values_are_refused(tmp_path: Path, value: object) -> None:
    base = {"mm_dir": str(tmp_path / "o"), "hf_config": {"hf_dir": str(tmp_path)},
            "parallel_config": {"llm_pp_layers": [[1]]}}  # fmt: skip
    with pytest.raises(ValidationError, match="transformer_impl"):
        HfToMmConfig.model_validate({**base, "transformer_impl": value})


def test_lora_adapter_keys_name_no_norms(tiny_llms: dict[str, Path], tmp_path: Path) -> None:
    hf = tiny_llms["llama"]
    build_peft_adapter(hf, tmp_path / "adapter")
    layout = ParallelConfig(tp_size=2, llm_pp_layers=[[1, 3]])
    outs = {}
    for impl in ("local", TE):
        cfg = LoraHfToMmConfig(mm_dir=tmp_path / impl, hf_config=HfConfig(hf_dir=hf), parallel_config=layout,
                               lora=LoraConfig(adapter_dir=tmp_path / "adapter"), transformer_impl=impl)  # fmt: skip
        outs[impl] = _load(_convert(hf, "lora_hf_to_mm", cfg))
    assert {r: list(sd) for r, sd in outs["local"].items()} == {r: list(sd) for r, sd in outs[TE].items()}


def test_a_saved_job_with_the_field_replays(tiny_llms: dict[str, Path], tmp_path: Path) -> None:
    """The wizard saves jobs as TOML; one with transformer_impl prepares and runs (what the wizard calls)."""
    hf = tiny_llms["llama"]
    toml = tmp_path / "job.toml"
    toml.write_text(
        'converter = "LlamaConverter"\ncommand = "hf_to_mm"\n[cfg]\n'
        f'mm_dir = "{tmp_path / "out"}"\ntransformer_impl = "transformer_engine"\n'
        f'[cfg.hf_config]\nhf_dir = "{hf}"\n[cfg.parallel_config]\nllm_pp_layers = [[4]]\n'
    )
    job = load_job(toml)
    _, plan = prepare(job)
    run(plan, job.out_dir)
    (sd,) = _load(tmp_path / "out").values()
    assert "decoder.layers.3.mlp.linear_fc1.layer_norm_weight" in sd
    assert not any(k.endswith(("input_layernorm.weight", "pre_mlp_layernorm.weight")) for k in sd)


def test_dense_names_agree_with_megatron_cores_own_local_to_te_map(tiny_llms: dict[str, Path], tmp_path: Path) -> None:
    """megatron-core's local layer spec carries the same renames for its distributed checkpoints
    (`sharded_state_dict_keys_map`); applied to our local keys of a dense model it gives our TE keys."""
    pytest.importorskip("megatron.core")
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    mapping = get_gpt_layer_local_spec(
        qk_layernorm=True, normalization="RMSNorm"
    ).submodules.sharded_state_dict_keys_map
    assert mapping == {"input_layernorm.": "self_attention.linear_qkv.layer_norm_",
                       "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"}  # fmt: skip
    hf = tiny_llms["qwen3"]
    layout = ParallelConfig(tp_size=2, llm_pp_layers=[[2, 2]])
    local = _load(_hf_to_mm(hf, tmp_path / "local", layout))
    te = _load(_hf_to_mm(hf, tmp_path / "te", layout, TE))

    def mapped(key: str) -> str:
        head, sep, rest = key.partition(".layers.")
        n, _, tail = rest.partition(".")
        for old, new in mapping.items():
            if sep and tail.startswith(old):
                return f"{head}.layers.{n}.{new}{tail.removeprefix(old)}"
        return key

    te_weights = {r: [k for k in sd if not k.endswith(TE_EXTRA)] for r, sd in te.items()}  # renames only
    assert {r: [mapped(k) for k in sd] for r, sd in local.items()} == te_weights
