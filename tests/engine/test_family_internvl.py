"""InternVL 2.5 / 3: InternViT split in whole heads (6 heads over TP 4), the language model from its own preset.

Checks, as for every family: each rank file against a naive reference written from
MindSpeed-MM's module code (tests/fixtures/reference_internvl.py: the projector and the
InternViT q/k norms whole on every rank), the way back from files made by that reference,
the byte-exact round trip, re-split equal to a direct conversion, and megatron-core's
logits for the language model.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from engine.errors import ConvertError
from engine.job import HfConfig, MmToHfConfig
from engine.layout import ParallelConfig, layout_problems
from engine.planning.build import build_plan
from engine.run.verify import compare, identical, open_side
from engine.source.hf_source import inspect_hf
from tests.engine.test_hf_to_mm import _assert_same, _load_dir
from tests.engine.test_llm_families import (
    TOKENS,
    _convert,
    _hf_to_mm,
    _rank_models,
    assert_resplit_is_direct,
    assert_round_trip,
)
from tests.fixtures.reference_internvl import expected_internvl
from tests.fixtures.reference_layout import stage_cells
from tests.fixtures.tiny_internvl import build_tiny_internvl, internvl_text_model
from tests.fixtures.tiny_vlm import load_hf_state
from tests.test_cli import _bad, _same, mm_convert

LAYOUTS = {
    "tp1": (1, [[4]], [[3]]),
    "tp4_pp2": (4, [[1, 3]], [[3, 0]]),  # 6 ViT heads: 2, 2, 1, 1; vocabulary 130: 33, 33, 32, 32
    "tp2_vpp": (2, [[1, 1], [1, 1]], [[3, 0], [0, 0]]),
    "tp4_llm_from_stage1": (4, [[0, 1, 3]], [[2, 1, 0]]),
    "tp2_hetero": (2, [[0, 2, 2]], [[2, 1, 0]]),  # the projector on stage 1, with the word embedding
}


def _pc(name: str) -> ParallelConfig:
    tp, llm, vit = LAYOUTS[name]
    return ParallelConfig(tp_size=tp, llm_pp_layers=llm, vit_pp_layers=vit)


def _expected(hf: Path, layout: str) -> dict[str, dict]:
    cfg = json.loads((hf / "config.json").read_text())
    text = cfg["llm_config"]
    tp, llm, vit = LAYOUTS[layout]
    return expected_internvl(
        load_hf_state(hf), llm=text["model_type"], heads=text["num_attention_heads"],
        kv_heads=text["num_key_value_heads"], vit_heads=cfg["vision_config"]["num_attention_heads"],
        tied=text["tie_word_embeddings"], tp=tp, llm_pp_layers=llm, vit_pp_layers=vit,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("variant", "title"),
    [("internlm2", "InternVL · InternLM2"), ("qwen2", "InternVL · Qwen2"), ("llama", "InternVL · Llama")],
)
def test_language_model_preset_follows_llm_config(tiny_internvls: dict[str, Path], variant: str, title: str) -> None:
    info = inspect_hf(tiny_internvls[variant])
    assert (info.preset.title, info.preset.converter) == (title, "InternVLConverter")
    assert [m.name for m in info.preset.modules] == ["vit", "llm"]


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("variant", ["internlm2", "qwen2"])
def test_layout_matches_reference(tiny_internvls: dict[str, Path], tmp_path: Path, variant: str, layout: str) -> None:
    hf = tiny_internvls[variant]
    mm = _hf_to_mm(hf, tmp_path / "mm", _pc(layout))
    _assert_same(_load_dir(mm), _expected(hf, layout))


def test_whole_heads_at_tp4(tiny_internvls: dict[str, Path]) -> None:
    """The rules spelled out: 6 heads of 8 rows over TP 4 are 2, 2, 1, 1 for q, k and v each; the q/k norms
    (one norm over all 48 columns) and the projector (plain nn.Linear) are whole on every rank."""
    plan = build_plan(inspect_hf(tiny_internvls["internlm2"]), _pc("tp4_pp2"))
    layer0 = "image_encoder.encoder.encoder.layers.0."
    qkv = layer0 + "self_attention.linear_qkv.weight"
    stage0 = [f for f in plan.files if f.pp_rank == 0]
    shapes = {key: [next(e.shape for e in f.entries if e.key == key) for f in stage0] for key in (
        qkv, layer0 + "self_attention.linear_proj.weight", layer0 + "self_attention.q_layernorm.weight",
        layer0 + "self_attention.k_layernorm.weight", "image_encoder.projector.norm.weight",
        "image_encoder.projector.linear_fc1.weight", "image_encoder.projector.linear_fc1.bias",
        "image_encoder.projector.linear_fc2.weight", "image_encoder.projector.linear_fc2.bias",
    )}  # fmt: skip
    assert list(shapes.values()) == [
        [(48, 48), (48, 48), (24, 48), (24, 48)],
        [(48, 16), (48, 16), (48, 8), (48, 8)],
        [(48,)] * 4,
        [(48,)] * 4,
        [(192,)] * 4,
        [(64, 192)] * 4,
        [(64,)] * 4,
        [(64, 64)] * 4,
        [(64,)] * 4,
    ]
    third = next(e for e in stage0[2].entries if e.key == qkv)  # rank 2 holds head 4 of q, of k and of v
    assert [(p.rows, p.at) for p in third.pieces] == [((32, 40), 0), ((80, 88), 8), ((128, 136), 16)]


def _vit_layer(counts: list[list[int]], pp_rank: int, chunk: int, local: int) -> int:
    """The global ViT layer of a local index (chunk-major stage order), independently of engine/."""
    return next(start + local for c, s, start, _ in stage_cells(counts) if (c, s) == (chunk, pp_rank))


@pytest.mark.parametrize("layout", ["tp2_vpp", "tp4_pp2", "tp2_hetero"])
def test_projector_and_qk_norms_are_whole_on_every_rank(
    tiny_internvls: dict[str, Path], tmp_path: Path, layout: str
) -> None:
    """Issue 18: MindSpeed-MM fails to load a split projector ("size mismatch for linear_fc1.weight"), and a
    per-rank q/k norm changes InternViT's output. Every rank holding them holds the HF tensors themselves."""
    hf = tiny_internvls["internlm2"]  # InternViT-6B-like: with q/k norms
    tp, _, vit = LAYOUTS[layout]
    state = load_hf_state(hf)
    projector = {"norm": "mlp1.0", "linear_fc1": "mlp1.1", "linear_fc2": "mlp1.3"}
    held: dict[str, list[str]] = {}  # rank -> the projector tensors it holds
    norms = 0
    for rank, obj in _load_dir(_hf_to_mm(hf, tmp_path / "mm", _pc(layout))).items():
        pp_rank = int(rank.split("_")[3])  # every layout here has PP > 1
        for chunk in (k for k in obj if k.startswith("model")):
            for key, t in obj[chunk].items():
                parts = key.split(".")
                if key.startswith("image_encoder.projector."):
                    assert torch.equal(t, state[f"{projector[parts[2]]}.{parts[3]}"]), (rank, key)
                    held.setdefault(rank, []).append(key)
                elif parts[-2] in ("q_layernorm", "k_layernorm"):
                    layer = _vit_layer(vit, pp_rank, int(chunk.removeprefix("model") or 0), int(parts[4]))
                    hf_key = f"vision_model.encoder.layers.{layer}.attn.{parts[-2][0]}_norm.weight"
                    assert torch.equal(t, state[hf_key]), (rank, key)
                    norms += 1
    assert len(held) == tp and all(len(keys) == 6 for keys in held.values())  # on every TP rank of one stage
    assert norms == 2 * 3 * tp  # q and k of three layers, on every TP rank


def _save_rank_files(out: Path, ranks: dict[str, dict]) -> Path:
    """Rank files as MindSpeed-MM writes them (torch.save of the dict), from the reference."""
    for rank, obj in ranks.items():
        (out / "release" / rank).mkdir(parents=True)
        torch.save(obj, out / "release" / rank / "model_optim_rng.pt")
    (out / "latest_checkpointed_iteration.txt").write_text("release")
    return out


@pytest.mark.parametrize("layout", ["tp4_pp2", "tp2_hetero", "tp2_vpp"])
@pytest.mark.parametrize("variant", ["internlm2", "qwen2"])
def test_way_back_from_the_reference_layout(
    tiny_internvls: dict[str, Path], tmp_path: Path, variant: str, layout: str
) -> None:
    """Rank files made by the reference (not by hf_to_mm) convert back to the original tensors."""
    hf = tiny_internvls[variant]
    mm = _save_rank_files(tmp_path / "mm", _expected(hf, layout))
    cfg = MmToHfConfig(save_hf_dir=tmp_path / "back", mm_dir=mm, hf_config=HfConfig(hf_dir=hf),
                       parallel_config=_pc(layout))  # fmt: skip
    got, want = load_hf_state(_convert(hf, "mm_to_hf", cfg)), load_hf_state(hf)
    assert sorted(got) == sorted(want)
    for k, t in want.items():
        assert got[k].dtype == t.dtype and torch.equal(got[k], t), k


def test_a_split_projector_is_refused_on_the_way_back(tiny_internvls: dict[str, Path], tmp_path: Path) -> None:
    """Files cut with the projector split (as mmtui wrote them before issue 18) are one clear line, not misread."""
    hf = tiny_internvls["internlm2"]
    ranks = _expected(hf, "tp2_hetero")
    key = "image_encoder.projector.linear_fc1.weight"
    ranks["mp_rank_01_001"]["model"][key] = ranks["mp_rank_01_001"]["model"][key][32:].clone()
    mm = _save_rank_files(tmp_path / "mm", ranks)
    cfg = MmToHfConfig(save_hf_dir=tmp_path / "back", mm_dir=mm, hf_config=HfConfig(hf_dir=hf),
                       parallel_config=_pc("tp2_hetero"))  # fmt: skip
    with pytest.raises(ConvertError) as e:
        _convert(hf, "mm_to_hf", cfg)
    assert str(e.value) == (
        f"{mm}/release/mp_rank_01_001/model_optim_rng.pt [model]: {key} has shape [32, 192] on disk, "
        "the layout expects [64, 192]"
    )
    assert not (tmp_path / "back").exists()


def test_verify_finds_hf_equal_to_the_reference_layout(tiny_internvls: dict[str, Path], tmp_path: Path) -> None:
    hf = tiny_internvls["internlm2"]
    mm = _save_rank_files(tmp_path / "mm", _expected(hf, "tp2_hetero"))
    info = inspect_hf(hf)
    rows = list(compare(open_side(hf, None, None, "hf"), open_side(mm, info, _pc("tp2_hetero"), "mm")))
    assert len(rows) == len(load_hf_state(hf)) and identical(rows)


@pytest.mark.parametrize("layout", ["tp4_pp2", "tp2_vpp", "tp2_hetero"])
@pytest.mark.parametrize("variant", ["internlm2", "qwen2"])
def test_way_back_is_byte_identical(tiny_internvls: dict[str, Path], tmp_path: Path, variant: str, layout: str) -> None:
    assert_round_trip(tiny_internvls[variant], tmp_path, _pc(layout))


def test_resplit_equals_direct_conversion(tiny_internvls: dict[str, Path], tmp_path: Path) -> None:
    assert_resplit_is_direct(tiny_internvls["qwen2"], tmp_path, _pc("tp4_pp2"), _pc("tp2_vpp"))
    assert_resplit_is_direct(tiny_internvls["internlm2"], tmp_path / "qk", _pc("tp2_hetero"), _pc("tp4_pp2"))


def test_layout_problems_name_the_heads(tiny_internvls: dict[str, Path]) -> None:
    info = inspect_hf(tiny_internvls["qwen2"])
    # 130 vocabulary rows and 6 ViT heads need not divide by TP 4; the 4 KV heads must
    assert layout_problems(_pc("tp4_pp2"), info) == []
    problems = layout_problems(ParallelConfig(tp_size=8, llm_pp_layers=[[4]], vit_pp_layers=[[3]]), info)
    assert problems == [
        "parallel_config.tp_size 8 does not divide llm_config.num_key_value_heads = 4 (qwen2/config.json); "
        "use a tp_size among: 1, 2, 4",
        "parallel_config.tp_size 8 is more than vision_config.num_attention_heads = 6 (qwen2/config.json); "
        "every TP rank needs a whole head: use a tp_size of at most 6",
    ]


def test_unknown_language_model_is_one_clear_error(tmp_path: Path) -> None:
    hf = build_tiny_internvl(tmp_path / "hf", llm="qwen2")
    cfg = json.loads((hf / "config.json").read_text())
    cfg["llm_config"]["architectures"] = ["Phi3ForCausalLM"]
    (hf / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConvertError) as e:
        inspect_hf(hf)
    assert str(e.value) == (
        f"{hf}/config.json: llm_config.architectures = ['Phi3ForCausalLM'] is not a language model InternVL can "
        "hold; supported: DeepseekV2ForCausalLM, DeepseekV3ForCausalLM, InternLM2ForCausalLM, LlamaForCausalLM, "
        "MistralForCausalLM, MixtralForCausalLM, Qwen2ForCausalLM, Qwen2MoeForCausalLM, Qwen3ForCausalLM, "
        "Qwen3MoeForCausalLM"
    )


def test_mm_convert_internvl_converter(tiny_internvls: dict[str, Path], tmp_path: Path) -> None:
    hf = tiny_internvls["internlm2"]
    r = mm_convert(
        "InternVLConverter", "hf_to_mm", "--cfg.mm_dir", str(tmp_path / "cli"), "--cfg.hf_config.hf_dir", str(hf),
        "--cfg.parallel_config.llm_pp_layers", "[[1,3]]", "--cfg.parallel_config.vit_pp_layers", "[[3,0]]",
        "--cfg.parallel_config.tp_size", "4",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert _same(tmp_path / "cli", _hf_to_mm(hf, tmp_path / "engine", _pc("tp4_pp2")))
    r = mm_convert(
        "Qwen2VLConverter", "hf_to_mm", "--cfg.mm_dir", str(tmp_path / "wrong"), "--cfg.hf_config.hf_dir", str(hf),
        "--cfg.parallel_config.llm_pp_layers", "[[4]]", "--cfg.parallel_config.vit_pp_layers", "[[3]]",
    )  # fmt: skip
    _bad(r, "model_type 'internvl_chat' is not a Qwen2-VL model")
    assert not (tmp_path / "wrong").exists()


def _text_arch(hf: Path):
    from mmtui.megatron_logits import GPTArch

    c = json.loads((hf / "config.json").read_text())["llm_config"]
    return GPTArch(
        num_layers=c["num_hidden_layers"], hidden_size=c["hidden_size"], num_attention_heads=c["num_attention_heads"],
        num_query_groups=c["num_key_value_heads"], ffn_hidden_size=c["intermediate_size"], vocab_size=c["vocab_size"],
        rotary_base=c["rope_theta"], norm_epsilon=c["rms_norm_eps"], add_qkv_bias=c["model_type"] == "qwen2",
        tied=c["tie_word_embeddings"],
    )  # fmt: skip


@pytest.mark.oracle
@pytest.mark.parametrize(("variant", "tp"), [("internlm2", 1), ("internlm2", 2), ("qwen2", 1)])
def test_megatron_reproduces_transformers_logits(
    tiny_internvls: dict[str, Path], tmp_path: Path, variant: str, tp: int
) -> None:
    """The text_decoder.* tensors, prefix stripped, run in megatron-core's GPTModel as the LLM's transformers model."""
    pytest.importorskip("megatron.core")
    from mmtui.megatron_logits import megatron_logits

    hf = tiny_internvls[variant]
    mm = _hf_to_mm(hf, tmp_path / "mm", ParallelConfig(tp_size=tp, llm_pp_layers=[[4]], vit_pp_layers=[[3]]))
    prefix = "text_decoder."
    ranks = [{k[len(prefix) :]: v for k, v in m.items() if k.startswith(prefix)} for m in _rank_models(mm, tp)]
    got = megatron_logits(ranks, _text_arch(hf), TOKENS)
    model = internvl_text_model(hf, load_hf_state(hf))
    with torch.no_grad():
        want = model(input_ids=torch.tensor([TOKENS])).logits[0]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
