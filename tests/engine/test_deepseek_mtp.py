"""DeepSeek-V3's multi-token-prediction layer (model.layers.3 here, the hub's model.layers.61) -> Megatron-Core's
MTP block on the last pipeline stage, and back byte for byte; `mtp = false` leaves it out."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from engine.errors import ConvertError
from engine.job import HfConfig, HfToMmConfig, Job, MmToHfConfig, prepare
from engine.layout import ParallelConfig
from engine.planning.build import build_plan
from engine.source.hf_source import inspect_hf
from tests.engine.test_hf_to_mm import _assert_same, _load_dir
from tests.engine.test_llm_families import _convert, _hf_to_mm, assert_resplit_is_direct, assert_round_trip
from tests.fixtures.reference_deepseek import expected_checkpoint, full_state, tp_shard
from tests.fixtures.tiny_deepseek import build_tiny_deepseek
from tests.fixtures.tiny_vlm import load_hf_state, write_weights

LAYERS = 3  # decoder layers of the tiny model; its MTP layer is model.layers.3
LAYOUTS = {
    # name: (tp, ep, llm_pp_layers)
    "tp1": (1, 1, [[3]]),
    "tp2": (2, 1, [[3]]),
    "pp2": (1, 1, [[1, 2]]),
    "ep2": (1, 2, [[3]]),
    "tp2pp2ep2": (2, 2, [[1, 2]]),
}


def _pc(name: str) -> ParallelConfig:
    tp, ep, llm = LAYOUTS[name]
    return ParallelConfig(tp_size=tp, ep_size=ep, llm_pp_layers=llm)


@pytest.fixture(scope="module")
def mtp_hf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_deepseek(tmp_path_factory.mktemp("hf_mtp") / "v3_mtp", mtp_layers=1, shards=2)


# ---- an independent statement of megatron-core 0.16's MTP names and splits ----
# megatron/core/transformer/multi_token_prediction.py, MultiTokenPredictionLayer.__init__: `enorm` and `hnorm`
# (norms of the hidden width), `eh_proj` built from the spec's column_parallel_linear with gather_output=False
# (each TP rank a block of rows), `transformer_layer` (a decoder layer's spec: the same names under it) and
# `final_layernorm`; MultiTokenPredictionBlock keeps them in `layers` (so `mtp.layers.N.`). GPTModel builds an
# embedding `if self.pre_process or self.mtp_process`, so the MTP stage has one of its own when it is not the
# first stage. HF's DeepseekV3 MTP layer: enorm, hnorm, eh_proj, shared_head.norm (the layer's final norm), and
# copies of the embedding (embed_tokens) and the output head (shared_head.head).


def mtp_state(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The MTP block's full tensors under Megatron-Core's names (MTP index 0)."""
    src = f"model.layers.{LAYERS}."
    out = {
        "mtp.layers.0.enorm.weight": hf[src + "enorm.weight"],
        "mtp.layers.0.hnorm.weight": hf[src + "hnorm.weight"],
        "mtp.layers.0.eh_proj.weight": hf[src + "eh_proj.weight"],
        "mtp.layers.0.final_layernorm.weight": hf[src + "shared_head.norm.weight"],
    }
    # its transformer layer is a decoder layer: the reference's names for a one-layer model holding it
    one = {k.replace(src, "model.layers.0."): v for k, v in hf.items() if k.startswith(src)}
    one |= {k: hf[k] for k in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")}
    for key, t in full_state(one).items():
        if key.startswith("decoder.layers.0."):
            out["mtp.layers.0.transformer_layer." + key[len("decoder.layers.0.") :]] = t
    return out


def without_mtp(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in hf.items() if not k.startswith(f"model.layers.{LAYERS}.")}


def expected(hf: dict[str, torch.Tensor], tp: int, pp_layers: list[list[int]], ep: int) -> dict[str, dict]:
    """The reference checkpoint of the decoder, plus the MTP block (and, with PP > 1, the embedding) on every
    rank of the last stage; experts localised per EP rank as in the decoder."""
    out = expected_checkpoint(without_mtp(hf), tp=tp, pp_layers=pp_layers, ep=ep, experts=4)
    pp, per = len(pp_layers[0]), 4 // ep
    for r in range(tp):
        for e in range(ep):
            name = f"mp_rank_{r:02d}" + (f"_{pp - 1:03d}" if pp > 1 else "") + (f"_{e:03d}" if ep > 1 else "")
            model = out[name]["model"]
            for key, t in mtp_state(hf).items():
                if ".local_experts." in key:
                    head, tail = key.split(".local_experts.")
                    expert, rest = tail.split(".", 1)
                    if int(expert) // per != e:
                        continue
                    key = f"{head}.local_experts.{int(expert) % per}.{rest}"
                shard = t.chunk(tp)[r] if key.endswith("eh_proj.weight") else tp_shard(key, t, tp, r)
                model[key] = shard.clone().contiguous()
            if pp > 1:
                model["embedding.word_embeddings.weight"] = hf["model.embed_tokens.weight"].chunk(tp)[r].clone()
    return out


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_reference(mtp_hf: Path, tmp_path: Path, layout: str) -> None:
    tp, ep, llm = LAYOUTS[layout]
    _hf_to_mm(mtp_hf, tmp_path / "out", _pc(layout))
    _assert_same(_load_dir(tmp_path / "out"), expected(load_hf_state(mtp_hf), tp, llm, ep))


def test_tp1_key_set_is_megatron_cores(mtp_hf: Path, tmp_path: Path) -> None:
    """The MTP keys at TP 1, spelled out (megatron-core 0.16's MultiTokenPredictionLayer with the MLA + MoE
    local layer spec)."""
    model = _load_dir(_hf_to_mm(mtp_hf, tmp_path / "out", _pc("tp1")))["mp_rank_00"]["model"]
    got = sorted(k.removeprefix("mtp.layers.0.") for k in model if k.startswith("mtp."))
    layer = "transformer_layer."
    attention = [
        f"{layer}self_attention.{n}.weight"
        for n in ("linear_q_down_proj", "q_layernorm", "linear_q_up_proj", "linear_kv_down_proj", "kv_layernorm",
                  "linear_kv_up_proj", "linear_proj")
    ]  # fmt: skip
    mlp = [f"{layer}mlp.router.weight", f"{layer}mlp.router.expert_bias"]
    mlp += [f"{layer}mlp.experts.local_experts.{e}.linear_fc{i}.weight" for e in range(4) for i in (1, 2)]
    mlp += [f"{layer}mlp.shared_experts.linear_fc{i}.weight" for i in (1, 2)]
    norms = [f"{layer}input_layernorm.weight", f"{layer}pre_mlp_layernorm.weight"]
    own = ["enorm.weight", "hnorm.weight", "eh_proj.weight", "final_layernorm.weight"]
    assert got == sorted(own + norms + attention + mlp)
    assert not any(k.startswith("decoder.layers.3.") for k in model)


@pytest.mark.parametrize("layout", ["pp2", "tp2pp2ep2"])
def test_hf_mm_hf_is_byte_identical(mtp_hf: Path, tmp_path: Path, layout: str) -> None:
    assert_round_trip(mtp_hf, tmp_path, _pc(layout))


def test_resplit_equals_direct_conversion(mtp_hf: Path, tmp_path: Path) -> None:
    assert_resplit_is_direct(mtp_hf, tmp_path, _pc("tp2"), _pc("tp2pp2ep2"))


def test_plan_says_what_it_shares(mtp_hf: Path) -> None:
    plan = build_plan(inspect_hf(mtp_hf), _pc("pp2"))
    assert plan.notes == [
        "MTP: model.layers.3.embed_tokens.weight, model.layers.3.shared_head.head.weight not written: Megatron-Core "
        "shares the embedding and output layer with the MTP layers; the way back writes them from those",
        "MTP: the MTP layers' stage also holds embedding.word_embeddings.weight, a copy, as Megatron-Core builds it",
    ]
    assert sorted(k for k in plan.dropped if "layers.3" in k or "mtp" in k) == [
        "model.mtp.0.embed_tokens.weight", "model.mtp.0.shared_head.head.weight",
    ]  # fmt: skip


# ---- mtp = false ----


def _job(command: str, cfg) -> Job:
    return Job(converter="DeepseekV3Converter", command=command, cfg=cfg)


def test_mtp_false_leaves_the_layer_out(mtp_hf: Path, tmp_path: Path) -> None:
    cfg = HfToMmConfig(mm_dir=tmp_path / "mm", hf_config=HfConfig(hf_dir=mtp_hf), parallel_config=_pc("tp2"), mtp=False)
    hf = load_hf_state(mtp_hf)
    n = len(hf) - len(without_mtp(hf))  # 26 of an MoE layer, enorm, hnorm, eh_proj, 3 of shared_head and embed
    assert n == 32
    _, plan = prepare(_job("hf_to_mm", cfg))
    assert plan.notes == [f"mtp = false: the MTP layer(s) model.layers.3 are left out ({n} tensors)"]
    assert sum(why.startswith("mtp = false") for why in plan.dropped.values()) == n
    mm = _convert(mtp_hf, "hf_to_mm", cfg)
    _assert_same(_load_dir(mm), expected_checkpoint(without_mtp(hf), tp=2, pp_layers=[[3]], ep=1, experts=4))
    # and back: the original without its MTP layer, config.json as given
    back = tmp_path / "back"
    way_back = MmToHfConfig(save_hf_dir=back, mm_dir=mm, hf_config=HfConfig(hf_dir=mtp_hf), mtp=False)
    _, plan = prepare(_job("mm_to_hf", way_back))
    assert (
        f"mtp = false: the MTP layer(s) model.layers.3 are left out ({n} tensors); config.json is copied as it is"
        in plan.notes
    )
    _convert(mtp_hf, "mm_to_hf", way_back)
    got = load_hf_state(back)
    assert sorted(got) == sorted(without_mtp(hf))
    assert all(torch.equal(got[k], hf[k]) for k in got)
    assert (back / "config.json").read_bytes() == (mtp_hf / "config.json").read_bytes()


def test_way_back_without_mtp_on_disk_says_so(mtp_hf: Path, tmp_path: Path) -> None:
    cfg = HfToMmConfig(mm_dir=tmp_path / "mm", hf_config=HfConfig(hf_dir=mtp_hf), parallel_config=_pc("tp1"), mtp=False)
    mm = _convert(mtp_hf, "hf_to_mm", cfg)
    way_back = MmToHfConfig(save_hf_dir=tmp_path / "back", mm_dir=mm, hf_config=HfConfig(hf_dir=mtp_hf))
    with pytest.raises(
        ConvertError,
        match=r"mtp\.layers\.0\.enorm\.weight is missing; .* puts it on this rank; written without its MTP layers\? set mtp false$",
    ):
        prepare(_job("mm_to_hf", way_back))


# ---- bad values ----


def _variant(src: Path, dst: Path, *, config: dict | None = None, drop: str = "", rename: dict | None = None) -> Path:
    dst.mkdir()
    cfg = json.loads((src / "config.json").read_text()) | (config or {})
    (dst / "config.json").write_text(json.dumps(cfg))
    state = {(rename or {}).get(k, k): v for k, v in load_hf_state(src).items() if not (drop and k.startswith(drop))}
    write_weights(dst, state, 1)
    return dst


@pytest.mark.parametrize(("value", "said"), [(-1, "-1"), ("1", "'1'"), (1.0, "1.0"), (True, "True")])
def test_bad_mtp_count(mtp_hf: Path, tmp_path: Path, value: object, said: str) -> None:
    hf = _variant(mtp_hf, tmp_path / "hf", config={"num_nextn_predict_layers": value})
    with pytest.raises(ConvertError) as e:
        inspect_hf(hf)
    assert str(e.value) == (
        f"{hf}/config.json: num_nextn_predict_layers = {said}; expected a whole number >= 0 (MTP layers)"
    )


def test_mtp_layer_without_its_count(mtp_hf: Path, tmp_path: Path) -> None:
    hf = _variant(mtp_hf, tmp_path / "hf", config={"num_nextn_predict_layers": 0})
    with pytest.raises(ConvertError) as e:
        build_plan(inspect_hf(hf), _pc("tp1"))
    assert str(e.value) == (
        f"{hf}/config.json: num_hidden_layers = 3 and num_nextn_predict_layers = 0, but the weights hold layer(s) "
        "3..3 past them; set num_nextn_predict_layers to the number of MTP layers"
    )


def test_count_without_the_layer_is_a_model_without_mtp(mtp_hf: Path, tmp_path: Path) -> None:
    """Many published DeepSeek-V3 checkpoints drop model.layers.61 and keep num_nextn_predict_layers: 1."""
    hf = _variant(mtp_hf, tmp_path / "hf", drop=f"model.layers.{LAYERS}.")
    plan = build_plan(inspect_hf(hf), _pc("pp2"))
    assert not [e.key for f in plan.files for e in f.entries if e.key.startswith("mtp.")]
    assert plan.notes == []


def test_more_mtp_layers_than_declared(mtp_hf: Path, tmp_path: Path) -> None:
    hf = _variant(mtp_hf, tmp_path / "hf", config={"num_nextn_predict_layers": 2})
    with pytest.raises(ConvertError) as e:
        build_plan(inspect_hf(hf), _pc("tp1"))
    assert str(e.value) == (
        f"{hf}/config.json: num_nextn_predict_layers = 2 but the weights hold MTP layers [0] (counted after the "
        "decoder layers)"
    )


def test_a_copy_of_another_shape_is_refused(mtp_hf: Path, tmp_path: Path) -> None:
    hf = _variant(mtp_hf, tmp_path / "hf")
    state = load_hf_state(hf)
    state[f"model.layers.{LAYERS}.shared_head.head.weight"] = state["lm_head.weight"][:64].clone()
    for p in hf.glob("*.safetensors"):
        p.unlink()
    write_weights(hf, state, 1)
    with pytest.raises(ConvertError) as e:
        build_plan(inspect_hf(hf), _pc("tp1"))
    assert str(e.value) == (
        f"{hf}: model.layers.3.shared_head.head.weight (float32 [64, 64]) should be a copy of lm_head.weight "
        "(float32 [128, 64]), as the MTP layer shares it"
    )


def test_a_copy_that_differs_is_refused_before_writing(mtp_hf: Path, tmp_path: Path) -> None:
    """Megatron-Core keeps one embedding and one output layer: an MTP copy that differs cannot be kept, and
    dropping it would not come back byte for byte."""
    hf = _variant(mtp_hf, tmp_path / "hf")
    state = load_hf_state(hf)
    state[f"model.layers.{LAYERS}.shared_head.head.weight"][127, 63] += 1
    for p in hf.glob("*.safetensors"):
        p.unlink()
    write_weights(hf, state, 1)
    out = tmp_path / "mm"
    with pytest.raises(ConvertError) as e:
        _convert(hf, "hf_to_mm", HfToMmConfig(mm_dir=out, hf_config=HfConfig(hf_dir=hf), parallel_config=_pc("tp1")))
    assert str(e.value) == (
        f"{hf / 'model.safetensors'}: model.layers.3.shared_head.head.weight differs from lm_head.weight, which "
        "Megatron-Core's MTP layer shares instead of keeping a copy; convert with mtp false to leave the MTP "
        "layers out"
    )
    assert not out.exists() and list(tmp_path.iterdir()) == [hf]
    # cast while streaming: the stored bytes are compared, so the same answer
    cast = HfToMmConfig(mm_dir=out, hf_config=HfConfig(hf_dir=hf), parallel_config=_pc("tp1"), params_dtype="bf16")
    with pytest.raises(ConvertError, match=r"shared_head\.head\.weight differs from lm_head\.weight"):
        _convert(hf, "hf_to_mm", cast)
    # a part of the job (a Slurm array task) checks too, before writing anything
    from engine.run.parts import Part, execute_part

    job = _job("hf_to_mm", HfToMmConfig(mm_dir=out, hf_config=HfConfig(hf_dir=hf), parallel_config=_pc("tp2")))
    _, plan = prepare(job)
    with pytest.raises(ConvertError, match=r"shared_head\.head\.weight differs from lm_head\.weight"):
        list(execute_part(plan, out, Part(0, 2), "k"))
    assert not out.exists() and not list((tmp_path).glob(".mm.mmtui-parts-*/out/*"))
    # with mtp false it converts
    cfg = HfToMmConfig(mm_dir=out, hf_config=HfConfig(hf_dir=hf), parallel_config=_pc("tp1"), mtp=False)
    _convert(hf, "hf_to_mm", cfg)


def test_transformer_engine_names_with_mtp_are_refused(mtp_hf: Path, tmp_path: Path) -> None:
    cfg = HfToMmConfig(
        mm_dir=tmp_path / "mm", hf_config=HfConfig(hf_dir=mtp_hf), parallel_config=_pc("tp1"),
        transformer_impl="transformer_engine",
    )  # fmt: skip
    with pytest.raises(ConvertError) as e:
        prepare(_job("hf_to_mm", cfg))
    assert str(e.value) == (
        "transformer_impl = transformer_engine: the model has multi-token-prediction layers, whose Transformer "
        "Engine names are not written yet (MindSpeed-LLM refuses the two together too); use transformer_impl "
        "local, or mtp false to leave them out"
    )
    prepare(_job("hf_to_mm", cfg.model_copy(update={"mtp": False})))  # without them: TE's names as ever


def test_fp8_mtp_layer_is_dequantised(tmp_path: Path) -> None:
    """The hub's DeepSeek-V3 stores the MTP layer's projections (eh_proj too) in FP8 with block scales."""
    from tests.fixtures.tiny_deepseek import naive_dequantised

    hf = build_tiny_deepseek(tmp_path / "hf", mtp_layers=1, fp8_block=(16, 32))
    state = load_hf_state(hf)
    assert state[f"model.layers.{LAYERS}.eh_proj.weight"].dtype == torch.float8_e4m3fn
    _hf_to_mm(hf, tmp_path / "out", _pc("tp2pp2ep2"))
    _assert_same(_load_dir(tmp_path / "out"), expected(naive_dequantised(state, (16, 32)), 2, [[1, 2]], 2))


# DeepSeek-V3's config.json as published: YaRN rope scaling (config, not weights)
YARN = {
    "rope_scaling": {
        "beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 4096, "type": "yarn",
    },
    "max_position_embeddings": 163840,
}  # fmt: skip


def test_yarn_rope_scaling_passes_through(mtp_hf: Path, tmp_path: Path) -> None:
    """The way back gives config.json as it was, rope_scaling and all (and every other file byte for byte)."""
    hf = _variant(mtp_hf, tmp_path / "hf", config=YARN)
    text = (hf / "config.json").read_text()
    assert json.loads(text)["rope_scaling"]["type"] == "yarn"
    assert_round_trip(hf, tmp_path / "trip", _pc("tp2"))
    assert (tmp_path / "trip" / "back" / "config.json").read_text() == text


@pytest.mark.oracle
def test_megatron_core_loads_the_mtp_block_strictly(mtp_hf: Path, tmp_path: Path) -> None:
    """megatron-core 0.16's GPTModel with get_gpt_mtp_block_spec (local spec) takes our TP 1 rank file with no key
    missing or left over, and its main model still gives transformers' logits."""
    pytest.importorskip("megatron.core")
    from mmtui.megatron_logits import megatron_logits
    from tests.engine.test_family_deepseek import TOKENS, deepseek_arch
    from tests.fixtures.tiny_deepseek import tiny_deepseek_model

    model = _load_dir(_hf_to_mm(mtp_hf, tmp_path / "mm", _pc("tp1")))["mp_rank_00"]["model"]
    arch = deepseek_arch(mtp_hf)
    arch.extra = (arch.extra or {}) | {"mtp_num_layers": 1}
    got = megatron_logits([model], arch, TOKENS)
    hf = tmp_path / "hf"  # transformers without the MTP layer it does not build
    _variant(mtp_hf, hf, config={"num_nextn_predict_layers": 0}, drop=f"model.layers.{LAYERS}.")
    hf_model, _ = tiny_deepseek_model(hf)
    with torch.no_grad():
        want = hf_model(input_ids=torch.tensor([TOKENS])).logits[0]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


def test_cast_while_streaming_checks_the_stored_copies(mtp_hf: Path, tmp_path: Path) -> None:
    """--cfg.params_dtype shows every tensor in bf16; the copies are still compared as stored (float32)."""
    cfg = HfToMmConfig(
        mm_dir=tmp_path / "mm", hf_config=HfConfig(hf_dir=mtp_hf), parallel_config=_pc("tp1"), params_dtype="bf16"
    )
    model = _load_dir(_convert(mtp_hf, "hf_to_mm", cfg))["mp_rank_00"]["model"]
    hf = load_hf_state(mtp_hf)
    assert torch.equal(model["mtp.layers.0.eh_proj.weight"], hf["model.layers.3.eh_proj.weight"].to(torch.bfloat16))
