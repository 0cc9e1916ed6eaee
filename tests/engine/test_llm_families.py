"""Megatron-Core GPT language models (Llama, Qwen2, Qwen3): layout, round trips, re-split, logits."""

from __future__ import annotations

import filecmp
import json
from pathlib import Path

import pytest
import torch

from engine.errors import ConvertError
from engine.job import HfConfig, HfToMmConfig, Job, MmToHfConfig, ResplitConfig, prepare
from engine.layout import ParallelConfig, layout_problems, validate_layout
from engine.planning.build import build_plan
from engine.planning.check import check_plan
from engine.run.execute import run
from engine.source.hf_source import inspect_hf
from tests.engine.test_hf_to_mm import _assert_same, _load_dir
from tests.engine.test_way_back import _same_tree
from tests.fixtures.reference_layout import expected_checkpoint
from tests.fixtures.tiny_llm import tiny_llm_model
from tests.fixtures.tiny_vlm import load_hf_state

LAYOUTS = {
    "tp1": (1, [[4]]),
    "tp2": (2, [[4]]),
    "tp2pp2": (2, [[1, 3]]),
    "vpp": (2, [[1, 1], [1, 1]]),
    "pp3_tp1": (1, [[2, 1, 1]]),
}
VARIANTS = ["llama", "qwen2_tied", "qwen3"]


def _pc(name: str) -> ParallelConfig:
    tp, llm = LAYOUTS[name]
    return ParallelConfig(tp_size=tp, llm_pp_layers=llm)


def _cfg(hf: Path) -> dict:
    return json.loads((hf / "config.json").read_text())


def _job(hf: Path, command: str, cfg) -> Job:
    return Job(converter=inspect_hf(hf).preset.converter, command=command, cfg=cfg)


def _convert(hf: Path, command: str, cfg) -> Path:
    _, plan = prepare(_job(hf, command, cfg))
    assert check_plan(plan) == []
    run(plan, cfg.out_dir)
    return cfg.out_dir


def _hf_to_mm(hf: Path, out: Path, layout: ParallelConfig) -> Path:
    return _convert(hf, "hf_to_mm", HfToMmConfig(mm_dir=out, hf_config=HfConfig(hf_dir=hf), parallel_config=layout))


def _resplit(hf: Path, src: Path, out: Path, a: ParallelConfig, b: ParallelConfig) -> Path:
    cfg = ResplitConfig(
        source_dir=src,
        target_dir=out,
        hf_config=HfConfig(hf_dir=hf),
        source_parallel_config=a,
        target_parallel_config=b,
    )
    return _convert(hf, "resplit", cfg)


def _assert_back_to_original(hf: Path, mm: Path, out: Path, layout: ParallelConfig) -> None:
    """mm_to_hf gives the original files: the index with the same content, every other file byte for byte."""
    _convert(
        hf, "mm_to_hf", MmToHfConfig(save_hf_dir=out, mm_dir=mm, hf_config=HfConfig(hf_dir=hf), parallel_config=layout)
    )
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in hf.iterdir())
    for p in hf.iterdir():
        if p.name == "model.safetensors.index.json":
            assert json.loads((out / p.name).read_text()) == json.loads(p.read_text())
        else:
            assert filecmp.cmp(p, out / p.name, shallow=False), p.name


def assert_round_trip(hf: Path, tmp_path: Path, layout: ParallelConfig) -> None:
    """HF -> MM (layout) -> HF gives the original files."""
    mm = _hf_to_mm(hf, tmp_path / "mm", layout)
    _assert_back_to_original(hf, mm, tmp_path / "back", layout)


def assert_resplit_is_direct(hf: Path, tmp_path: Path, a: ParallelConfig, b: ParallelConfig) -> None:
    """HF -> MM (a) -> resplit to b writes what HF -> MM (b) writes, file for file."""
    mm_a = _hf_to_mm(hf, tmp_path / "a", a)
    direct = _hf_to_mm(hf, tmp_path / "direct", b)
    _same_tree(direct, _resplit(hf, mm_a, tmp_path / "b", a, b))


def _rank_models(mm: Path, tp: int) -> list[dict[str, torch.Tensor]]:
    """The "model" dict of each TP rank of a PP 1 checkpoint."""
    return [
        torch.load(mm / "release" / f"mp_rank_{r:02d}" / "model_optim_rng.pt", weights_only=True)["model"]
        for r in range(tp)
    ]


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("variant", VARIANTS)
def test_layout_matches_reference(tiny_llms: dict[str, Path], tmp_path: Path, variant: str, layout: str) -> None:
    hf = tiny_llms[variant]
    tp, llm = LAYOUTS[layout]
    _hf_to_mm(hf, tmp_path / "out", _pc(layout))
    cfg = _cfg(hf)
    want = expected_checkpoint(
        load_hf_state(hf), family=cfg["model_type"], num_heads=cfg["num_attention_heads"],
        num_kv_heads=cfg["num_key_value_heads"], vit_num_heads=0, tied=cfg["tie_word_embeddings"],
        tp=tp, llm_pp_layers=llm, vit_pp_layers=None, prefix="",
    )  # fmt: skip
    _assert_same(_load_dir(tmp_path / "out"), want)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("variant", VARIANTS)
def test_hf_mm_hf_is_byte_identical(tiny_llms: dict[str, Path], tmp_path: Path, variant: str, layout: str) -> None:
    assert_round_trip(tiny_llms[variant], tmp_path, _pc(layout))


@pytest.mark.parametrize(("a", "b"), [("tp2pp2", "tp1"), ("tp1", "vpp"), ("vpp", "pp3_tp1")])
@pytest.mark.parametrize("variant", VARIANTS)
def test_resplit_equals_direct_conversion(
    tiny_llms: dict[str, Path], tmp_path: Path, variant: str, a: str, b: str
) -> None:
    assert_resplit_is_direct(tiny_llms[variant], tmp_path, _pc(a), _pc(b))


def test_module_lists_must_match_the_family(tiny_llms: dict[str, Path], tiny_dirs: dict[str, Path]) -> None:
    llama = inspect_hf(tiny_llms["llama"])
    assert layout_problems(ParallelConfig(llm_pp_layers=[[4]], vit_pp_layers=[[0]]), llama) == [
        "parallel_config.vit_pp_layers is set but Llama has no vision encoder; leave it unset"
    ]
    with pytest.raises(ConvertError, match=r"parallel_config.vit_pp_layers is missing; Qwen2-VL has a vision encoder"):
        validate_layout(ParallelConfig(llm_pp_layers=[[4]]), inspect_hf(tiny_dirs["qwen2_vl"]))
    # an LLM-only stage list may not leave a stage empty
    assert layout_problems(ParallelConfig(llm_pp_layers=[[0, 4]]), llama) == [
        "parallel_config: pipeline stage 0 holds no layers of any module; every stage needs at least one"
    ]


def test_qwen3_head_size_comes_from_the_weights(tiny_llms: dict[str, Path]) -> None:
    """Qwen3's head_dim (32) is not hidden_size / heads (16): q rows = heads x 32, fused per KV group."""
    plan = build_plan(inspect_hf(tiny_llms["qwen3"]), _pc("tp1"))
    qkv = next(e for f in plan.files for e in f.entries if e.key == "decoder.layers.0.self_attention.linear_qkv.weight")
    assert qkv.shape == ((4 + 2 + 2) * 32, 64)


# ---- noop layers (MindSpeed-LLM --noop-layers): empty pipeline positions, counted in the lists ----

NOOP = {
    # name: (tp, llm_pp_layers, noop_layers) for 4 real layers
    "pp2_ends": (1, [[3, 3]], [0, 5]),  # stage 0: empty, 0, 1 -> local 1, 2; stage 1: 2, 3, empty
    "tp2_vpp": (2, [[2, 1], [1, 1]], [2]),  # chunk 0 stage 1 is only the empty layer
}


def _noop(name: str) -> ParallelConfig:
    tp, llm, noop = NOOP[name]
    return ParallelConfig(tp_size=tp, llm_pp_layers=llm, noop_layers=noop)


@pytest.mark.parametrize("layout", list(NOOP))
def test_noop_layers_layout_and_round_trip(tiny_llms: dict[str, Path], tmp_path: Path, layout: str) -> None:
    hf = tiny_llms["qwen2_tied"]
    tp, llm, noop = NOOP[layout]
    mm = _hf_to_mm(hf, tmp_path / "mm", _noop(layout))
    want = expected_checkpoint(
        load_hf_state(hf), family="qwen2", num_heads=4, num_kv_heads=2, vit_num_heads=0, tied=True, tp=tp,
        llm_pp_layers=llm, vit_pp_layers=None, prefix="", noop_layers=tuple(noop),
    )  # fmt: skip
    _assert_same(_load_dir(mm), want)
    _assert_back_to_original(hf, mm, tmp_path / "back", _noop(layout))


def test_verify_takes_padding_and_noop_layers(tiny_llms: dict[str, Path], tmp_path: Path) -> None:
    from tests.test_verify import verify

    hf = tiny_llms["qwen3_vocab99"]
    padded = _hf_to_mm(hf, tmp_path / "padded", _padded("pad8_tp2pp2"))
    r = verify(str(hf), str(padded), "--b-tp", "2", "--b-llm-pp-layers", "[[1,3]]", "--b-vocab-divisible-by", "8")
    assert r.returncode == 0, r.stdout + r.stderr
    noop = _hf_to_mm(hf, tmp_path / "noop", ParallelConfig(llm_pp_layers=[[3, 3]], noop_layers=[0, 5]))
    r = verify(str(hf), str(noop), "--b-llm-pp-layers", "[[3,3]]", "--b-noop-layers", "[0,5]")
    assert r.returncode == 0, r.stdout + r.stderr


def test_noop_layers_keep_their_positions(tiny_llms: dict[str, Path]) -> None:
    plan = build_plan(inspect_hf(tiny_llms["llama"]), _noop("pp2_ends"))
    layers = [
        sorted({e.key.split(".")[2] for e in f.entries if e.key.startswith("decoder.layers.")}) for f in plan.files
    ]
    assert layers == [["1", "2"], ["0", "1"]]
    first = next(e for e in plan.files[0].entries if e.key == "decoder.layers.1.input_layernorm.weight")
    assert first.sources == ["model.layers.0.input_layernorm.weight"]


def test_noop_layers_problems(tiny_llms: dict[str, Path]) -> None:
    llama = inspect_hf(tiny_llms["llama"])
    assert layout_problems(ParallelConfig(llm_pp_layers=[[2, 2]], noop_layers=[1]), llama) == [
        "parallel_config.llm_pp_layers [[2, 2]] sums to 4 but llama/config.json has num_hidden_layers = 4 plus "
        "1 noop_layers; the sum must equal 5"
    ]
    assert layout_problems(ParallelConfig(llm_pp_layers=[[3, 2]], noop_layers=[5]), llama) == [
        "parallel_config.noop_layers [5]: position 5 is past the last layer; positions are 0..4 "
        "(the 5 layers of parallel_config.llm_pp_layers)"
    ]


# ---- the oracle: megatron-core's GPTModel on our files == transformers on the HF files ----

TOKENS = [3, 17, 99, 5, 42, 7, 64, 127, 0, 11, 23, 88]


def _arch(hf: Path, **override):
    """megatron-core's architecture for the HF config.json (vocab_size overridden when padded)."""
    from mmtui.megatron_logits import GPTArch

    c = _cfg(hf)
    fields = dict(
        num_layers=c["num_hidden_layers"], hidden_size=c["hidden_size"], num_attention_heads=c["num_attention_heads"],
        num_query_groups=c["num_key_value_heads"], ffn_hidden_size=c["intermediate_size"], vocab_size=c["vocab_size"],
        rotary_base=c["rope_theta"], norm_epsilon=c["rms_norm_eps"], add_qkv_bias=c["model_type"] == "qwen2",
        tied=c["tie_word_embeddings"], qk_layernorm=c["model_type"] == "qwen3", kv_channels=c.get("head_dim"),
    )  # fmt: skip
    return GPTArch(**(fields | override))


@pytest.mark.oracle
@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("variant", VARIANTS)
def test_megatron_reproduces_transformers_logits(
    tiny_llms: dict[str, Path], tmp_path: Path, variant: str, tp: int
) -> None:
    pytest.importorskip("megatron.core")
    from mmtui.megatron_logits import megatron_logits

    hf = tiny_llms[variant]
    out = _hf_to_mm(hf, tmp_path / "mm", _pc("tp2" if tp == 2 else "tp1"))
    got = megatron_logits(_rank_models(out, tp), _arch(hf), TOKENS)
    model, _ = tiny_llm_model(hf)
    with torch.no_grad():
        want = model(input_ids=torch.tensor([TOKENS])).logits[0]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_command_line(tiny_llms: dict[str, Path], tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    """`mm-convert LlamaConverter hf_to_mm` with the seed's field names; no vit list for a plain LLM."""
    from tests.test_cli import mm_convert

    hf = tiny_llms["llama"]
    r = mm_convert(
        "LlamaConverter", "hf_to_mm", "--cfg.mm_dir", str(tmp_path / "cli"), "--cfg.hf_config.hf_dir", str(hf),
        "--cfg.parallel_config.llm_pp_layers", "[[1,3]]", "--cfg.parallel_config.tp_size", "2",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    _hf_to_mm(hf, tmp_path / "api", _pc("tp2pp2"))
    _same_tree(tmp_path / "api", tmp_path / "cli")
    r = mm_convert(
        "Qwen2VLConverter", "hf_to_mm", "--cfg.mm_dir", str(tmp_path / "vl"),
        "--cfg.hf_config.hf_dir", str(tiny_dirs["qwen2_vl"]), "--cfg.parallel_config.llm_pp_layers", "[[4]]",
    )  # fmt: skip
    assert r.returncode == 2 and not (tmp_path / "vl").exists()
    assert r.stderr.strip().endswith("parallel_config.vit_pp_layers is missing; Qwen2-VL has a vision encoder whose "
                                     "layers need a per-stage list, e.g. [[32,0,0,0]]")  # fmt: skip


# ---- vocabulary padding (Megatron-LM's rule: a multiple of make_vocab_size_divisible_by x TP) ----

PADDED = {
    # name: (tp, llm_pp_layers, make_vocab_size_divisible_by) -> padded rows for a vocabulary of 99
    "pad8_tp2pp2": (2, [[1, 3]], 8),  # 112 rows: 56 + 43 real and 13 zero
    "pad128_tp2": (2, [[4]], 128),  # 256 rows: rank 1 is all zeros
    "pad8_tp1_vpp": (1, [[1, 1], [1, 1]], 8),  # 104 rows
}


def _padded(name: str) -> ParallelConfig:
    tp, llm, div = PADDED[name]
    return ParallelConfig(tp_size=tp, llm_pp_layers=llm, make_vocab_size_divisible_by=div)


@pytest.mark.parametrize("layout", list(PADDED))
def test_padded_vocabulary_layout_and_round_trip(tiny_llms: dict[str, Path], tmp_path: Path, layout: str) -> None:
    hf = tiny_llms["qwen3_vocab99"]
    pc = _padded(layout)
    mm = _hf_to_mm(hf, tmp_path / "mm", pc)
    cfg = _cfg(hf)
    want = expected_checkpoint(
        load_hf_state(hf), family="qwen3", num_heads=4, num_kv_heads=2, vit_num_heads=0, tied=True, tp=pc.tp_size,
        llm_pp_layers=pc.llm_pp_layers, vit_pp_layers=None, prefix="", vocab_rows=pc.padded_vocab(cfg["vocab_size"]),
    )  # fmt: skip
    _assert_same(_load_dir(mm), want)
    _assert_back_to_original(hf, mm, tmp_path / "back", pc)  # the padding is stripped on the way back


def test_padded_vocabulary_resplit(tiny_llms: dict[str, Path], tmp_path: Path) -> None:
    hf = tiny_llms["qwen3_vocab99"]
    a = _hf_to_mm(hf, tmp_path / "a", _padded("pad128_tp2"))
    direct = _hf_to_mm(hf, tmp_path / "direct", _padded("pad8_tp2pp2"))
    _same_tree(direct, _resplit(hf, a, tmp_path / "b", _padded("pad128_tp2"), _padded("pad8_tp2pp2")))


def test_wrong_source_padding_is_named(tiny_llms: dict[str, Path], tmp_path: Path) -> None:
    hf = tiny_llms["qwen3_vocab99"]
    mm = _hf_to_mm(hf, tmp_path / "mm", _padded("pad128_tp2"))
    wrong = ParallelConfig(tp_size=2, llm_pp_layers=[[4]], make_vocab_size_divisible_by=8)
    cfg = MmToHfConfig(save_hf_dir=tmp_path / "back", mm_dir=mm, hf_config=HfConfig(hf_dir=hf), parallel_config=wrong)
    with pytest.raises(ConvertError, match=r"embedding.word_embeddings.weight has shape \[128, 64\] on disk, the layout expects \[56, 64\]"):  # fmt: skip
        prepare(_job(hf, "mm_to_hf", cfg))
    with pytest.raises(ConvertError, match=r"or pad it with parallel_config\.make_vocab_size_divisible_by"):
        validate_layout(ParallelConfig(tp_size=2, llm_pp_layers=[[4]]), inspect_hf(hf))


@pytest.mark.oracle
def test_padded_vocabulary_logits(tiny_llms: dict[str, Path], tmp_path: Path) -> None:
    """megatron-core with the padded vocabulary: the real columns equal transformers' logits."""
    pytest.importorskip("megatron.core")
    from mmtui.megatron_logits import megatron_logits

    hf = tiny_llms["qwen3_vocab99"]
    mm = _hf_to_mm(hf, tmp_path / "mm", _padded("pad128_tp2"))
    tokens = [t % 99 for t in TOKENS]
    got = megatron_logits(_rank_models(mm, 2), _arch(hf, vocab_size=256), tokens)
    model, _ = tiny_llm_model(hf)
    with torch.no_grad():
        want = model(input_ids=torch.tensor([tokens])).logits[0]
    assert got.shape == (len(tokens), 256)
    torch.testing.assert_close(got[:, :99], want, rtol=0, atol=1e-5)
