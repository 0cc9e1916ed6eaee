"""DeepSeek-V3 / V2-Lite in MindSpeed-LLM's names (`naming = "mindspeed_llm"`, convert-ckpt's default), checked
against a naive statement of what MindSpeed-LLM's converter writes, read from its source (Ascend/MindSpeed-LLM
at c77308a, convert_ckpt_v2.py --model-type-hf deepseek3 / deepseek2-lite, local layers, no --mla-mm-split,
no --moe-grouped-gemm):

- mindspeed_llm/tasks/checkpoint/model_builder.py:340-470 (get_module_mapping): decoder layers under
  `decoder.layers.N.`, the MTP layer's under `mtp.layers.N.transformer_layer.`; MLA's `self_attention.linear_qkv`,
  `linear_q_up_proj`, `linear_kv_up_proj`, `q_layernorm`, `kv_layernorm`, `linear_proj`; `mlp.router`,
  `mlp.router.expert_bias`, `mlp.experts.local_experts.E.linear_fc1/2`, `mlp.shared_experts.linear_fc1/2`;
  `mtp.layers.N.{enorm,hnorm,eh_proj}`, `mtp.final_layernorms.N` (mtp_post_norm) and `final_layernorm`
  (mtp_final_layernorms: the main model's final norm when MTP layers are written).
- convert_hf2mg.py:683-692: linear_qkv = torch.cat([q_a_proj (q_proj without q_lora_rank), kv_a_proj_with_mqa]),
  and :826-849: the same whole tensor on every TP rank; linear_proj chunked by columns, the up projections
  by rows (:726-729); the norms whole.
- convert_hf2mg.py:364-383 (set_model_postprocess): `final_layernorm` with MTP layers, else
  `decoder.final_layernorm`; the output layer by rows. :385-421 (set_mtp_*): enorm/hnorm whole, eh_proj by rows
  (torch.chunk dim 0), with PP > 1 the last stage also gets `embedding.word_embeddings` (from the MTP layer's
  embed_tokens), mtp.final_layernorms.N from shared_head.norm. :901-1070 (set_model_layer_mlp): router and bias
  whole, shared experts [gate_r; up_r] and down by columns, expert E on EP rank E // (experts / EP) as
  local_experts.(E % (experts / EP)), cut like them.
- configs/checkpoint/model_cfg.json:711-755 (deepseek3) and :537-571 (deepseek2-lite): the HF names read.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from engine.errors import ConvertError
from engine.job import HfConfig, HfToMmConfig, Job, MmToHfConfig, ResplitConfig, prepare
from engine.layout import ParallelConfig
from tests.engine.test_deepseek_mtp import LAYERS
from tests.engine.test_hf_to_mm import _assert_same, _load_dir
from tests.engine.test_llm_families import _convert
from tests.engine.test_way_back import _same_tree
from tests.fixtures.tiny_deepseek import build_tiny_deepseek
from tests.fixtures.tiny_vlm import load_hf_state

EXPERTS = 4


def _layer(hf: dict[str, torch.Tensor], src: str, dst: str) -> dict[str, torch.Tensor]:
    """One layer's tensors under MindSpeed-LLM's names (full, before TP)."""
    a = src + "self_attn."
    q = hf.get(a + "q_a_proj.weight", hf.get(a + "q_proj.weight"))
    out = {
        dst + "input_layernorm.weight": hf[src + "input_layernorm.weight"],
        dst + "pre_mlp_layernorm.weight": hf[src + "post_attention_layernorm.weight"],
        dst + "self_attention.linear_qkv.weight": torch.cat([q, hf[a + "kv_a_proj_with_mqa.weight"]]),
        dst + "self_attention.kv_layernorm.weight": hf[a + "kv_a_layernorm.weight"],
        dst + "self_attention.linear_kv_up_proj.weight": hf[a + "kv_b_proj.weight"],
        dst + "self_attention.linear_proj.weight": hf[a + "o_proj.weight"],
    }
    if a + "q_a_proj.weight" in hf:  # q_lora_rank
        out[dst + "self_attention.q_layernorm.weight"] = hf[a + "q_a_layernorm.weight"]
        out[dst + "self_attention.linear_q_up_proj.weight"] = hf[a + "q_b_proj.weight"]
    m = src + "mlp."
    if m + "gate_proj.weight" in hf:  # dense
        out[dst + "mlp.linear_fc1.weight"] = torch.cat([hf[m + "gate_proj.weight"], hf[m + "up_proj.weight"]])
        out[dst + "mlp.linear_fc2.weight"] = hf[m + "down_proj.weight"]
        return out
    out[dst + "mlp.router.weight"] = hf[m + "gate.weight"]
    if m + "gate.e_score_correction_bias" in hf:
        out[dst + "mlp.router.expert_bias"] = hf[m + "gate.e_score_correction_bias"]
    for e in range(EXPERTS):
        x, y = f"{m}experts.{e}.", f"{dst}mlp.experts.local_experts.{e}."
        out[y + "linear_fc1.weight"] = torch.cat([hf[x + "gate_proj.weight"], hf[x + "up_proj.weight"]])
        out[y + "linear_fc2.weight"] = hf[x + "down_proj.weight"]
    x, y = m + "shared_experts.", dst + "mlp.shared_experts."
    out[y + "linear_fc1.weight"] = torch.cat([hf[x + "gate_proj.weight"], hf[x + "up_proj.weight"]])
    out[y + "linear_fc2.weight"] = hf[x + "down_proj.weight"]
    return out


def _shard(key: str, t: torch.Tensor, tp: int, r: int) -> torch.Tensor:
    if key.endswith("linear_fc1.weight"):
        gate, up = t.chunk(2)
        return torch.cat([gate.chunk(tp)[r], up.chunk(tp)[r]])
    if key.endswith(("linear_proj.weight", "linear_fc2.weight")):
        return t.chunk(tp, dim=1)[r]
    rows = ("linear_q_up_proj.weight", "linear_kv_up_proj.weight", "eh_proj.weight", "word_embeddings.weight")
    if key.endswith((*rows, "output_layer.weight")):
        return t.chunk(tp)[r]
    return t  # linear_qkv, the norms, the router and its bias: whole


def expected(hf: dict[str, torch.Tensor], *, tp: int, pp_layers: list[int], ep: int) -> dict[str, dict]:
    mtp = f"model.layers.{LAYERS}.enorm.weight" in hf
    pp, per = len(pp_layers), EXPERTS // ep
    stage_of = [s for s, n in enumerate(pp_layers) for _ in range(n)]
    first = [sum(pp_layers[:s]) for s in range(pp)]
    placed: list[tuple[int, str, torch.Tensor]] = [
        (0, "embedding.word_embeddings.weight", hf["model.embed_tokens.weight"])
    ]
    for i in range(LAYERS):
        s = stage_of[i]
        for k, t in _layer(hf, f"model.layers.{i}.", f"decoder.layers.{i - first[s]}.").items():
            placed.append((s, k, t))
    last = pp - 1
    placed.append(
        (last, "final_layernorm.weight" if mtp else "decoder.final_layernorm.weight", hf["model.norm.weight"])
    )
    placed.append((last, "output_layer.weight", hf["lm_head.weight"]))
    if mtp:
        src = f"model.layers.{LAYERS}."
        for k, t in _layer(hf, src, "mtp.layers.0.transformer_layer.").items():
            placed.append((last, k, t))
        for name in ("enorm", "hnorm", "eh_proj"):
            placed.append((last, f"mtp.layers.0.{name}.weight", hf[f"{src}{name}.weight"]))
        placed.append((last, "mtp.final_layernorms.0.weight", hf[src + "shared_head.norm.weight"]))
        if pp > 1:
            placed.append((last, "embedding.word_embeddings.weight", hf[src + "embed_tokens.weight"]))
    out: dict[str, dict] = {}
    for r in range(tp):
        for s in range(pp):
            for e in range(ep):
                name = f"mp_rank_{r:02d}" + (f"_{s:03d}" if pp > 1 else "") + (f"_{e:03d}" if ep > 1 else "")
                model = {}
                for stage, key, t in placed:
                    if stage != s:
                        continue
                    if ".local_experts." in key:
                        head, tail = key.split(".local_experts.")
                        expert, rest = tail.split(".", 1)
                        if int(expert) // per != e:
                            continue
                        key = f"{head}.local_experts.{int(expert) % per}.{rest}"
                    model[key] = _shard(key, t, tp, r).clone().contiguous()
                out[name] = {"model": model, "checkpoint_version": 3.0}
    return out


@pytest.fixture(scope="module")
def hfs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from tests.fixtures.tiny_deepseek import V2

    root = tmp_path_factory.mktemp("hf_ms")
    return {
        "v3_mtp": build_tiny_deepseek(root / "v3_mtp", mtp_layers=1, shards=2),
        "v2_lite": build_tiny_deepseek(root / "v2_lite", q_lora_rank=None, extra=V2),  # q_proj, no router bias
    }


def _job(converter: str, command: str, cfg) -> Job:
    return Job(converter=converter, command=command, cfg=cfg)


def _to_mm(hf: Path, out: Path, tp: int, pp_layers: list[int], ep: int, converter: str = "DeepseekV3Converter") -> Path:
    layout = ParallelConfig(tp_size=tp, ep_size=ep, llm_pp_layers=[pp_layers])
    cfg = HfToMmConfig(mm_dir=out, hf_config=HfConfig(hf_dir=hf), parallel_config=layout, naming="mindspeed_llm")
    from engine.run.execute import run

    run(prepare(_job(converter, "hf_to_mm", cfg))[1], out)
    return out


LAYOUTS = {
    "tp1": (1, [3], 1),
    "tp2": (2, [3], 1),
    "pp2": (1, [1, 2], 1),
    "ep2": (1, [3], 2),
    "tp2pp2ep2": (2, [1, 2], 2),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_v3_with_mtp_matches_mindspeed_llm(hfs: dict[str, Path], tmp_path: Path, layout: str) -> None:
    tp, pp_layers, ep = LAYOUTS[layout]
    mm = _to_mm(hfs["v3_mtp"], tmp_path / "mm", tp, pp_layers, ep)
    _assert_same(_load_dir(mm), expected(load_hf_state(hfs["v3_mtp"]), tp=tp, pp_layers=pp_layers, ep=ep))


@pytest.mark.parametrize("layout", ["tp2", "tp2pp2ep2"])
def test_v2_lite_matches_mindspeed_llm(hfs: dict[str, Path], tmp_path: Path, layout: str) -> None:
    tp, pp_layers, ep = LAYOUTS[layout]
    mm = _to_mm(hfs["v2_lite"], tmp_path / "mm", tp, pp_layers, ep, "DeepseekV2Converter")
    _assert_same(_load_dir(mm), expected(load_hf_state(hfs["v2_lite"]), tp=tp, pp_layers=pp_layers, ep=ep))


def test_without_mtp_the_final_norm_stays_in_the_decoder(hfs: dict[str, Path], tmp_path: Path) -> None:
    layout = ParallelConfig(tp_size=2, llm_pp_layers=[[1, 2]])
    cfg = HfToMmConfig(mm_dir=tmp_path / "mm", hf_config=HfConfig(hf_dir=hfs["v3_mtp"]), parallel_config=layout,
                       naming="mindspeed_llm", mtp=False)  # fmt: skip
    mm = _convert(hfs["v3_mtp"], "hf_to_mm", cfg)
    hf = {k: v for k, v in load_hf_state(hfs["v3_mtp"]).items() if not k.startswith(f"model.layers.{LAYERS}.")}
    _assert_same(_load_dir(mm), expected(hf, tp=2, pp_layers=[1, 2], ep=1))


def test_back_to_hf_and_resplit(hfs: dict[str, Path], tmp_path: Path) -> None:
    """MindSpeed-LLM's names back to the original files byte for byte, and re-cut in them as a direct conversion."""
    hf = hfs["v3_mtp"]
    mm = _to_mm(hf, tmp_path / "mm", 2, [1, 2], 2)
    back = tmp_path / "back"
    cfg = MmToHfConfig(save_hf_dir=back, mm_dir=mm, hf_config=HfConfig(hf_dir=hf), naming="mindspeed_llm")
    _convert(hf, "mm_to_hf", cfg)
    for p in hf.iterdir():
        if p.name != "model.safetensors.index.json":
            assert (back / p.name).read_bytes() == p.read_bytes(), p.name
    target = ParallelConfig(tp_size=1, ep_size=4, llm_pp_layers=[[1, 1, 1]])
    resplit = ResplitConfig(source_dir=mm, target_dir=tmp_path / "re", hf_config=HfConfig(hf_dir=hf),
                            target_parallel_config=target, naming="mindspeed_llm")  # fmt: skip
    _convert(hf, "resplit", resplit)
    _same_tree(_to_mm(hf, tmp_path / "direct", 1, [1, 1, 1], 4), tmp_path / "re")


def test_resplit_changes_the_naming(hfs: dict[str, Path], tmp_path: Path) -> None:
    """Megatron-Core's names re-cut into MindSpeed-LLM's equal a direct conversion to them."""
    hf = hfs["v3_mtp"]
    layout = ParallelConfig(tp_size=2, ep_size=2, llm_pp_layers=[[1, 2]])
    mcore = HfToMmConfig(mm_dir=tmp_path / "mcore", hf_config=HfConfig(hf_dir=hf), parallel_config=layout)
    _convert(hf, "hf_to_mm", mcore)
    target = ParallelConfig(tp_size=1, ep_size=2, llm_pp_layers=[[3]])
    cfg = ResplitConfig(source_dir=tmp_path / "mcore", target_dir=tmp_path / "ms", hf_config=HfConfig(hf_dir=hf),
                        target_parallel_config=target, naming="mindspeed_llm", source_naming="megatron_core")  # fmt: skip
    _convert(hf, "resplit", cfg)
    _same_tree(_to_mm(hf, tmp_path / "direct", 1, [3], 2), tmp_path / "ms")


def test_the_other_naming_is_told_on_the_way_back(hfs: dict[str, Path], tmp_path: Path) -> None:
    """A MindSpeed-LLM checkpoint read with Megatron-Core's names fails on a key, in one line."""
    hf = hfs["v3_mtp"]
    mm = _to_mm(hf, tmp_path / "mm", 1, [3], 1)
    cfg = MmToHfConfig(save_hf_dir=tmp_path / "back", mm_dir=mm, hf_config=HfConfig(hf_dir=hf))
    with pytest.raises(ConvertError) as e:
        prepare(_job("DeepseekV3Converter", "mm_to_hf", cfg))
    assert str(e.value) == (
        f"{mm}/release/mp_rank_00/model_optim_rng.pt [model]: decoder.layers.0.self_attention.linear_qkv.weight is "
        "on disk but not in the layout (tp_size=1, llm_pp_layers=[[3]]); is the source layout right? Or written in "
        "another naming (naming = mindspeed_llm)?"
    )


def test_llama_has_one_naming(tiny_llms: dict[str, Path], tmp_path: Path) -> None:
    """MindSpeed-LLM writes Llama in Megatron-Core's names: the same files either way."""
    hf = tiny_llms["llama"]
    layout = ParallelConfig(tp_size=2, llm_pp_layers=[[4]])
    for naming in ("megatron_core", "mindspeed_llm"):
        cfg = HfToMmConfig(mm_dir=tmp_path / naming, hf_config=HfConfig(hf_dir=hf), parallel_config=layout,
                           naming=naming)  # fmt: skip
        _convert(hf, "hf_to_mm", cfg)
    _same_tree(tmp_path / "megatron_core", tmp_path / "mindspeed_llm")


def test_bad_naming(hfs: dict[str, Path], tmp_path: Path) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="naming"):
        HfToMmConfig(mm_dir=tmp_path / "mm", hf_config=HfConfig(hf_dir=hfs["v3_mtp"]),
                     parallel_config=ParallelConfig(llm_pp_layers=[[3]]), naming="nemo")  # fmt: skip


# ---- convert-ckpt: MindSpeed-LLM's --mtp-num-layers (convert_ckpt_v2.py: default 0, the MTP layers not read) ----


def test_convert_ckpt_mtp_num_layers(hfs: dict[str, Path], tmp_path: Path) -> None:
    """MindSpeed-LLM's command line: its names, and the MTP layers only with --mtp-num-layers."""
    hf = hfs["v3_mtp"]
    from tests.test_convert_ckpt import _one_line, _ranks, convert_ckpt

    base = ["--load-model-type", "hf", "--save-model-type", "mg", "--model-type-hf", "deepseek3", "--load-dir",
            str(hf), "--target-pipeline-parallel-size", "2", "--num-layer-list", "1,2"]  # fmt: skip
    r = convert_ckpt(*base, "--save-dir", str(tmp_path / "job"), "--print-job")
    assert r.returncode == 0 and "  mtp: false\n" in r.stdout, r.stderr
    line = _one_line(convert_ckpt(*base, "--save-dir", str(tmp_path / "bad"), "--mtp-num-layers", "2"))
    assert line == (
        f"convert-ckpt: error: --mtp-num-layers 2: {hf}/config.json's num_nextn_predict_layers is 1; give 1, "
        "or 0 to leave them out"
    )
    r = convert_ckpt(*base, "--save-dir", str(tmp_path / "mg"), "--mtp-num-layers", "1")
    assert r.returncode == 0, r.stderr
    ranks = _ranks(tmp_path / "mg", "iter_0000001")
    want = expected(load_hf_state(hf), tp=1, pp_layers=[1, 2], ep=1)
    _assert_same(
        {k: {"model": v["model"], "checkpoint_version": v["checkpoint_version"]} for k, v in ranks.items()}, want
    )
    rank = ranks["mp_rank_00_001"]
    # Megatron-LM's args for MLA, MTP and the DeepSeek-V3 router (MLATransformerConfig / TransformerConfig names)
    c = json.loads((hf / "config.json").read_text())
    args = vars(rank["args"])
    assert {k: args[k] for k in (
        "num_layers", "num_attention_heads", "num_query_groups", "group_query_attention", "kv_channels",
        "multi_latent_attention", "q_lora_rank", "kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim",
        "mtp_num_layers", "num_experts", "moe_router_topk", "moe_ffn_hidden_size", "moe_layer_freq",
        "moe_router_score_function", "moe_router_pre_softmax", "moe_router_enable_expert_bias",
        "moe_router_num_groups", "moe_router_group_topk", "moe_router_topk_scaling_factor",
        "moe_shared_expert_intermediate_size",
    )} == {
        "num_layers": 3, "num_attention_heads": 4, "num_query_groups": 4, "group_query_attention": False,
        "kv_channels": c["v_head_dim"], "multi_latent_attention": True, "q_lora_rank": 32, "kv_lora_rank": 16,
        "qk_head_dim": 16, "qk_pos_emb_head_dim": 8, "v_head_dim": 16, "mtp_num_layers": 1, "num_experts": 4,
        "moe_router_topk": 2, "moe_ffn_hidden_size": 32, "moe_layer_freq": [0, 1, 1],
        "moe_router_score_function": "sigmoid", "moe_router_pre_softmax": False,
        "moe_router_enable_expert_bias": True, "moe_router_num_groups": 2, "moe_router_group_topk": 1,
        "moe_router_topk_scaling_factor": 2.5, "moe_shared_expert_intermediate_size": 32,
    }  # fmt: skip
    back = tmp_path / "back"
    r = convert_ckpt("--load-model-type", "mg", "--save-model-type", "hf", "--model-type-hf", "deepseek3",
                     "--load-dir", str(tmp_path / "mg"), "--save-dir", str(back), "--hf-cfg-dir", str(hf),
                     "--mtp-num-layers", "1")  # fmt: skip
    assert r.returncode == 0, r.stderr
    for p in hf.glob("*.safetensors"):
        assert (back / p.name).read_bytes() == p.read_bytes(), p.name


# ---- the preset machinery a naming uses: without, extends chains, concat ----

PRESETS = Path(__file__).resolve().parents[2] / "presets"


def _preset(tmp_path: Path, files: dict[str, str]) -> Path:
    import shutil

    for name in ("deepseek_v3", "deepseek_v3_mindspeed_llm"):
        shutil.copy(PRESETS / f"{name}.toml", tmp_path / f"{name}.toml")
    for name, text in files.items():
        (tmp_path / f"{name}.toml").write_text(text)
    return tmp_path / f"{list(files)[-1]}.toml"


def test_without_names_only_the_bases_targets(tmp_path: Path) -> None:
    from engine.preset import load_preset_file

    path = _preset(tmp_path, {"x": 'extends = "deepseek_v3"\nname = "x"\nwithout = ["decoder.layers.*.nope"]\n'})
    with pytest.raises(ConvertError) as e:
        load_preset_file(path)
    assert str(e.value) == f"{path}: without names 'decoder.layers.*.nope', which no mapping of 'deepseek_v3' targets"
    path = _preset(tmp_path, {"y": 'name = "y"\nwithout = ["output_layer"]\n'})
    with pytest.raises(ConvertError) as e:
        load_preset_file(path)
    assert str(e.value) == f"{path}: without takes from the mappings of the preset it extends; set `extends`"


def test_extends_may_chain_but_not_loop(tmp_path: Path) -> None:
    from engine.preset import load_preset_file

    path = _preset(tmp_path, {"b": 'extends = "a"\nname = "b"\n', "a": 'extends = "b"\nname = "a"\n'})
    with pytest.raises(ConvertError) as e:
        load_preset_file(path)
    assert str(e.value) == f"{tmp_path / 'a.toml'}: extends itself through a -> b"
    chained = load_preset_file(_preset(tmp_path, {"c": 'extends = "deepseek_v3_mindspeed_llm"\nname = "c"\n'}))
    base = load_preset_file(PRESETS / "deepseek_v3_mindspeed_llm.toml")
    assert chained.mappings == base.mappings and chained.naming == "mindspeed_llm"


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ('tp = "gated"', "kind 'concat' needs tp = 'rows' or 'replicate'"),
        ("", "kind 'concat' takes two or more hf names, got 1: ['model.layers.*.self_attn.q_a_proj']"),
    ],
)
def test_a_broken_concat_is_one_line(tmp_path: Path, edit: str, message: str) -> None:
    from engine.preset import load_preset_file

    text = (PRESETS / "deepseek_v3_mindspeed_llm.toml").read_text()
    old = 'hf = ["model.layers.*.self_attn.q_a_proj", "model.layers.*.self_attn.kv_a_proj_with_mqa"]'
    assert old in text
    new = old + "\n" + edit if edit else 'hf = ["model.layers.*.self_attn.q_a_proj"]'
    path = _preset(tmp_path, {"deepseek_v3_mindspeed_llm": text.replace(old, new)})
    with pytest.raises(ConvertError) as e:
        load_preset_file(path)
    assert str(e.value).startswith(f"{path}: mappings[")
    assert str(e.value).endswith(f"(the mapping to 'decoder.layers.*.self_attention.linear_qkv'): {message}")
