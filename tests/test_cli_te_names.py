"""`--cfg.transformer_impl` on the command lines (issue 18 item 3): mm-convert's commands and `mmtui verify`."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.test_cli import mm_convert
from tests.test_verify import verify

TE = "transformer_engine"


def _model(out: Path) -> dict[str, torch.Tensor]:
    (rank,) = (out / "release").iterdir()
    return torch.load(rank / "model_optim_rng.pt", weights_only=True)["model"]


def _hf_to_mm(hf: Path, out: Path, *extra: str):
    return mm_convert(
        "LlamaConverter", "hf_to_mm", "--cfg.mm_dir", str(out), "--cfg.hf_config.hf_dir", str(hf),
        "--cfg.parallel_config.llm_pp_layers", "[[4]]", *extra,
    )  # fmt: skip


def test_hf_to_mm_mm_to_hf_resplit_and_verify(tiny_llms: dict[str, Path], tmp_path: Path) -> None:
    hf = tiny_llms["llama"]
    r = _hf_to_mm(hf, tmp_path / "te", "--cfg.transformer_impl", TE)
    assert r.returncode == 0, r.stderr
    keys = set(_model(tmp_path / "te"))
    assert "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight" in keys
    assert "decoder.layers.0.mlp.linear_fc1.layer_norm_weight" in keys
    assert "decoder.layers.0.input_layernorm.weight" not in keys
    r = mm_convert(
        "LlamaConverter", "mm_to_hf", "--cfg.save_hf_dir", str(tmp_path / "back"), "--cfg.mm_dir",
        str(tmp_path / "te"), "--cfg.hf_config.hf_dir", str(hf),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    r = mm_convert(
        "LlamaConverter", "resplit", "--cfg.source_dir", str(tmp_path / "te"), "--cfg.target_dir",
        str(tmp_path / "local"), "--cfg.hf_config.hf_dir", str(hf), "--cfg.target_parallel_config.llm_pp_layers",
        "[[4]]", "--cfg.transformer_impl", "local",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "decoder.layers.0.input_layernorm.weight" in _model(tmp_path / "local")
    r = verify(str(hf), str(tmp_path / "te"))
    assert r.returncode == 0, r.stdout + r.stderr
    r = verify(str(tmp_path / "local"), str(tmp_path / "te"), "--hf-dir", str(hf), "--b.transformer_impl", TE)
    assert r.returncode == 0, r.stdout + r.stderr


def test_bad_values_exit_2_in_one_line(tiny_llms: dict[str, Path], tmp_path: Path) -> None:
    hf = tiny_llms["llama"]
    r = _hf_to_mm(hf, tmp_path / "o", "--cfg.transformer_impl", "te")
    assert r.returncode == 2 and "transformer_impl" in r.stderr and "'te'" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "o").exists()
    assert _hf_to_mm(hf, tmp_path / "local").returncode == 0
    r = verify(str(hf), str(tmp_path / "local"), "--b.transformer_impl", TE)
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.strip() == (
        f"mmtui verify: error: transformer_impl = transformer_engine, but B {tmp_path / 'local'} holds local names "
        "(decoder.layers.0.input_layernorm.weight); give local or leave transformer_impl out to read it from the disk"
    )
    r = verify(str(hf), str(tmp_path / "local"), "--b.transformer_impl", "te")
    assert r.returncode == 2 and "--b.transformer_impl" in r.stderr, r.stderr
