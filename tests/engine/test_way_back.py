"""mm_to_hf and resplit: bit-exact round trips, file for file, across layouts and fixtures."""

from __future__ import annotations

import filecmp
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine.errors import ConvertError
from engine.job import HfConfig, HfToMmConfig, Job, MmToHfConfig, ResplitConfig, prepare
from engine.layout import ParallelConfig
from engine.planning.check import check_plan
from engine.run.execute import run
from engine.source.hf_source import INDEX_NAME

LAYOUTS = {
    "tp1": (1, [[4]], [[3]]),
    "tp2": (2, [[4]], [[3]]),
    "tp2pp2": (2, [[1, 3]], [[3, 0]]),
    "vpp": (2, [[1, 1], [1, 1]], [[3, 0], [0, 0]]),
    "llm_from_stage1": (2, [[0, 1, 3]], [[2, 1, 0]]),
    "pp3_tp1": (1, [[0, 1, 3]], [[2, 1, 0]]),
}
CONVERTER = {"qwen2_vl": "Qwen2VLConverter", "qwen2_5_vl": "Qwen2_5_VLConverter"}


def _pc(name: str) -> ParallelConfig:
    tp, llm, vit = LAYOUTS[name]
    return ParallelConfig(tp_size=tp, llm_pp_layers=llm, vit_pp_layers=vit)


def _converter(hf: Path) -> str:
    return CONVERTER[json.loads((hf / "config.json").read_text())["model_type"]]


def _hf_to_mm(hf: Path, out: Path, layout: str) -> Path:
    job = Job(
        converter=_converter(hf),
        command="hf_to_mm",
        cfg=HfToMmConfig(mm_dir=out, hf_config=HfConfig(hf_dir=hf), parallel_config=_pc(layout)),
    )
    run(prepare(job)[1], out)
    return out


def _mm_to_hf(hf: Path, mm: Path, out: Path, layout: str, **kw) -> Path:
    cfg = MmToHfConfig(save_hf_dir=out, mm_dir=mm, hf_config=HfConfig(hf_dir=hf), parallel_config=_pc(layout), **kw)
    _, plan = prepare(Job(converter=_converter(hf), command="mm_to_hf", cfg=cfg))
    assert check_plan(plan) == []
    run(plan, out)
    return out


def _same_tree(a: Path, b: Path) -> None:
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert files_a == files_b
    for rel in files_a:
        assert filecmp.cmp(a / rel, b / rel, shallow=False), rel


@pytest.mark.parametrize("variant", ["qwen2_vl", "qwen2_vl_tied", "qwen2_5_vl", "qwen2_vl_sharded_new"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_hf_mm_hf_is_byte_identical(tiny_dirs: dict[str, Path], tmp_path: Path, variant: str, layout: str) -> None:
    hf = tiny_dirs[variant]
    mm = _hf_to_mm(hf, tmp_path / "mm", layout)
    back = _mm_to_hf(hf, mm, tmp_path / "back", layout)
    # same shard files, same index, same headers and bytes, every non-weight file copied
    originals = sorted(p.name for p in hf.iterdir())
    assert sorted(p.name for p in back.iterdir()) == originals
    for name in originals:
        assert filecmp.cmp(hf / name, back / name, shallow=False), name


def test_an_index_in_another_order_comes_back_as_it_was(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    """An index written by another tool (its own key order and spacing) is given back byte for byte."""
    hf = tmp_path / "hf"
    shutil.copytree(tiny_dirs["qwen2_vl_tied"], hf)
    index = json.loads((hf / INDEX_NAME).read_text())
    index["weight_map"] = dict(reversed(index["weight_map"].items()))
    (hf / INDEX_NAME).write_text(json.dumps(index, indent=4))
    back = _mm_to_hf(hf, _hf_to_mm(hf, tmp_path / "mm", "tp2pp2"), tmp_path / "back", "tp2pp2")
    assert (back / INDEX_NAME).read_bytes() == (hf / INDEX_NAME).read_bytes()


@pytest.mark.parametrize(
    ("a", "b"), [("tp2pp2", "tp1"), ("tp1", "vpp"), ("vpp", "llm_from_stage1"), ("tp2", "pp3_tp1")]
)
@pytest.mark.parametrize("variant", ["qwen2_vl", "qwen2_vl_tied", "qwen2_5_vl"])
def test_resplit_equals_direct_conversion(
    tiny_dirs: dict[str, Path], tmp_path: Path, variant: str, a: str, b: str
) -> None:
    hf = tiny_dirs[variant]
    mm_a = _hf_to_mm(hf, tmp_path / "a", a)
    direct = _hf_to_mm(hf, tmp_path / "direct", b)
    cfg = ResplitConfig(
        source_dir=mm_a,
        target_dir=tmp_path / "b",
        hf_config=HfConfig(hf_dir=hf),
        source_parallel_config=_pc(a),
        target_parallel_config=_pc(b),
    )
    _, plan = prepare(Job(converter=_converter(hf), command="resplit", cfg=cfg))
    assert check_plan(plan) == []
    run(plan, tmp_path / "b")
    _same_tree(direct, tmp_path / "b")


def test_reshard_by_size(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    hf = tiny_dirs["qwen2_vl_tied"]
    mm = _hf_to_mm(hf, tmp_path / "mm", "tp2pp2")
    original = {}
    for f in hf.glob("*.safetensors"):
        original |= load_file(f)
    one = _mm_to_hf(hf, mm, tmp_path / "one", "tp2pp2", max_shard_size="10GB")
    assert sorted(p.name for p in one.glob("*.safetensors")) == ["model.safetensors"]
    assert not (one / "model.safetensors.index.json").exists()
    got = load_file(one / "model.safetensors")
    assert list(got) == list(original) or sorted(got) == sorted(original)
    assert all(torch.equal(got[k], original[k]) and got[k].dtype == original[k].dtype for k in original)

    many = _mm_to_hf(hf, mm, tmp_path / "many", "tp2pp2", max_shard_size="20KB")
    index = json.loads((many / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in many.glob("*.safetensors"))
    assert len(shards) > 2 and sorted(set(index["weight_map"].values())) == shards
    got = {}
    for name in shards:
        part = load_file(many / name)
        assert sum(t.numel() * t.element_size() for t in part.values()) <= 20_000 or len(part) == 1
        got |= part
    assert sorted(got) == sorted(original)
    assert all(torch.equal(got[k], original[k]) for k in original)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in original.values())


# ---- the peer's tied output (issue 18.5) ------------------------------------------------------------

OUTPUT = "text_decoder.output_layer.weight"


def _without(mm: Path, key: str) -> list[str]:
    """Rewrite every rank file holding `key` without it, with torch.save (as another tool writes them)."""
    touched = []
    for path in sorted(mm.rglob("model_optim_rng.pt")):
        state = torch.load(path, weights_only=True)
        chunks = [c for c in state if c.startswith("model") and key in state[c]]
        for c in chunks:
            del state[c][key]
        if chunks:
            torch.save(state, path)
            touched.append(path.parent.name)
    return touched


def _hf_tensors(hf: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(hf.glob("*.safetensors")):
        out |= load_file(f)
    return out


@pytest.mark.parametrize(
    ("layout", "last_stage"),
    [("tp2pp2", ["mp_rank_00_001", "mp_rank_01_001"]), ("vpp", ["mp_rank_00_001", "mp_rank_01_001"]),
     ("pp3_tp1", ["mp_rank_00_002"])],
)  # fmt: skip
def test_a_tied_model_without_output_layer_on_the_last_stage_is_read(
    tiny_dirs: dict[str, Path], tmp_path: Path, layout: str, last_stage: list[str]
) -> None:
    """MindSpeed-MM writes a tied model with PP > 1 without the output layer; it is the embedding's data."""
    hf = tiny_dirs["qwen2_vl_tied"]
    mm = _hf_to_mm(hf, tmp_path / "mm", layout)
    assert _without(mm, OUTPUT) == last_stage  # our own hf_to_mm writes it there
    cfg = MmToHfConfig(
        save_hf_dir=tmp_path / "back", mm_dir=mm, hf_config=HfConfig(hf_dir=hf), parallel_config=_pc(layout)
    )
    _, plan = prepare(Job(converter=_converter(hf), command="mm_to_hf", cfg=cfg))
    said = [n for n in plan.notes if OUTPUT in n]
    assert said == [
        f"tied embeddings: {len(last_stage)} last-stage rank file(s) hold no {OUTPUT} ({last_stage[0]}"
        f"{', ...' if len(last_stage) > 1 else ''}, as MindSpeed-MM writes them); it is read from the embedding, "
        "the same data"
    ]
    assert check_plan(plan) == []
    run(plan, tmp_path / "back")
    original, back = _hf_tensors(hf), _hf_tensors(tmp_path / "back")
    assert sorted(back) == sorted(original)
    assert all(torch.equal(back[k], original[k]) and back[k].dtype == original[k].dtype for k in original)

    # the re-cut reads it the same way, and writes the output layer where Megatron expects it
    resplit = ResplitConfig(
        source_dir=mm, target_dir=tmp_path / "b", hf_config=HfConfig(hf_dir=hf),
        source_parallel_config=_pc(layout), target_parallel_config=_pc("tp2pp2"),
    )  # fmt: skip
    _, plan = prepare(Job(converter=_converter(hf), command="resplit", cfg=resplit))
    assert [n for n in plan.notes if OUTPUT in n] == said
    run(plan, tmp_path / "b")
    _same_tree(_hf_to_mm(hf, tmp_path / "direct", "tp2pp2"), tmp_path / "b")


def test_an_untied_model_without_output_layer_is_still_refused(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    hf = tiny_dirs["qwen2_vl"]
    mm = _hf_to_mm(hf, tmp_path / "mm", "tp2pp2")
    assert _without(mm, OUTPUT) == ["mp_rank_00_001", "mp_rank_01_001"]
    cfg = MmToHfConfig(
        save_hf_dir=tmp_path / "back", mm_dir=mm, hf_config=HfConfig(hf_dir=hf), parallel_config=_pc("tp2pp2")
    )
    with pytest.raises(
        ConvertError, match=rf"mp_rank_00_001/model_optim_rng.pt \[model\]: {OUTPUT} is missing; the layout"
    ):
        prepare(Job(converter=_converter(hf), command="mm_to_hf", cfg=cfg))


def test_a_tied_model_without_its_embedding_is_refused(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    """The output layer may be absent only because the embedding holds the same data."""
    hf = tiny_dirs["qwen2_vl_tied"]
    mm = _hf_to_mm(hf, tmp_path / "mm", "tp2pp2")
    _without(mm, OUTPUT)
    _without(mm, "text_decoder.embedding.word_embeddings.weight")
    cfg = MmToHfConfig(
        save_hf_dir=tmp_path / "back", mm_dir=mm, hf_config=HfConfig(hf_dir=hf), parallel_config=_pc("tp2pp2")
    )
    with pytest.raises(ConvertError, match=r"text_decoder.embedding.word_embeddings.weight is missing"):
        prepare(Job(converter=_converter(hf), command="mm_to_hf", cfg=cfg))
