"""hf_to_dcp: a torch.distributed.checkpoint directory written without a process group, streaming,
that torch's own loaders read on one process into exactly the TP1/PP1 state dict."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from engine.job import HfConfig, HfToDcpConfig, HfToMmConfig, Job, prepare
from engine.layout import ParallelConfig
from engine.planning.check import check_plan
from engine.run.execute import run
from engine.source.hf_source import inspect_hf
from tests.fixtures.tiny_vlm import build_tiny_vlm


def _converter(hf: Path) -> str:
    return inspect_hf(hf).preset.converter  # detection itself is tested elsewhere


def _dcp(hf: Path, out: Path) -> Path:
    _, plan = prepare(
        Job(
            converter=_converter(hf), command="hf_to_dcp", cfg=HfToDcpConfig(dcp_dir=out, hf_config=HfConfig(hf_dir=hf))
        )
    )
    assert check_plan(plan) == []
    run(plan, out)
    return out


def _whole(hf: Path, out: Path) -> dict:
    """The TP1/PP1 Megatron rank file's object: what DCP must hold."""
    cfg = json.loads((hf / "config.json").read_text())
    layers = {"llm_pp_layers": [[cfg.get("text_config", cfg)["num_hidden_layers"]]]}
    if "vision_config" in cfg:
        layers["vit_pp_layers"] = [[cfg["vision_config"]["depth"]]]
    mm = HfToMmConfig(mm_dir=out, hf_config=HfConfig(hf_dir=hf), parallel_config=ParallelConfig(**layers))
    run(prepare(Job(converter=_converter(hf), command="hf_to_mm", cfg=mm))[1], out)
    return torch.load(out / "release" / "mp_rank_00" / "model_optim_rng.pt", weights_only=True)


def _torch_save_of(dcp_dir: Path, tmp: Path) -> dict:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed is ... uninitialized, assuming ... a single process"
        dcp_to_torch_save(dcp_dir / "release", tmp / "whole.pt")
    return torch.load(tmp / "whole.pt", weights_only=True)


@pytest.mark.parametrize("variant", ["qwen2_vl", "qwen2_vl_tied", "qwen2_5_vl", "llama", "qwen3"])
def test_dcp_holds_the_whole_model(
    tiny_dirs: dict[str, Path], tiny_llms: dict[str, Path], tmp_path: Path, variant: str
) -> None:
    hf = {**tiny_dirs, **tiny_llms}[variant]
    out = _dcp(hf, tmp_path / "dcp")
    assert (out / "latest_checkpointed_iteration.txt").read_text() == "release"
    assert sorted(p.name for p in (out / "release").iterdir()) == [".metadata", "__0_0.distcp"]
    got = _torch_save_of(out, tmp_path)
    want = _whole(hf, tmp_path / "mm")
    assert got["checkpoint_version"] == 3.0 and sorted(got) == ["checkpoint_version", "model"]
    assert list(got["model"]) == list(want["model"])
    for k, t in want["model"].items():
        assert got["model"][k].dtype == t.dtype and torch.equal(got["model"][k], t), k


def test_dcp_load_into_a_state_dict_bf16(tmp_path: Path) -> None:
    """The usual way to read it: torch.distributed.checkpoint.load into preallocated tensors."""
    import torch.distributed.checkpoint as dcp

    hf = build_tiny_vlm(tmp_path / "hf", dtype=torch.bfloat16, shards=2)
    out = _dcp(hf, tmp_path / "dcp")
    want = _whole(hf, tmp_path / "mm")["model"]
    state = {"model": {k: torch.empty_like(t) for k, t in want.items()}, "checkpoint_version": 0.0}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(state, checkpoint_id=out / "release")
    assert state["checkpoint_version"] == 3.0
    assert all(state["model"][k].dtype == torch.bfloat16 and torch.equal(state["model"][k], t) for k, t in want.items())


def test_dcp_command_line_and_existing_target(qwen2vl_dir: Path, tmp_path: Path) -> None:
    from tests.test_cli import mm_convert

    args = [
        "Qwen2VLConverter",
        "hf_to_dcp",
        "--cfg.dcp_dir",
        str(tmp_path / "out"),
        "--cfg.hf_config.hf_dir",
        str(qwen2vl_dir),
    ]
    r = mm_convert(*args)
    assert r.returncode == 0, r.stderr
    before = (tmp_path / "out" / "release" / "__0_0.distcp").read_bytes()
    r = mm_convert(*args)
    assert r.returncode == 2 and "dcp_dir" in r.stderr and "exists and is not empty" in r.stderr
    assert (tmp_path / "out" / "release" / "__0_0.distcp").read_bytes() == before
