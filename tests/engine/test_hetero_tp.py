"""Heterogeneous TP (MindSpeed-MM's split_by_tp): the vision encoder at its own TP size.

The rule, from MindSpeed-MM's checkpoint/vlm_model/hf_to_mm.py: a module is split at its
own TP size and its shards repeat over the largest TP group (rank r holds shard r mod the
module's size); every size divides the largest. The reference here composes two naive
uniform-TP references (tests/fixtures/reference_layout.py): the vision keys of rank r come
from the reference at vit_tp_size, rank r mod vit_tp_size; the language model's from the
reference at tp_size.
"""

from __future__ import annotations

import filecmp
import json
from pathlib import Path

import pytest
import torch

from engine.errors import ConvertError
from engine.formats.mm_source import open_checkpoint
from engine.job import HfConfig, HfToMmConfig, Job, MmToHfConfig, ResplitConfig, prepare
from engine.layout import ParallelConfig, validate_layout
from engine.planning.build import build_plan
from engine.planning.check import check_plan
from engine.run.execute import run
from engine.source.disk_layout import infer_layout
from engine.source.hf_source import inspect_hf
from tests.engine.test_hf_to_mm import _assert_same, _expected, _load_dir
from tests.test_cli import _bad, mm_convert

LAYOUTS = {
    # name: (tp_size, vit_tp_size, llm_pp_layers, vit_pp_layers)
    "tp2_vit1": (2, 1, [[4]], [[3]]),
    "tp1_vit2": (1, 2, [[4]], [[3]]),
    "tp2_vit4": (2, 4, [[4]], [[3]]),
    "tp2_vit1_pp2": (2, 1, [[1, 3]], [[3, 0]]),
    "tp1_vit2_vpp": (1, 2, [[1, 1], [1, 1]], [[3, 0], [0, 0]]),
}
CONVERTER = {"qwen2_vl": "Qwen2VLConverter", "qwen2_5_vl": "Qwen2_5_VLConverter"}


def _pc(name: str) -> ParallelConfig:
    tp, vit_tp, llm, vit = LAYOUTS[name]
    return ParallelConfig(tp_size=tp, vit_tp_size=vit_tp, llm_pp_layers=llm, vit_pp_layers=vit)


def _converter(hf: Path) -> str:
    return CONVERTER[json.loads((hf / "config.json").read_text())["model_type"]]


def _rank(tp_rank: int, pp_rank: int, pp: int) -> str:
    return f"mp_rank_{tp_rank:02d}" + (f"_{pp_rank:03d}" if pp > 1 else "")


def _reference(hf: Path, name: str) -> dict[str, dict]:
    """Rank r: vision keys of the uniform reference at vit_tp (rank r mod vit_tp), the rest at tp (r mod tp)."""
    tp, vit_tp, llm, vit = LAYOUTS[name]
    world, pp = max(tp, vit_tp), len(llm[0])
    at = {n: _expected(hf, n, llm, vit) for n in {tp, vit_tp}}
    out = {}
    for r in range(world):
        for s in range(pp):
            lm, ve = at[tp][_rank(r % tp, s, pp)], at[vit_tp][_rank(r % vit_tp, s, pp)]
            obj = {k: v for k, v in lm.items() if not k.startswith("model")}
            for chunk in (k for k in lm if k.startswith("model")):
                obj[chunk] = {k: v for k, v in lm[chunk].items() if not k.startswith("image_encoder.")}
                obj[chunk] |= {k: v for k, v in ve[chunk].items() if k.startswith("image_encoder.")}
            out[_rank(r, s, pp)] = obj
    return out


def _hf_to_mm(hf: Path, out: Path, layout: ParallelConfig) -> Path:
    cfg = HfToMmConfig(mm_dir=out, hf_config=HfConfig(hf_dir=hf), parallel_config=layout)
    _, plan = prepare(Job(converter=_converter(hf), command="hf_to_mm", cfg=cfg))
    assert check_plan(plan) == []
    run(plan, out)
    return out


@pytest.fixture(scope="module")
def converted(tiny_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Path]:
    """Each (variant, layout) converted once for every test of this file."""
    root = tmp_path_factory.mktemp("hetero")
    cases = [(v, n) for v in ("qwen2_vl", "qwen2_5_vl") for n in LAYOUTS]
    return {(v, n): _hf_to_mm(tiny_dirs[v], root / f"{v}-{n}", _pc(n)) for v, n in cases}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("variant", ["qwen2_vl", "qwen2_5_vl"])
def test_layout_matches_reference(tiny_dirs: dict[str, Path], converted: dict, variant: str, layout: str) -> None:
    _assert_same(_load_dir(converted[(variant, layout)]), _reference(tiny_dirs[variant], layout))


def test_repeats_are_copies_of_the_module_shards(tiny_dirs: dict[str, Path], converted: dict) -> None:
    """tp 2, vit 4: four rank directories; the language model's rank 2 equals its rank 0, rank 3 its rank 1."""
    got = _load_dir(converted[("qwen2_5_vl", "tp2_vit4")])
    assert sorted(got) == ["mp_rank_00", "mp_rank_01", "mp_rank_02", "mp_rank_03"]
    lm = [{k: v for k, v in got[f"mp_rank_0{r}"]["model"].items() if k.startswith("text_decoder.")} for r in range(4)]
    qkv = "text_decoder.decoder.layers.0.self_attention.linear_qkv.weight"
    assert not torch.equal(lm[0][qkv], lm[1][qkv])
    for r in (2, 3):
        assert lm[r].keys() == lm[r - 2].keys() and all(torch.equal(lm[r][k], lm[r - 2][k]) for k in lm[r])
    vit_qkv = "image_encoder.encoder.blocks.layers.0.self_attention.linear_qkv.weight"
    shards = [got[f"mp_rank_0{r}"]["model"][vit_qkv] for r in range(4)]
    assert all(s.shape[0] == shards[0].shape[0] for s in shards)
    assert len({tuple(s.flatten().tolist()) for s in shards}) == 4  # four different vision shards


def test_preview_says_which_ranks_repeat(tiny_dirs: dict[str, Path]) -> None:
    plan = build_plan(inspect_hf(tiny_dirs["qwen2_vl"]), _pc("tp2_vit1"))
    by_rank = {f.dir_name: {e.key: e.transform for e in f.entries} for f in plan.files}
    key = "image_encoder.encoder.blocks.layers.0.self_attention.linear_qkv.weight"
    assert by_rank["mp_rank_00"][key] == "qkv per head"
    assert by_rank["mp_rank_01"][key] == "qkv per head · repeats TP rank 0"
    assert by_rank["mp_rank_01"]["text_decoder.decoder.layers.0.self_attention.linear_qkv.weight"] == (
        "qkv grouped · rows 2/2"
    )


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("variant", ["qwen2_vl", "qwen2_5_vl"])
def test_the_disk_gives_the_layout_back(tiny_dirs: dict[str, Path], converted: dict, variant: str, layout: str) -> None:
    info = inspect_hf(tiny_dirs[variant])
    got = infer_layout(info, open_checkpoint(converted[(variant, layout)]))
    tp, vit_tp, llm, vit = LAYOUTS[layout]
    assert (got.tp_size, got.tp_of("vit"), got.tp_world) == (tp, vit_tp, max(tp, vit_tp))
    assert (got.llm_pp_layers, got.vit_pp_layers) == (llm, vit)


@pytest.mark.parametrize("given", [True, False])
@pytest.mark.parametrize("layout", ["tp2_vit1_pp2", "tp1_vit2_vpp", "tp2_vit4"])
def test_way_back_is_byte_identical(
    tiny_dirs: dict[str, Path], converted: dict, tmp_path: Path, layout: str, given: bool
) -> None:
    hf = tiny_dirs["qwen2_5_vl"]
    cfg = MmToHfConfig(
        save_hf_dir=tmp_path / "back", mm_dir=converted[("qwen2_5_vl", layout)], hf_config=HfConfig(hf_dir=hf),
        parallel_config=_pc(layout) if given else None,
    )  # fmt: skip
    _, plan = prepare(Job(converter="Qwen2_5_VLConverter", command="mm_to_hf", cfg=cfg))
    assert check_plan(plan) == []
    # one copy is read: every vision block comes from a rank below vit_tp_size, every LLM block below tp_size
    tp, vit_tp = LAYOUTS[layout][:2]
    for f in plan.files:
        for e in f.entries:
            limit = vit_tp if "visual." in e.key else tp
            assert all(int(p.source.split("/")[0][8:10]) < limit for p in e.pieces), e.key
    run(plan, tmp_path / "back")
    names = sorted(p.name for p in hf.iterdir())
    assert sorted(p.name for p in (tmp_path / "back").iterdir()) == names
    for name in names:
        assert filecmp.cmp(hf / name, tmp_path / "back" / name, shallow=False), name


@pytest.mark.parametrize(("a", "b"), [("tp2_vit1_pp2", "tp1_vit2_vpp"), ("tp2_vit4", "tp2_vit1")])
def test_resplit_equals_direct_conversion(
    tiny_dirs: dict[str, Path], converted: dict, tmp_path: Path, a: str, b: str
) -> None:
    hf = tiny_dirs["qwen2_vl"]
    cfg = ResplitConfig(
        source_dir=converted[("qwen2_vl", a)], target_dir=tmp_path / "b", hf_config=HfConfig(hf_dir=hf),
        target_parallel_config=_pc(b),
    )  # fmt: skip
    _, plan = prepare(Job(converter="Qwen2VLConverter", command="resplit", cfg=cfg))
    assert check_plan(plan) == []
    run(plan, tmp_path / "b")
    direct = converted[("qwen2_vl", b)]
    files = sorted(p.relative_to(direct) for p in direct.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    for rel in files:
        assert filecmp.cmp(direct / rel, tmp_path / "b" / rel, shallow=False), rel


def test_equal_sizes_are_the_uniform_layout(tiny_dirs: dict[str, Path]) -> None:
    info = inspect_hf(tiny_dirs["qwen2_vl"])
    a = build_plan(info, ParallelConfig(tp_size=2, vit_tp_size=2, llm_pp_layers=[[4]], vit_pp_layers=[[3]]))
    b = build_plan(info, ParallelConfig(tp_size=2, vit_tp_size=0, llm_pp_layers=[[4]], vit_pp_layers=[[3]]))
    assert [(f.path, [(e.key, e.shape, e.pieces) for e in f.entries]) for f in a.files] == [
        (f.path, [(e.key, e.shape, e.pieces) for e in f.entries]) for f in b.files
    ]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"tp_size": 2, "vit_tp_size": 3},
         "parallel_config.tp_size 2 does not divide the largest TP size 3 (tp_size 2, vit_tp_size 3); every "
         "module's TP size must divide the largest: use one of 1, 3"),
        ({"tp_size": 4, "vit_tp_size": 3}, "parallel_config.vit_tp_size 3 does not divide the largest TP size 4"),
        ({"tp_size": 1, "vit_tp_size": 8},
         "parallel_config.vit_tp_size 8 does not divide vision_config.num_heads = 4 (qwen2_vl/config.json); "
         "use a vit_tp_size among: 1, 2, 4"),
        ({"tp_size": 1, "audio_tp_size": 2},
         "parallel_config.audio_tp_size 2: Qwen2-VL has no audio encoder; leave it unset"),
    ],
)  # fmt: skip
def test_bad_sizes_are_named(tiny_dirs: dict[str, Path], fields: dict, message: str) -> None:
    layout = ParallelConfig(llm_pp_layers=[[4]], vit_pp_layers=[[3]], **fields)
    with pytest.raises(ConvertError) as e:
        validate_layout(layout, inspect_hf(tiny_dirs["qwen2_vl"]))
    assert str(e.value).startswith(message), str(e.value)


def test_vit_tp_on_a_language_model_is_refused(tiny_llms: dict[str, Path]) -> None:
    with pytest.raises(ConvertError, match=r"^parallel_config.vit_tp_size 2: .* has no vision encoder; leave it unset"):
        validate_layout(ParallelConfig(llm_pp_layers=[[2]], vit_tp_size=2), inspect_hf(tiny_llms["llama"]))


def test_mm_convert_refuses_a_size_that_does_not_divide(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    r = mm_convert(
        "Qwen2VLConverter", "hf_to_mm", "--cfg.mm_dir", str(tmp_path / "out"),
        "--cfg.hf_config.hf_dir", str(tiny_dirs["qwen2_vl"]),
        "--cfg.parallel_config.llm_pp_layers", "[[4]]", "--cfg.parallel_config.vit_pp_layers", "[[3]]",
        "--cfg.parallel_config.tp_size", "2", "--cfg.parallel_config.vit_tp_size", "3",
    )  # fmt: skip
    _bad(r, "parallel_config.tp_size 2 does not divide the largest TP size 3")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("layout", ["tp2_vit1", "tp1_vit2"])
def test_vocabulary_padding_is_read_at_the_language_models_size(
    tiny_dirs: dict[str, Path], tmp_path: Path, layout: str
) -> None:
    """The embedding is padded for the language model's TP (not the largest); the disk says both back."""
    hf = tiny_dirs["qwen2_vl"]
    pc = _pc(layout).model_copy(update={"make_vocab_size_divisible_by": 3})
    mm = _hf_to_mm(hf, tmp_path / "mm", pc)
    rows = 3 * pc.tp_size * -(-128 // (3 * pc.tp_size))  # 129 at TP 1, 132 at TP 2
    emb = _load_dir(mm)["mp_rank_01"]["model"]["text_decoder.embedding.word_embeddings.weight"]
    assert emb.shape[0] == rows // pc.tp_size
    got = infer_layout(inspect_hf(hf), open_checkpoint(mm))
    assert (got.tp_size, got.tp_of("vit"), got.padded_vocab(128)) == (pc.tp_size, pc.tp_of("vit"), rows)
    cfg = MmToHfConfig(save_hf_dir=tmp_path / "back", mm_dir=mm, hf_config=HfConfig(hf_dir=hf))
    run(prepare(Job(converter="Qwen2VLConverter", command="mm_to_hf", cfg=cfg))[1], tmp_path / "back")
    for f in hf.iterdir():
        assert filecmp.cmp(f, tmp_path / "back" / f.name, shallow=False), f.name
