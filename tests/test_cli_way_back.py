"""mm_to_hf / resplit from the command line and replay: trained checkpoints, unsafe pickles, bad input."""

from __future__ import annotations

import argparse
import filecmp
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.test_cli import BIN, _bad, hf_to_mm, mm_convert

LAYOUT_A = ["--cfg.parallel_config.llm_pp_layers", "[[1,3]]", "--cfg.parallel_config.vit_pp_layers", "[[3,0]]"]


def mm_to_hf(hf: Path, mm: Path, out: Path, *extra: str, tp: int = 2, layout: list[str] = LAYOUT_A):
    return mm_convert(
        "Qwen2VLConverter", "mm_to_hf", "--cfg.save_hf_dir", str(out), "--cfg.mm_dir", str(mm),
        "--cfg.hf_config.hf_dir", str(hf), *layout, "--cfg.parallel_config.tp_size", str(tp), *extra,
    )  # fmt: skip


@pytest.fixture
def mm_tp2pp2(qwen2vl_dir: Path, tmp_path: Path) -> Path:
    out = tmp_path / "mm"
    r = hf_to_mm(qwen2vl_dir, out, tp=2)
    assert r.returncode == 0, r.stderr
    return out


def _same_hf(a: Path, b: Path) -> None:
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
    for p in a.glob("*.safetensors"):
        assert filecmp.cmp(p, b / p.name, shallow=False), p.name


def _as_trained(mm: Path, iteration: int = 10) -> None:
    """Rewrite a release checkpoint the way training saves it: iter dir, args, optimizer, RNG, extra state."""
    release = mm / "release"
    it = mm / f"iter_{iteration:07d}"
    release.rename(it)
    (mm / "latest_checkpointed_iteration.txt").write_text(str(iteration))
    for path in sorted(it.glob("*/model_optim_rng.pt")):
        obj = torch.load(path, weights_only=True)
        model = obj["model"]
        for key in list(model):
            if key.endswith("linear_qkv.weight"):
                model[key.replace(".weight", "._extra_state")] = None
        obj["args"] = argparse.Namespace(tensor_model_parallel_size=2, params_dtype=torch.bfloat16, seq_length=64)
        obj["iteration"] = iteration
        obj["optimizer"] = {"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 1e-4}]}
        obj["opt_param_scheduler"] = {"num_steps": iteration}
        obj["rng_state"] = [
            {
                "random_rng_state": (3, tuple(range(5)), None),
                "np_rng_state": np.random.RandomState(0).get_state(),
                "torch_rng_state": torch.get_rng_state(),
            }
        ]
        torch.save(obj, path)


def test_round_trip_from_the_command_line(qwen2vl_dir: Path, mm_tp2pp2: Path, tmp_path: Path) -> None:
    r = mm_to_hf(qwen2vl_dir, mm_tp2pp2, tmp_path / "back")
    assert r.returncode == 0, r.stderr
    _same_hf(qwen2vl_dir, tmp_path / "back")


def test_trained_checkpoint_converts_back(qwen2vl_dir: Path, mm_tp2pp2: Path, tmp_path: Path) -> None:
    _as_trained(mm_tp2pp2)
    r = mm_to_hf(qwen2vl_dir, mm_tp2pp2, tmp_path / "back")
    assert r.returncode == 0, r.stderr
    _same_hf(qwen2vl_dir, tmp_path / "back")


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_unsafe_pickle_is_refused_and_never_run(qwen2vl_dir: Path, mm_tp2pp2: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = mm_tp2pp2 / "release" / "mp_rank_01_001" / "model_optim_rng.pt"
    obj = torch.load(path, weights_only=True)
    obj["args"] = _Payload(marker)
    torch.save(obj, path)
    r = mm_to_hf(qwen2vl_dir, mm_tp2pp2, tmp_path / "back")
    _bad(r, "mp_rank_01_001", "refusing to unpickle", "system", "nothing was executed")
    assert not marker.exists()
    assert not (tmp_path / "back").exists()


def test_resplit_from_the_command_line_and_replay(qwen2vl_dir: Path, mm_tp2pp2: Path, tmp_path: Path) -> None:
    r = mm_convert(
        "Qwen2VLConverter", "resplit", "--cfg.source_dir", str(mm_tp2pp2), "--cfg.target_dir", str(tmp_path / "b"),
        "--cfg.hf_config.hf_dir", str(qwen2vl_dir), "--cfg.source_parallel_config.tp_size", "2",
        "--cfg.source_parallel_config.llm_pp_layers", "[[1,3]]", "--cfg.source_parallel_config.vit_pp_layers",
        "[[3,0]]", "--cfg.target_parallel_config.llm_pp_layers", "[4]", "--cfg.target_parallel_config.vit_pp_layers",
        "[3]",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    direct = tmp_path / "direct"
    r = hf_to_mm(qwen2vl_dir, direct, layout=["--cfg.parallel_config.llm_pp_layers", "[4]",
                                              "--cfg.parallel_config.vit_pp_layers", "[3]"])  # fmt: skip
    assert r.returncode == 0, r.stderr
    for p in direct.rglob("*"):
        if p.is_file():
            assert filecmp.cmp(p, tmp_path / "b" / p.relative_to(direct), shallow=False), p

    job = tmp_path / "back.toml"
    job.write_text(
        'converter = "Qwen2VLConverter"\ncommand = "mm_to_hf"\n[cfg]\n'
        f'save_hf_dir = "{tmp_path / "back"}"\nmm_dir = "{tmp_path / "b"}"\n'
        f'[cfg.hf_config]\nhf_dir = "{qwen2vl_dir}"\n'
        "[cfg.parallel_config]\nllm_pp_layers = [[4]]\nvit_pp_layers = [[3]]\n"
    )
    r = subprocess.run([str(BIN / "mmtui"), "--replay", str(job)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    _same_hf(qwen2vl_dir, tmp_path / "back")


@pytest.mark.parametrize(
    ("tp", "layout", "needles"),
    [
        (1, LAYOUT_A, ["4 rank directories on disk (mp_rank_00_000, mp_rank_00_001, mp_rank_01_000, mp_rank_01_001)", "the layout names 2 (mp_rank_00_000, mp_rank_00_001)"]),
        (2, ["--cfg.parallel_config.llm_pp_layers", "[[2,2]]", "--cfg.parallel_config.vit_pp_layers", "[[3,0]]"],
         ["mp_rank_00_000", "text_decoder.decoder.layers.1.", "missing", "llm_pp_layers=[[2, 2]]"]),
        (2, ["--cfg.parallel_config.llm_pp_layers", "[[1,1],[1,1]]", "--cfg.parallel_config.vit_pp_layers",
             "[[3,0],[0,0]]"], ["holds model", "2 VPP chunk(s)"]),
    ],
)  # fmt: skip
def test_wrong_source_layout(
    qwen2vl_dir: Path, mm_tp2pp2: Path, tmp_path: Path, tp: int, layout: list[str], needles: list[str]
) -> None:
    _bad(mm_to_hf(qwen2vl_dir, mm_tp2pp2, tmp_path / "back", tp=tp, layout=layout), *needles)
    assert not (tmp_path / "back").exists()


def test_missing_rank_dir_and_iteration(qwen2vl_dir: Path, mm_tp2pp2: Path, tmp_path: Path) -> None:
    shutil.rmtree(mm_tp2pp2 / "release" / "mp_rank_01_001")
    _bad(mm_to_hf(qwen2vl_dir, mm_tp2pp2, tmp_path / "back"), "3 rank directories", "mp_rank_01_001 is missing")
    (mm_tp2pp2 / "latest_checkpointed_iteration.txt").write_text("20")
    _bad(mm_to_hf(qwen2vl_dir, mm_tp2pp2, tmp_path / "back"), "latest_checkpointed_iteration.txt", "iter_0000020")
    (mm_tp2pp2 / "latest_checkpointed_iteration.txt").unlink()
    _bad(mm_to_hf(qwen2vl_dir, mm_tp2pp2, tmp_path / "back"), "no latest_checkpointed_iteration.txt")
    assert not (tmp_path / "back").exists()


def test_existing_target_is_refused(qwen2vl_dir: Path, mm_tp2pp2: Path, tmp_path: Path) -> None:
    out = tmp_path / "back"
    out.mkdir()
    (out / "mine").write_text("x")
    _bad(mm_to_hf(qwen2vl_dir, mm_tp2pp2, out), "save_hf_dir", "exists and is not empty")
    assert [p.name for p in out.iterdir()] == ["mine"]
