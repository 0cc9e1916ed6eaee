"""Megatron-Core GPT language models (Llama, Qwen2, Qwen3): layout, round trips, re-split, logits."""

from __future__ import annotations

import filecmp
import json
from pathlib import Path

import pytest
import torch

from engine.check import check_plan
from engine.errors import ConvertError
from engine.execute import run
from engine.hf_source import inspect_hf
from engine.job import HfConfig, HfToMmConfig, Job, MmToHfConfig, ResplitConfig, prepare
from engine.layout import ParallelConfig, layout_problems, validate_layout
from engine.plan import build_plan
from tests.engine.test_hf_to_mm import _assert_same, _load_dir
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
CONVERTER = {"llama": "LlamaConverter", "qwen2": "Qwen2Converter", "qwen3": "Qwen3Converter"}
VARIANTS = ["llama", "qwen2_tied", "qwen3"]


def _pc(name: str) -> ParallelConfig:
    tp, llm = LAYOUTS[name]
    return ParallelConfig(tp_size=tp, llm_pp_layers=llm)


def _cfg(hf: Path) -> dict:
    return json.loads((hf / "config.json").read_text())


def _job(hf: Path, command: str, cfg) -> Job:
    return Job(converter=CONVERTER[_cfg(hf)["model_type"]], command=command, cfg=cfg)


def _hf_to_mm(hf: Path, out: Path, layout: str) -> Path:
    cfg = HfToMmConfig(mm_dir=out, hf_config=HfConfig(hf_dir=hf), parallel_config=_pc(layout))
    _, plan = prepare(_job(hf, "hf_to_mm", cfg))
    assert check_plan(plan) == []
    run(plan, out)
    return out


def _same_tree(a: Path, b: Path) -> None:
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for rel in files:
        assert filecmp.cmp(a / rel, b / rel, shallow=False), rel


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("variant", VARIANTS)
def test_layout_matches_reference(tiny_llms: dict[str, Path], tmp_path: Path, variant: str, layout: str) -> None:
    hf = tiny_llms[variant]
    tp, llm = LAYOUTS[layout]
    _hf_to_mm(hf, tmp_path / "out", layout)
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
    hf = tiny_llms[variant]
    mm = _hf_to_mm(hf, tmp_path / "mm", layout)
    cfg = MmToHfConfig(
        save_hf_dir=tmp_path / "back", mm_dir=mm, hf_config=HfConfig(hf_dir=hf), parallel_config=_pc(layout)
    )
    _, plan = prepare(_job(hf, "mm_to_hf", cfg))
    assert check_plan(plan) == []
    run(plan, tmp_path / "back")
    back = tmp_path / "back"
    assert sorted(p.name for p in back.iterdir()) == sorted(p.name for p in hf.iterdir())
    for p in hf.iterdir():  # the index is rewritten (same content); every other file byte for byte
        if p.name == "model.safetensors.index.json":
            assert json.loads((back / p.name).read_text()) == json.loads(p.read_text())
        else:
            assert filecmp.cmp(p, back / p.name, shallow=False), p.name


@pytest.mark.parametrize(("a", "b"), [("tp2pp2", "tp1"), ("tp1", "vpp"), ("vpp", "pp3_tp1")])
@pytest.mark.parametrize("variant", VARIANTS)
def test_resplit_equals_direct_conversion(
    tiny_llms: dict[str, Path], tmp_path: Path, variant: str, a: str, b: str
) -> None:
    hf = tiny_llms[variant]
    mm_a = _hf_to_mm(hf, tmp_path / "a", a)
    direct = _hf_to_mm(hf, tmp_path / "direct", b)
    cfg = ResplitConfig(
        source_dir=mm_a, target_dir=tmp_path / "b", hf_config=HfConfig(hf_dir=hf),
        source_parallel_config=_pc(a), target_parallel_config=_pc(b),
    )  # fmt: skip
    _, plan = prepare(_job(hf, "resplit", cfg))
    run(plan, tmp_path / "b")
    _same_tree(direct, tmp_path / "b")


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


# ---- the oracle: megatron-core's GPTModel on our files == transformers on the HF files ----

TOKENS = [3, 17, 99, 5, 42, 7, 64, 127, 0, 11, 23, 88]


@pytest.mark.oracle
@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("variant", VARIANTS)
def test_megatron_reproduces_transformers_logits(
    tiny_llms: dict[str, Path], tmp_path: Path, variant: str, tp: int
) -> None:
    pytest.importorskip("megatron.core")
    from tests.oracle.megatron_gpt import GPTArch, megatron_logits

    hf = tiny_llms[variant]
    out = _hf_to_mm(hf, tmp_path / "mm", "tp2" if tp == 2 else "tp1")
    ranks = [
        torch.load(out / "release" / f"mp_rank_{r:02d}" / "model_optim_rng.pt", weights_only=True)["model"]
        for r in range(tp)
    ]
    c = _cfg(hf)
    arch = GPTArch(
        num_layers=c["num_hidden_layers"], hidden_size=c["hidden_size"], num_attention_heads=c["num_attention_heads"],
        num_query_groups=c["num_key_value_heads"], ffn_hidden_size=c["intermediate_size"], vocab_size=c["vocab_size"],
        rotary_base=c["rope_theta"], norm_epsilon=c["rms_norm_eps"], add_qkv_bias=c["model_type"] == "qwen2",
        tied=c["tie_word_embeddings"], qk_layernorm=c["model_type"] == "qwen3", kv_channels=c.get("head_dim"),
    )  # fmt: skip
    got = megatron_logits(ranks, arch, TOKENS)
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
    _hf_to_mm(hf, tmp_path / "api", "tp2pp2")
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


def _convert(hf: Path, command: str, cfg) -> None:
    _, plan = prepare(_job(hf, command, cfg))
    assert check_plan(plan) == []
    run(plan, cfg.out_dir)


def _padded_mm(hf: Path, out: Path, layout: str) -> Path:
    _convert(hf, "hf_to_mm", HfToMmConfig(mm_dir=out, hf_config=HfConfig(hf_dir=hf), parallel_config=_padded(layout)))
    return out


@pytest.mark.parametrize("layout", list(PADDED))
def test_padded_vocabulary_layout_and_round_trip(tiny_llms: dict[str, Path], tmp_path: Path, layout: str) -> None:
    hf = tiny_llms["qwen3_vocab99"]
    pc = _padded(layout)
    mm = _padded_mm(hf, tmp_path / "mm", layout)
    cfg = _cfg(hf)
    want = expected_checkpoint(
        load_hf_state(hf), family="qwen3", num_heads=4, num_kv_heads=2, vit_num_heads=0, tied=True, tp=pc.tp_size,
        llm_pp_layers=pc.llm_pp_layers, vit_pp_layers=None, prefix="", vocab_rows=pc.padded_vocab(cfg["vocab_size"]),
    )  # fmt: skip
    _assert_same(_load_dir(mm), want)
    back = tmp_path / "back"
    _convert(
        hf, "mm_to_hf", MmToHfConfig(save_hf_dir=back, mm_dir=mm, hf_config=HfConfig(hf_dir=hf), parallel_config=pc)
    )
    for p in hf.iterdir():
        assert filecmp.cmp(p, back / p.name, shallow=False), p.name  # the padding is stripped on the way back


def test_padded_vocabulary_resplit(tiny_llms: dict[str, Path], tmp_path: Path) -> None:
    hf = tiny_llms["qwen3_vocab99"]
    a = _padded_mm(hf, tmp_path / "a", "pad128_tp2")
    direct = _padded_mm(hf, tmp_path / "direct", "pad8_tp2pp2")
    cfg = ResplitConfig(
        source_dir=a, target_dir=tmp_path / "b", hf_config=HfConfig(hf_dir=hf),
        source_parallel_config=_padded("pad128_tp2"), target_parallel_config=_padded("pad8_tp2pp2"),
    )  # fmt: skip
    _convert(hf, "resplit", cfg)
    _same_tree(direct, tmp_path / "b")


def test_wrong_source_padding_is_named(tiny_llms: dict[str, Path], tmp_path: Path) -> None:
    hf = tiny_llms["qwen3_vocab99"]
    mm = _padded_mm(hf, tmp_path / "mm", "pad128_tp2")
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
    from tests.oracle.megatron_gpt import GPTArch, megatron_logits

    hf = tiny_llms["qwen3_vocab99"]
    mm = _padded_mm(hf, tmp_path / "mm", "pad128_tp2")
    ranks = [
        torch.load(mm / "release" / f"mp_rank_{r:02d}" / "model_optim_rng.pt", weights_only=True)["model"]
        for r in range(2)
    ]
    c = _cfg(hf)
    arch = GPTArch(
        num_layers=4, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128, vocab_size=256,
        rotary_base=c["rope_theta"], norm_epsilon=c["rms_norm_eps"], add_qkv_bias=False, tied=True,
        qk_layernorm=True, kv_channels=32,
    )  # fmt: skip
    tokens = [t % 99 for t in TOKENS]
    got = megatron_logits(ranks, arch, tokens)
    model, _ = tiny_llm_model(hf)
    with torch.no_grad():
        want = model(input_ids=torch.tensor([tokens])).logits[0]
    assert got.shape == (len(tokens), 256)
    torch.testing.assert_close(got[:, :99], want, rtol=0, atol=1e-5)
