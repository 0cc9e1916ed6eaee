"""`mmtui verify`: identical across formats and layouts; a changed element, a dtype change and bad input are caught."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.layout import ParallelConfig
from engine.run import execute
from engine.run.verify import compare, identical, open_side
from engine.source.hf_source import inspect_hf
from tests.test_cli import BIN, _bad, hf_to_mm, mm_convert

TP2 = ["--b-tp", "2", "--b-llm-pp-layers", "[[1,3]]", "--b-vit-pp-layers", "[[3,0]]"]


def verify(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "mmtui"), "verify", *args], capture_output=True, text=True, timeout=120)


def test_hf_equals_its_megatron_layouts(qwen2vl_dir: Path, tmp_path: Path) -> None:
    assert hf_to_mm(qwen2vl_dir, tmp_path / "mm", tp=2).returncode == 0
    r = verify(str(qwen2vl_dir), str(tmp_path / "mm"), *TP2)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "identical" in r.stdout
    # Megatron against Megatron in another layout, config from --hf-dir
    layout = ["--cfg.parallel_config.llm_pp_layers", "[4]", "--cfg.parallel_config.vit_pp_layers", "[3]"]
    assert hf_to_mm(qwen2vl_dir, tmp_path / "mm1", layout=layout).returncode == 0
    a = ["--a-llm-pp-layers", "[4]", "--a-vit-pp-layers", "[3]"]
    r = verify(str(tmp_path / "mm1"), str(tmp_path / "mm"), "--hf-dir", str(qwen2vl_dir), *a, *TP2)
    assert r.returncode == 0, r.stdout + r.stderr


KEY = "model.layers.2.mlp.down_proj.weight"


def _edited_copy(hf: Path, out: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> Path:
    """A copy of hf whose model.safetensors state went through `edit`."""
    out.mkdir()
    for p in hf.iterdir():
        (out / p.name).write_bytes(p.read_bytes())
    state = load_file(out / "model.safetensors")
    edit(state)
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    return out


def _changed_copy(hf: Path, out: Path) -> Path:
    """hf with one element of KEY changed by 1.0 and a norm stored as float64 (same values)."""

    def edit(state: dict[str, torch.Tensor]) -> None:
        state[KEY][3, 5] += 1.0
        state["visual.blocks.0.norm1.weight"] = state["visual.blocks.0.norm1.weight"].double()

    return _edited_copy(hf, out, edit)


def test_a_changed_element_is_found(qwen2vl_dir: Path, tmp_path: Path) -> None:
    changed, key = _changed_copy(qwen2vl_dir, tmp_path / "hf"), KEY
    info = inspect_hf(qwen2vl_dir)
    rows = list(compare(open_side(qwen2vl_dir, info, None, "A"), open_side(changed, info, None, "B")))
    bad = {r.name: r for r in rows if r.status != "equal"}
    assert set(bad) == {key, "visual.blocks.0.norm1.weight"}
    assert bad[key].status == "differs" and bad[key].max_abs_diff is not None and bad[key].max_abs_diff > 0.9
    assert bad["visual.blocks.0.norm1.weight"].max_abs_diff == 0.0  # same values, another dtype
    assert not identical(rows)
    r = verify(str(qwen2vl_dir), str(changed), "--atol", "2")
    assert r.returncode == 0, r.stdout  # within tolerance
    r = verify(str(qwen2vl_dir), str(changed))
    assert r.returncode == 1 and "down_proj" in r.stdout and "different" in r.stdout


def test_megatron_side_reads_its_layout_from_the_disk(qwen2vl_dir: Path, tiny_llms: dict[str, Path], tmp_path: Path):
    """No layout flags: the same report as with them, for TP2/PP2, VPP, a hetero split and EP."""
    cases = {
        "tp2pp2": (qwen2vl_dir, ["--cfg.parallel_config.tp_size", "2"], ["[[1,3]]", "[[3,0]]"], []),
        "vpp": (qwen2vl_dir, [], ["[[1,1],[1,1]]", "[[3,0],[0,0]]"], []),
        "hetero": (qwen2vl_dir, [], ["[[0,1,3]]", "[[2,1,0]]"], []),
    }
    for name, (hf, extra, (llm, vit), _) in cases.items():
        layout = ["--cfg.parallel_config.llm_pp_layers", llm, "--cfg.parallel_config.vit_pp_layers", vit]
        assert hf_to_mm(hf, tmp_path / name, *extra, layout=layout).returncode == 0
        read = verify(str(hf), str(tmp_path / name), "--all")
        tp = extra[1] if extra else "1"
        given = verify(str(hf), str(tmp_path / name), "--all", "--b-tp", tp, "--b-llm-pp-layers", llm,
                       "--b-vit-pp-layers", vit)  # fmt: skip
        assert read.returncode == given.returncode == 0, read.stderr + given.stderr
        assert read.stdout == given.stdout
    mix = tiny_llms["mixtral"]
    r = mm_convert("MixtralConverter", "hf_to_mm", "--cfg.mm_dir", str(tmp_path / "ep"), "--cfg.hf_config.hf_dir",
                   str(mix), "--cfg.parallel_config.llm_pp_layers", "[[1,3]]", "--cfg.parallel_config.ep_size", "2")  # fmt: skip
    assert r.returncode == 0, r.stderr
    read = verify(str(mix), str(tmp_path / "ep"), "--all")
    given = verify(str(mix), str(tmp_path / "ep"), "--all", "--b-ep", "2", "--b-llm-pp-layers", "[[1,3]]")
    assert read.returncode == given.returncode == 0 and read.stdout == given.stdout
    # a layout that is given is still checked against the disk
    _bad(verify(str(qwen2vl_dir), str(tmp_path / "tp2pp2"), "--b-llm-pp-layers", "[[4]]", "--b-vit-pp-layers", "[[3]]"),
         "rank directories on disk")  # fmt: skip


def test_engine_compare_ignores_layout(qwen2vl_dir: Path, tmp_path: Path) -> None:
    assert hf_to_mm(qwen2vl_dir, tmp_path / "mm", tp=2).returncode == 0
    info = inspect_hf(qwen2vl_dir)
    side = open_side(
        tmp_path / "mm", info, ParallelConfig(tp_size=2, llm_pp_layers=[[1, 3]], vit_pp_layers=[[3, 0]]), "B"
    )
    rows = list(compare(open_side(qwen2vl_dir, info, None, "A"), side))
    assert len(rows) == len(info.tensors) and identical(rows)


def test_one_row_bands_compare_the_same(qwen2vl_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tensors are compared band by band: one-row bands give the same rows as the default."""
    changed = _changed_copy(qwen2vl_dir, tmp_path / "hf")
    assert hf_to_mm(qwen2vl_dir, tmp_path / "mm", tp=2).returncode == 0
    info = inspect_hf(qwen2vl_dir)
    tp2 = ParallelConfig(tp_size=2, llm_pp_layers=[[1, 3]], vit_pp_layers=[[3, 0]])

    def both() -> tuple[list, list]:
        a = open_side(qwen2vl_dir, info, None, "A")
        return list(compare(a, open_side(changed, info, None, "B"))), list(
            compare(a, open_side(tmp_path / "mm", info, tp2, "B"))
        )

    default = both()
    monkeypatch.setattr(execute, "BAND", 1)
    assert both() == default
    assert identical(default[1]) and {r.name for r in default[0] if r.status != "equal"} == {
        KEY,
        "visual.blocks.0.norm1.weight",
    }


def test_nans_in_the_same_places_are_not_a_difference(qwen2vl_dir: Path, tmp_path: Path) -> None:
    """The max |diff| skips NaNs both sides have; a NaN on one side only differs, whatever the atol."""

    def nan_at_0_0(state: dict[str, torch.Tensor]) -> None:
        state[KEY][0, 0] = float("nan")

    def nan_and_more(state: dict[str, torch.Tensor]) -> None:
        nan_at_0_0(state)
        state[KEY][3, 5] += 0.5

    info = inspect_hf(qwen2vl_dir)
    nan = _edited_copy(qwen2vl_dir, tmp_path / "nan", nan_at_0_0)
    more = _edited_copy(qwen2vl_dir, tmp_path / "nan_and_more", nan_and_more)

    def row(a: Path, b: Path, atol: float):
        rows = compare(open_side(a, info, None, "A"), open_side(b, info, None, "B"), atol=atol)
        return next(r for r in rows if r.name == KEY)

    both = row(nan, more, 1.0)
    assert both.status == "close" and both.max_abs_diff == pytest.approx(0.5, abs=0.01)
    assert row(nan, more, 0.1).status == "differs"
    assert row(qwen2vl_dir, nan, 1e9).status == "differs"


@pytest.mark.oracle
def test_logits_agree_across_formats_and_catch_a_change(qwen2vl_dir: Path, tmp_path: Path) -> None:
    """--logits: transformers on HF against megatron-core on TP2/PP2; a change within --atol still shows in them."""
    pytest.importorskip("megatron.core")
    assert hf_to_mm(qwen2vl_dir, tmp_path / "mm", tp=2).returncode == 0
    r = verify(str(qwen2vl_dir), str(tmp_path / "mm"), *TP2, "--logits")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "logits agree" in r.stdout and "16 tokens x 128 vocabulary" in r.stdout
    changed = tmp_path / "hf"
    shutil.copytree(qwen2vl_dir, changed)
    state = load_file(changed / "model.safetensors")
    state["model.layers.2.mlp.down_proj.weight"][3, 5] += 1.0
    save_file(state, changed / "model.safetensors", metadata={"format": "pt"})
    r = verify(str(changed), str(tmp_path / "mm"), *TP2, "--atol", "2", "--logits")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "identical" in r.stdout and "logits differ" in r.stdout


@pytest.mark.oracle
@pytest.mark.parametrize(
    ("variant", "layout", "flags"),
    [
        ("mixtral", ParallelConfig(ep_size=2, llm_pp_layers=[[2, 2]]), ["--b-ep", "2", "--b-llm-pp-layers", "[[2,2]]"]),
        (
            "qwen3_vocab99",
            ParallelConfig(tp_size=2, llm_pp_layers=[[1, 4]], make_vocab_size_divisible_by=8, noop_layers=[0]),
            ["--b-tp", "2", "--b-llm-pp-layers", "[[1,4]]", "--b-vocab-divisible-by", "8", "--b-noop-layers", "[0]"],
        ),
    ],
)
def test_logits_of_moe_and_padded_language_models(
    tiny_llms: dict[str, Path], tmp_path: Path, variant: str, layout: ParallelConfig, flags: list[str]
) -> None:
    pytest.importorskip("megatron.core")
    from tests.engine.test_llm_families import _hf_to_mm

    hf = tiny_llms[variant]
    mm = _hf_to_mm(hf, tmp_path / "mm", layout)
    r = verify(str(hf), str(mm), *flags, "--logits")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "logits agree" in r.stdout
