"""HF -> MindSpeed-MM: every rank file equals an independent expectation (tests/fixtures/reference_layout.py)."""

from __future__ import annotations

import json
import re
import stat
from pathlib import Path

import pytest
import torch

from engine.errors import ConvertError
from engine.events import FileDone, FileStarted, Finished, Progress, Started
from engine.job import HfConfig, HfToMmConfig, Job, prepare
from engine.layout import ParallelConfig
from engine.planning.build import build_plan
from engine.planning.check import check_plan
from engine.run.execute import execute, run
from engine.source.hf_source import inspect_hf
from tests.fixtures.reference_layout import expected_checkpoint
from tests.fixtures.tiny_vlm import load_hf_state

LAYOUTS = {
    "tp1": (1, [[4]], [[3]]),
    "tp2": (2, [[4]], [[3]]),
    "pp2": (1, [[1, 3]], [[3, 0]]),
    "tp2pp2": (2, [[1, 3]], [[3, 0]]),
    "vpp": (2, [[1, 1], [1, 1]], [[3, 0], [0, 0]]),
    "vpp_tp1": (1, [[1, 1], [1, 1]], [[3, 0], [0, 0]]),
    "llm_from_stage1": (2, [[0, 1, 3]], [[2, 1, 0]]),
}


def _load_dir(out: Path) -> dict[str, dict]:
    ranks = sorted((out / "release").iterdir())
    return {d.name: torch.load(d / "model_optim_rng.pt", weights_only=True) for d in ranks}


def _expected(hf_dir: Path, tp: int, llm, vit, **kw) -> dict[str, dict]:
    cfg = json.loads((hf_dir / "config.json").read_text())
    text = cfg.get("text_config", cfg)
    return expected_checkpoint(
        load_hf_state(hf_dir),
        family=cfg["model_type"],
        num_heads=text.get("num_attention_heads", cfg.get("num_attention_heads")),
        num_kv_heads=text.get("num_key_value_heads", cfg.get("num_key_value_heads")),
        vit_num_heads=cfg["vision_config"]["num_heads"],
        tied=bool(cfg.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
        tp=tp,
        llm_pp_layers=llm,
        vit_pp_layers=vit,
        **kw,
    )


def _assert_same(got: dict[str, dict], want: dict[str, dict]) -> None:
    assert sorted(got) == sorted(want)
    for rank, want_obj in want.items():
        got_obj = got[rank]
        assert sorted(got_obj) == sorted(want_obj), rank
        assert got_obj["checkpoint_version"] == 3.0
        for chunk in (k for k in want_obj if k.startswith("model")):
            assert sorted(got_obj[chunk]) == sorted(want_obj[chunk]), (rank, chunk)
            for key, t in want_obj[chunk].items():
                g = got_obj[chunk][key]
                assert g.dtype == t.dtype and torch.equal(g, t), (rank, chunk, key)
                assert g.untyped_storage().nbytes() == g.numel() * g.element_size(), "tensor shares a storage"


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("variant", ["qwen2_vl", "qwen2_vl_tied", "qwen2_5_vl", "qwen2_vl_sharded_new"])
def test_layout_matches_reference(tiny_dirs: dict[str, Path], tmp_path: Path, variant: str, layout: str) -> None:
    tp, llm, vit = LAYOUTS[layout]
    hf = tiny_dirs[variant]
    plan = build_plan(inspect_hf(hf), ParallelConfig(tp_size=tp, llm_pp_layers=llm, vit_pp_layers=vit))
    assert check_plan(plan) == []
    run(plan, tmp_path / "out")
    _assert_same(_load_dir(tmp_path / "out"), _expected(hf, tp, llm, vit))
    assert (tmp_path / "out" / "latest_checkpointed_iteration.txt").read_text() == "release"


def test_tied_output_layer_only_with_pp(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    hf = tiny_dirs["qwen2_vl_tied"]
    run(build_plan(inspect_hf(hf), ParallelConfig(llm_pp_layers=[[4]], vit_pp_layers=[[3]])), tmp_path / "a")
    (only,) = _load_dir(tmp_path / "a").values()
    assert not any("output_layer" in k for k in only["model"])
    run(build_plan(inspect_hf(hf), ParallelConfig(llm_pp_layers=[[1, 3]], vit_pp_layers=[[3, 0]])), tmp_path / "b")
    got = _load_dir(tmp_path / "b")
    assert "text_decoder.output_layer.weight" not in got["mp_rank_00_000"]["model"]
    last = got["mp_rank_00_001"]["model"]
    assert torch.equal(last["text_decoder.output_layer.weight"], load_hf_state(hf)["model.embed_tokens.weight"])


def test_save_vit_only(qwen2vl_dir: Path, tmp_path: Path) -> None:
    layout = ParallelConfig(tp_size=2, llm_pp_layers=[[1, 3]], vit_pp_layers=[[3, 0]])
    plan = build_plan(inspect_hf(qwen2vl_dir), layout, save_vit_only=True)
    assert check_plan(plan) == []
    assert all(k.startswith("model.") or k.startswith("lm_head") for k in plan.dropped)
    run(plan, tmp_path / "out")
    got = _load_dir(tmp_path / "out")
    _assert_same(got, _expected(qwen2vl_dir, 2, [[1, 3]], [[3, 0]], save_vit_only=True))
    assert all(k.startswith("image_encoder.") for obj in got.values() for k in obj["model"])


def test_llm_weights_from_second_dir(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    vl, other = tiny_dirs["qwen2_vl"], tiny_dirs["qwen2_vl_sharded_new"]  # same shapes, other weights
    job = Job(
        converter="Qwen2VLConverter",
        command="hf_to_mm",
        cfg=HfToMmConfig(
            mm_dir=tmp_path / "out",
            hf_config=HfConfig(hf_dir=vl),
            parallel_config=ParallelConfig(llm_pp_layers=[[4]], vit_pp_layers=[[3]]),
            common_model_config={"llm_hf_dir": other},
        ),
    )
    _, plan = prepare(job)
    run(plan, tmp_path / "out")
    (got,) = _load_dir(tmp_path / "out").values()
    vit_want = _expected(vl, 1, [[4]], [[3]])["mp_rank_00"]["model"]
    llm_want = _expected(other, 1, [[4]], [[3]])["mp_rank_00"]["model"]
    for key, t in got["model"].items():
        want = vit_want[key] if key.startswith("image_encoder.") else llm_want[key]
        assert torch.equal(t, want), key


def test_events_and_modes(qwen2vl_dir: Path, tmp_path: Path) -> None:
    plan = build_plan(
        inspect_hf(qwen2vl_dir), ParallelConfig(tp_size=2, llm_pp_layers=[[1, 3]], vit_pp_layers=[[3, 0]])
    )
    events = list(execute(plan, tmp_path / "out"))
    assert isinstance(events[0], Started) and events[0].total_bytes == plan.nbytes and events[0].files == 4
    progress = [e for e in events if isinstance(e, Progress)]
    assert progress[-1].done_bytes == plan.nbytes
    assert [e.done_bytes for e in progress] == sorted(e.done_bytes for e in progress)
    assert (
        len([e for e in events if isinstance(e, FileStarted)])
        == len([e for e in events if isinstance(e, FileDone)])
        == 4
    )
    assert isinstance(events[-1], Finished)
    out = tmp_path / "out"
    assert stat.S_IMODE(out.stat().st_mode) == 0o750
    for f in plan.files:
        assert stat.S_IMODE((out / f.path).stat().st_mode) == 0o640
        assert stat.S_IMODE((out / f.path).parent.stat().st_mode) == 0o750
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary sibling left


def test_cancel_leaves_nothing(qwen2vl_dir: Path, tmp_path: Path) -> None:
    plan = build_plan(
        inspect_hf(qwen2vl_dir), ParallelConfig(tp_size=2, llm_pp_layers=[[1, 3]], vit_pp_layers=[[3, 0]])
    )
    gen = execute(plan, tmp_path / "out")
    for e in gen:
        if isinstance(e, FileDone):
            break
    gen.close()
    assert list(tmp_path.iterdir()) == []


def test_a_failing_worker_stops_the_others_and_leaves_nothing(qwen2vl_dir: Path, tmp_path: Path) -> None:
    """Files are written by several workers at once: a source cut short under one of them is one clear
    error, the other workers stop, and no temporary directory is left."""
    import shutil

    hf = tmp_path / "hf"
    shutil.copytree(qwen2vl_dir, hf)
    plan = build_plan(inspect_hf(hf), ParallelConfig(tp_size=2, llm_pp_layers=[[1, 3]], vit_pp_layers=[[3, 0]]))
    with open(hf / "model.safetensors", "r+b") as f:  # the weights shrink after planning
        f.truncate(f.seek(0, 2) - 4096)
    out = tmp_path / "out"
    with pytest.raises(ConvertError, match="unexpected end of file"):
        for _ in execute(plan, out):
            pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_one_worker_and_many_write_the_same_files(qwen2vl_dir: Path, tmp_path: Path) -> None:
    from engine.run.execute import write_files

    plan = build_plan(
        inspect_hf(qwen2vl_dir), ParallelConfig(tp_size=2, llm_pp_layers=[[1, 3]], vit_pp_layers=[[3, 0]])
    )
    for n in (1, 3):
        (tmp_path / str(n)).mkdir()
        events = list(write_files(plan, tmp_path / str(n), workers=n))
        assert [e.done_bytes for e in events if isinstance(e, Progress)][-1] == plan.nbytes
    for f in plan.files:
        assert (tmp_path / "1" / f.path).read_bytes() == (tmp_path / "3" / f.path).read_bytes()


def test_existing_target_refused_then_overwritten(qwen2vl_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    plan = build_plan(inspect_hf(qwen2vl_dir), ParallelConfig(llm_pp_layers=[[4]], vit_pp_layers=[[3]]))
    with pytest.raises(ConvertError, match=re.escape("exists and is not empty; choose a new directory or set overwrite (--cfg.overwrite true)")):
        run(plan, out)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    run(plan, out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["latest_checkpointed_iteration.txt", "release"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_plan_check_catches_a_missing_piece(qwen2vl_dir: Path) -> None:
    plan = build_plan(inspect_hf(qwen2vl_dir), ParallelConfig(tp_size=2, llm_pp_layers=[[4]], vit_pp_layers=[[3]]))
    entry = next(e for e in plan.files[1].entries if e.key.endswith("linear_qkv.weight"))
    entry.pieces = entry.pieces[:-1]
    problems = check_plan(plan)
    assert any("written nowhere" in p for p in problems)
    assert any("come from no source" in p for p in problems)
