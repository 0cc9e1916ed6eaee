"""The layout read from the disk: with no layout fields, mm_to_hf and resplit do what they do with them.

Each checkpoint is written with an explicit layout; the layout read back must be that
layout (written here, not computed), and the conversions without layout fields must give
the same files as with them.
"""

from __future__ import annotations

import filecmp
import json
import shutil
from pathlib import Path

import pytest

from engine.errors import ConvertError
from engine.formats.mm_source import open_checkpoint
from engine.job import HfConfig, LoraConfig, LoraMmToHfConfig, MmToHfConfig, ResplitConfig
from engine.layout import ParallelConfig
from engine.source.disk_layout import infer_layout
from engine.source.hf_source import inspect_hf
from tests.engine.test_llm_families import _convert, _hf_to_mm
from tests.engine.test_way_back import _same_tree

CASES = {
    # fixture, written layout
    "vlm_vpp": ("qwen2_vl", dict(tp_size=2, llm_pp_layers=[[1, 1], [1, 1]], vit_pp_layers=[[3, 0], [0, 0]])),
    "vlm_hetero_pp": ("qwen2_vl", dict(tp_size=1, llm_pp_layers=[[0, 1, 3]], vit_pp_layers=[[2, 1, 0]])),
    "tied_pp2": ("qwen2_vl_tied", dict(tp_size=2, llm_pp_layers=[[1, 3]], vit_pp_layers=[[3, 0]])),
    "llama_tp2_pp2": ("llama", dict(tp_size=2, llm_pp_layers=[[2, 2]])),
    "mixtral_ep2": ("mixtral", dict(tp_size=1, ep_size=2, llm_pp_layers=[[4]])),
    "mixtral_ep2_pp2": ("mixtral", dict(tp_size=2, ep_size=2, llm_pp_layers=[[1, 3]])),
    "qwen3_moe_ep2_vpp": ("qwen3_moe", dict(tp_size=1, ep_size=2, llm_pp_layers=[[1, 1], [1, 1]])),
    "padded_vocab": ("qwen3_vocab99", dict(tp_size=2, llm_pp_layers=[[2, 2]], make_vocab_size_divisible_by=8)),
    "noop_inside": ("llama", dict(tp_size=1, llm_pp_layers=[[3, 2]], noop_layers=[1])),
    "noop_first": ("llama", dict(tp_size=2, llm_pp_layers=[[2, 3]], noop_layers=[0])),
}


@pytest.fixture(scope="module")
def written(tiny_dirs, tiny_llms, tmp_path_factory) -> dict[str, tuple[Path, Path, ParallelConfig]]:
    root = tmp_path_factory.mktemp("disk_layout")
    out = {}
    for name, (fixture, layout) in CASES.items():
        hf = {**tiny_dirs, **tiny_llms}[fixture]
        pc = ParallelConfig(**layout)
        out[name] = (hf, _hf_to_mm(hf, root / name, pc), pc)
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_the_layout_on_disk_is_the_layout_written(written, case: str) -> None:
    hf, mm, pc = written[case]
    got = infer_layout(inspect_hf(hf), open_checkpoint(mm))
    assert got.model_dump(exclude_none=True) == pc.model_dump(exclude_none=True)


@pytest.mark.parametrize("case", list(CASES))
def test_mm_to_hf_and_resplit_need_no_layout(written, tmp_path: Path, case: str) -> None:
    hf, mm, pc = written[case]
    given = _convert(hf, "mm_to_hf", MmToHfConfig(save_hf_dir=tmp_path / "a", mm_dir=mm, hf_config=HfConfig(hf_dir=hf),
                                                   parallel_config=pc))  # fmt: skip
    read = _convert(hf, "mm_to_hf", MmToHfConfig(save_hf_dir=tmp_path / "b", mm_dir=mm, hf_config=HfConfig(hf_dir=hf)))
    _same_tree(given, read)
    whole = {f"{k}_pp_layers": [[sum(map(sum, v)) - (len(pc.noop_layers or []) if k == "llm" else 0)]]
             for k, v in pc.given().items()}  # fmt: skip
    one = ParallelConfig(**whole, ep_size=pc.ep_size)
    kw = dict(source_dir=mm, hf_config=HfConfig(hf_dir=hf), target_parallel_config=one)
    a = _convert(hf, "resplit", ResplitConfig(target_dir=tmp_path / "c", source_parallel_config=pc, **kw))
    b = _convert(hf, "resplit", ResplitConfig(target_dir=tmp_path / "d", **kw))
    assert filecmp.dircmp(a, b).diff_files == []
    _same_tree(a, b)


def test_a_noop_at_the_end_of_a_stage_leaves_no_trace_and_needs_none(tiny_llms, tmp_path: Path) -> None:
    """[[3,2]] with noop_layers [2] is on disk what [[2,2]] is: the same keys, the same tensors."""
    hf = tiny_llms["llama"]
    pc = ParallelConfig(llm_pp_layers=[[3, 2]], noop_layers=[2])
    mm = _hf_to_mm(hf, tmp_path / "mm", pc)
    assert infer_layout(inspect_hf(hf), open_checkpoint(mm)) == ParallelConfig(llm_pp_layers=[[2, 2]])
    given = _convert(hf, "mm_to_hf", MmToHfConfig(save_hf_dir=tmp_path / "a", mm_dir=mm, hf_config=HfConfig(hf_dir=hf),
                                                   parallel_config=pc))  # fmt: skip
    _same_tree(given, _convert(hf, "mm_to_hf", MmToHfConfig(save_hf_dir=tmp_path / "b", mm_dir=mm,
                                                            hf_config=HfConfig(hf_dir=hf))))  # fmt: skip


def test_layers_the_disk_lacks_are_one_line(tiny_llms, tmp_path: Path) -> None:
    hf = tiny_llms["llama"]
    mm = _hf_to_mm(hf, tmp_path / "mm", ParallelConfig(llm_pp_layers=[[2, 2]]))
    five = tmp_path / "five"
    shutil.copytree(hf, five)
    cfg = json.loads((five / "config.json").read_text())
    (five / "config.json").write_text(json.dumps(cfg | {"num_hidden_layers": 5}))
    with pytest.raises(ConvertError) as e:
        infer_layout(inspect_hf(five), open_checkpoint(mm))
    assert str(e.value) == (
        f"mm_dir {mm}: its rank files hold 4 language model layers (per stage [[2, 2]]) but num_hidden_layers = 5 "
        f"in {five}/config.json; is hf_config.hf_dir the model this checkpoint holds? (or give "
        "parallel_config.llm_pp_layers)"
    )


def test_a_given_layout_is_still_checked_against_the_disk(written, tmp_path: Path) -> None:
    hf, mm, _ = written["llama_tp2_pp2"]
    wrong = ParallelConfig(tp_size=2, llm_pp_layers=[[1, 3]])
    with pytest.raises(ConvertError, match=r"is on disk but not in the layout|is missing"):
        _convert(hf, "mm_to_hf", MmToHfConfig(save_hf_dir=tmp_path / "x", mm_dir=mm, hf_config=HfConfig(hf_dir=hf),
                                              parallel_config=wrong))  # fmt: skip


def test_a_megatron_lora_adapter_needs_no_layout(tiny_llms, tmp_path: Path) -> None:
    from engine.job import LoraHfToMmConfig
    from tests.fixtures.tiny_lora import build_peft_adapter

    hf = tiny_llms["llama"]
    peft = tmp_path / "peft"
    build_peft_adapter(hf, peft)
    pc = ParallelConfig(tp_size=2, llm_pp_layers=[[1, 3]])
    mm = _convert(hf, "lora_hf_to_mm", LoraHfToMmConfig(mm_dir=tmp_path / "mm", hf_config=HfConfig(hf_dir=hf),
                                                        lora=LoraConfig(adapter_dir=peft), parallel_config=pc))  # fmt: skip
    back = _convert(hf, "lora_mm_to_hf", LoraMmToHfConfig(save_hf_dir=tmp_path / "back", hf_config=HfConfig(hf_dir=hf),
                                                          lora=LoraConfig(adapter_dir=mm)))  # fmt: skip
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (back / name).read_bytes() == (peft / name).read_bytes()
