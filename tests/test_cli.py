"""The command lines: seed syntax, config files, env vars, replay, and bad input (exit 2, one line, nothing written)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BIN = Path(sys.executable).parent
LAYOUT = ["--cfg.parallel_config.llm_pp_layers", "[[1,3]]", "--cfg.parallel_config.vit_pp_layers", "[[3,0]]"]


def mm_convert(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [str(BIN / "mm-convert"), *args], capture_output=True, text=True, env=full_env, cwd=cwd, timeout=300
    )


def hf_to_mm(hf: Path, out: Path, *extra: str, tp: int = 1, layout: list[str] = LAYOUT) -> subprocess.CompletedProcess:
    return mm_convert(
        "Qwen2VLConverter", "hf_to_mm", "--cfg.mm_dir", str(out), "--cfg.hf_config.hf_dir", str(hf),
        *layout, "--cfg.parallel_config.tp_size", str(tp), *extra,
    )  # fmt: skip


def _tensors(out: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {
        p.parent.name: torch.load(p, weights_only=True)["model"]
        for p in sorted(out.glob("release/*/model_optim_rng.pt"))
    }


def _same(a: Path, b: Path) -> bool:
    ta, tb = _tensors(a), _tensors(b)
    return ta.keys() == tb.keys() and all(
        ta[r].keys() == tb[r].keys() and all(torch.equal(ta[r][k], tb[r][k]) for k in ta[r]) for r in ta
    )


def test_seed_syntax_writes_the_layout(qwen2vl_dir: Path, tmp_path: Path) -> None:
    r = hf_to_mm(qwen2vl_dir, tmp_path / "out", tp=2)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (tmp_path / "out" / "release").iterdir()) == [
        "mp_rank_00_000", "mp_rank_00_001", "mp_rank_01_000", "mp_rank_01_001",
    ]  # fmt: skip


def test_qwen25_converter_and_family_mismatch(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    hf = tiny_dirs["qwen2_5_vl"]
    r = mm_convert(
        "Qwen2_5_VLConverter",
        "hf_to_mm",
        "--cfg.mm_dir",
        str(tmp_path / "a"),
        "--cfg.hf_config.hf_dir",
        str(hf),
        *LAYOUT,
    )
    assert r.returncode == 0, r.stderr
    r = hf_to_mm(hf, tmp_path / "b")
    assert r.returncode == 2
    assert "model_type 'qwen2_5_vl' is not a Qwen2-VL model (converter Qwen2VLConverter expects qwen2_vl)" in r.stderr
    assert not (tmp_path / "b").exists()


def test_config_yaml_print_config_and_env(qwen2vl_dir: Path, tmp_path: Path) -> None:
    r = hf_to_mm(qwen2vl_dir, tmp_path / "x", "--print_config=comments")
    assert r.returncode == 0, r.stderr
    assert "# Output directory" in r.stdout and "llm_pp_layers:" in r.stdout
    assert not (tmp_path / "x").exists()
    cfg = tmp_path / "job.yaml"
    cfg.write_text(r.stdout.replace(str(tmp_path / "x"), str(tmp_path / "from_yaml")))
    r = mm_convert("Qwen2VLConverter", "hf_to_mm", "--config", str(cfg))
    assert r.returncode == 0, r.stderr
    env = {
        "JSONARGPARSE_DEFAULT_ENV": "true",
        "MM_CONVERT_QWEN2VLCONVERTER__HF_TO_MM__CFG__MM_DIR": str(tmp_path / "from_env"),
        "MM_CONVERT_QWEN2VLCONVERTER__HF_TO_MM__CFG__HF_CONFIG__HF_DIR": str(qwen2vl_dir),
        "MM_CONVERT_QWEN2VLCONVERTER__HF_TO_MM__CFG__PARALLEL_CONFIG__LLM_PP_LAYERS": "[[1,3]]",
        "MM_CONVERT_QWEN2VLCONVERTER__HF_TO_MM__CFG__PARALLEL_CONFIG__VIT_PP_LAYERS": "[[3,0]]",
    }
    r = mm_convert("Qwen2VLConverter", "hf_to_mm", env=env)
    assert r.returncode == 0, r.stderr
    assert hf_to_mm(qwen2vl_dir, tmp_path / "direct").returncode == 0
    assert _same(tmp_path / "from_yaml", tmp_path / "direct") and _same(tmp_path / "from_env", tmp_path / "direct")


@pytest.mark.parametrize("argv", [["-h"], ["Qwen2VLConverter", "-h"], ["Qwen2VLConverter", "hf_to_mm", "-h"]])
def test_help_at_every_level(argv: list[str]) -> None:
    r = mm_convert(*argv)
    assert r.returncode == 0 and "usage:" in r.stdout


def test_replay_toml_equals_cli(qwen2vl_dir: Path, tmp_path: Path) -> None:
    job = tmp_path / "job.toml"
    job.write_text(
        f'converter = "Qwen2VLConverter"\ncommand = "hf_to_mm"\n[cfg]\nmm_dir = "{tmp_path / "replayed"}"\n'
        f'[cfg.hf_config]\nhf_dir = "{qwen2vl_dir}"\n'
        "[cfg.parallel_config]\ntp_size = 2\nllm_pp_layers = [[1, 3]]\nvit_pp_layers = [[3, 0]]\n"
    )
    r = subprocess.run([str(BIN / "mmtui"), "--replay", str(job)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert hf_to_mm(qwen2vl_dir, tmp_path / "direct", tp=2).returncode == 0
    assert _same(tmp_path / "replayed", tmp_path / "direct")


def _bad(r: subprocess.CompletedProcess, *needles: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def _nothing_written(tmp_path: Path, *keep: str) -> None:
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(keep)


def test_bad_hf_dirs(qwen2vl_dir: Path, tmp_path: Path) -> None:
    _bad(hf_to_mm(tmp_path / "nope", tmp_path / "out"), "nope: no such directory")
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(qwen2vl_dir / "config.json", empty / "config.json")
    _bad(hf_to_mm(empty, tmp_path / "out"), "no weights (expected model.safetensors, or shards with model.safetensors.index.json, or pytorch_model.bin")
    _nothing_written(tmp_path, "empty")


def test_missing_shard_and_truncated_header(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    src = tiny_dirs["qwen2_vl_tied"]  # sharded
    broken = tmp_path / "broken"
    shutil.copytree(src, broken)
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    (broken / shard).unlink()
    _bad(hf_to_mm(broken, tmp_path / "out"), f"names {shard}", "is missing")
    shutil.copy(src / shard, broken / shard)
    data = (broken / shard).read_bytes()
    (broken / shard).write_bytes(data[:20])
    _bad(hf_to_mm(broken, tmp_path / "out"), shard, "truncated safetensors header")
    _nothing_written(tmp_path, "broken")


def test_non_empty_target(qwen2vl_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "x").write_text("mine")
    _bad(hf_to_mm(qwen2vl_dir, out), "exists and is not empty", "--cfg.overwrite true")
    assert [p.name for p in out.iterdir()] == ["x"]
    r = hf_to_mm(qwen2vl_dir, out, "--cfg.overwrite", "true")
    assert r.returncode == 0, r.stderr
    assert not (out / "x").exists()


@pytest.mark.parametrize(
    ("layout", "tp", "needle"),
    [
        (
            ["[[1,2]]", "[[3,0]]"],
            1,
            "llm_pp_layers [[1, 2]] sums to 3 but qwen2_vl/config.json has num_hidden_layers = 4",
        ),
        (["[[1,3]]", "[[2,0]]"], 1, "vit_pp_layers [[2, 0]] sums to 2"),
        (["[[1,1],[1,1]]", "[[3,0]]"], 1, "vit_pp_layers has 1 VPP chunk(s) but llm_pp_layers has 2"),
        (["[[4]]", "[[3]]"], 3, "tp_size 3 does not divide vision_config.num_heads = 4"),
        (["[[4]]", "[[3]]"], 4, "tp_size 4 does not divide num_key_value_heads = 2"),
        (["[[0,4,0]]", "[[3,0,0]]"], 1, "pipeline stage 2 holds no layers of any module"),
    ],
)
def test_bad_layouts(qwen2vl_dir: Path, tmp_path: Path, layout: list[str], tp: int, needle: str) -> None:
    args = ["--cfg.parallel_config.llm_pp_layers", layout[0], "--cfg.parallel_config.vit_pp_layers", layout[1]]
    _bad(hf_to_mm(qwen2vl_dir, tmp_path / "out", tp=tp, layout=args), needle)
    _nothing_written(tmp_path)


def test_replay_bad_toml(tmp_path: Path) -> None:
    job = tmp_path / "job.toml"
    job.write_text('converter = "Qwen2VLConverter"\ncommand = "hf_to_mm"\n[cfg]\nmm_dir = 3\n')
    r = subprocess.run([str(BIN / "mmtui"), "--replay", str(job)], capture_output=True, text=True, timeout=60)
    _bad(r, "job.toml", "cfg.mm_dir")
    _nothing_written(tmp_path, "job.toml")


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (
            ["--cfg.parallel_config.tp_size", "abc"],
            "cfg.parallel_config.tp_size = 'abc': Input should be a valid integer",
        ),
        (
            ["--cfg.parallel_config.llm_pp_layers", "[[1,3]"],
            "cfg.parallel_config.llm_pp_layers = '[[1,3]': expected per-stage layer counts, one list per VPP chunk",
        ),
        (["--cfg.bogus", "3"], "unrecognized arguments: --cfg.bogus 3"),
    ],
)
def test_parse_errors_are_one_line(qwen2vl_dir: Path, tmp_path: Path, extra: list[str], needle: str) -> None:
    """jsonargparse's usage text and several-line reports become one line naming the field and the value."""
    _bad(hf_to_mm(qwen2vl_dir, tmp_path / "out", *extra), needle)
    assert not (tmp_path / "out").exists()


def test_a_float8_checkpoint_is_refused(qwen2vl_dir: Path, tmp_path: Path) -> None:
    """FP8 weights without their block scales (engine/source/fp8.py reads DeepSeek-V3's) cannot be read: one line."""
    from safetensors.torch import load_file, save_file

    fp8 = tmp_path / "fp8"
    shutil.copytree(qwen2vl_dir, fp8)
    state = load_file(fp8 / "model.safetensors")
    key = "model.layers.0.mlp.down_proj.weight"
    state[key] = state[key].float().to(torch.float8_e4m3fn)
    save_file(state, fp8 / "model.safetensors", metadata={"format": "pt"})
    _bad(hf_to_mm(fp8, tmp_path / "out"), f"tensor {key!r} is float8_e4m3fn but has no weight_scale_inv beside it")
    _nothing_written(tmp_path, "fp8")
