"""`convert-ckpt`: MindSpeed-LLM's documented command lines (v1 and v2 spellings) run as they are.

The expected layout comes from MindSpeed-LLM's own writer (mindspeed_llm/tasks/checkpoint/
convert.py: `iter_0000001`, the tracker holding "1", `args` and `iteration` in each rank
file), the expected tensors from `mm-convert ... hf_to_mm` and from the HF files themselves.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.test_cli import BIN, mm_convert

V1_TO_MG = [
    "--use-mcore-models", "--model-type", "GPT", "--load-model-type", "hf", "--save-model-type", "mg",
    "--target-tensor-parallel-size", "2", "--target-pipeline-parallel-size", "2", "--num-layer-list", "2,2",
    "--model-type-hf", "llama2",
]  # fmt: skip


def convert_ckpt(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "convert-ckpt"), *args], capture_output=True, text=True, timeout=300)


def _load(path: Path) -> dict:
    torch.serialization.add_safe_globals([argparse.Namespace])
    return torch.load(path, weights_only=True)


def _ranks(root: Path, it: str) -> dict[str, dict]:
    return {p.parent.name: _load(p) for p in sorted((root / it).glob("mp_rank_*/model_optim_rng.pt"))}


def _hf(d: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(d.glob("*.safetensors")) for k, v in load_file(f).items()}


def _one_line(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 2, (r.returncode, r.stderr)
    (line,) = r.stderr.strip().splitlines()
    return line


def test_v1_documented_hf_to_mg_and_back(tiny_llms: dict[str, Path], tmp_path: Path) -> None:
    hf = tiny_llms["llama"]
    r = convert_ckpt(*V1_TO_MG, "--load-dir", str(hf), "--save-dir", str(tmp_path / "mcore"),
                     "--tokenizer-model", str(hf / "tokenizer.model"))  # fmt: skip
    assert r.returncode == 0, r.stderr
    mcore = tmp_path / "mcore"
    assert (mcore / "latest_checkpointed_iteration.txt").read_text() == "1"
    ours = _ranks(mcore, "iter_0000001")
    assert sorted(ours) == ["mp_rank_00_000", "mp_rank_00_001", "mp_rank_01_000", "mp_rank_01_001"]
    r = mm_convert("LlamaConverter", "hf_to_mm", "--cfg.mm_dir", str(tmp_path / "ref"), "--cfg.hf_config.hf_dir",
                   str(hf), "--cfg.parallel_config.llm_pp_layers", "[[2,2]]", "--cfg.parallel_config.tp_size", "2")  # fmt: skip
    assert r.returncode == 0, r.stderr
    ref = _ranks(tmp_path / "ref", "release")
    for rank, obj in ours.items():
        assert obj["iteration"] == 1 and obj["checkpoint_version"] == 3.0
        assert isinstance(obj["args"], argparse.Namespace) and obj["args"].tensor_model_parallel_size == 2
        assert obj["model"].keys() == ref[rank]["model"].keys()
        assert all(torch.equal(obj["model"][k], ref[rank]["model"][k]) for k in obj["model"])
    # v1's way back: --save-dir names the original HF directory, the model goes to <save-dir>/mg2hf
    original = tmp_path / "llama-hf"
    shutil.copytree(hf, original)
    r = convert_ckpt("--use-mcore-models", "--model-type", "GPT", "--load-model-type", "mg", "--save-model-type", "hf",
                     "--model-type-hf", "llama2", "--load-dir", str(mcore), "--target-tensor-parallel-size", "1",
                     "--target-pipeline-parallel-size", "1", "--save-dir", str(original))  # fmt: skip
    assert r.returncode == 0, r.stderr
    for f in sorted(hf.glob("*.safetensors")):
        assert (original / "mg2hf" / f.name).read_bytes() == f.read_bytes()


def test_v2_spellings(tiny_llms: dict[str, Path], tmp_path: Path) -> None:
    hf = tiny_llms["llama"]
    r = convert_ckpt("--load-model-type", "hf", "--save-model-type", "mg", "--model-type-hf", "llama2",
                     "--load-dir", str(hf), "--save-dir", str(tmp_path / "mcore"), "--target-tensor-parallel-size", "2",
                     "--target-pipeline-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1")  # fmt: skip
    assert r.returncode == 0, r.stderr
    ranks = _ranks(tmp_path / "mcore", "iter_0000001")
    assert sorted(ranks["mp_rank_00_000"]) == ["args", "checkpoint_version", "iteration", "model0", "model1"]
    r = convert_ckpt("--load-model-type", "mg", "--save-model-type", "hf", "--load-dir", str(tmp_path / "mcore"),
                     "--save-dir", str(tmp_path / "hf_out"), "--hf-cfg-dir", str(hf))  # fmt: skip
    assert r.returncode == 0, r.stderr
    got, want = _hf(tmp_path / "hf_out"), _hf(hf)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    # mg -> mg: a re-cut, config.json from --hf-cfg-dir
    r = convert_ckpt("--load-model-type", "mg", "--save-model-type", "mg", "--load-dir", str(tmp_path / "mcore"),
                     "--save-dir", str(tmp_path / "tp1"), "--hf-cfg-dir", str(hf))  # fmt: skip
    assert r.returncode == 0, r.stderr
    (one,) = _ranks(tmp_path / "tp1", "iter_0000001").values()
    assert sorted(one) == ["args", "checkpoint_version", "iteration", "model"]


def test_transformer_engine_names(tiny_llms: dict[str, Path], tmp_path: Path) -> None:
    """v2's --transformer-impl: Megatron-LM's TE layers hold the norms inside the next linear."""
    hf = tiny_llms["llama"]
    r = convert_ckpt(*V1_TO_MG, "--load-dir", str(hf), "--save-dir", str(tmp_path / "te"),
                     "--transformer-impl", "transformer_engine")  # fmt: skip
    assert r.returncode == 0, r.stderr
    keys = set(_ranks(tmp_path / "te", "iter_0000001")["mp_rank_00_000"]["model"])
    assert "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight" in keys
    assert "decoder.layers.0.mlp.linear_fc1.layer_norm_weight" in keys
    assert not any(k.endswith(("input_layernorm.weight", "pre_mlp_layernorm.weight")) for k in keys)


def test_params_dtype_casts(tiny_llms: dict[str, Path], tmp_path: Path) -> None:
    """--params-dtype bf16 on a float32 model: every weight is tensor.to(bfloat16) of the HF one."""
    hf = tiny_llms["llama"]
    r = convert_ckpt(*V1_TO_MG, "--load-dir", str(hf), "--save-dir", str(tmp_path / "bf16"), "--params-dtype", "bf16")
    assert r.returncode == 0, r.stderr
    r = mm_convert("LlamaConverter", "hf_to_mm", "--cfg.mm_dir", str(tmp_path / "ref"), "--cfg.hf_config.hf_dir",
                   str(hf), "--cfg.parallel_config.llm_pp_layers", "[[2,2]]", "--cfg.parallel_config.tp_size", "2")  # fmt: skip
    assert r.returncode == 0, r.stderr
    ours, ref = _ranks(tmp_path / "bf16", "iter_0000001"), _ranks(tmp_path / "ref", "release")
    for rank, obj in ours.items():
        for k, v in obj["model"].items():
            assert v.dtype == torch.bfloat16 and torch.equal(v, ref[rank]["model"][k].to(torch.bfloat16)), k
    # the way back does not cast yet: a dtype other than the weights' own is one line
    line = _one_line(convert_ckpt("--load-model-type", "mg", "--save-model-type", "hf", "--load-dir",
                                  str(tmp_path / "bf16"), "--save-dir", str(tmp_path / "x"), "--hf-cfg-dir", str(hf),
                                  "--params-dtype", "fp16"))  # fmt: skip
    assert "--params-dtype fp16: casting the weights (config.json says float32) is not done yet" in line


def test_mixtral_with_expert_parallel(tiny_llms: dict[str, Path], tmp_path: Path) -> None:
    hf = tiny_llms["mixtral"]
    r = convert_ckpt("--model-type", "GPT", "--load-model-type", "hf", "--save-model-type", "mg", "--model-type-hf",
                     "mixtral", "--load-dir", str(hf), "--save-dir", str(tmp_path / "mcore"),
                     "--target-expert-parallel-size", "2", "--target-pipeline-parallel-size", "2",
                     "--num-layer-list", "1,3")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert len(_ranks(tmp_path / "mcore", "iter_0000001")) == 4  # mp_rank_00_PPP_EEE
    r = convert_ckpt("--load-model-type", "mg", "--save-model-type", "hf", "--load-dir", str(tmp_path / "mcore"),
                     "--save-dir", str(tmp_path / "back"), "--hf-cfg-dir", str(hf))  # fmt: skip
    assert r.returncode == 0, r.stderr
    got, want = _hf(tmp_path / "back"), _hf(hf)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_the_equivalent_job_is_one_flag_away(tiny_llms: dict[str, Path], tmp_path: Path) -> None:
    hf = tiny_llms["llama"]
    r = convert_ckpt(*V1_TO_MG, "--load-dir", str(hf), "--save-dir", str(tmp_path / "a"), "--print-job")
    assert r.returncode == 0 and not (tmp_path / "a").exists(), r.stderr
    job = tmp_path / "job.yaml"
    job.write_text(r.stdout)
    assert r.stdout.startswith("converter: LlamaConverter\ncommand: hf_to_mm\ncfg:\n")
    m = mm_convert("--config", str(job))
    assert m.returncode == 0, m.stderr
    assert convert_ckpt(*V1_TO_MG, "--load-dir", str(hf), "--save-dir", str(tmp_path / "b")).returncode == 0
    for p in sorted((tmp_path / "a").rglob("*")):
        assert p.is_dir() or p.read_bytes() == (tmp_path / "b" / p.relative_to(tmp_path / "a")).read_bytes()


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (["--moe-grouped-gemm"], "convert-ckpt: error: --moe-grouped-gemm: Llama has no experts; leave it out"),
        (["--expert-tensor-parallel-size", "1"], "convert-ckpt: error: --expert-tensor-parallel-size: Llama has no experts; leave it out"),
        (["--expert-tensor-parallel-size", "3"], "convert-ckpt: error: --expert-tensor-parallel-size 3: MindSpeed-LLM takes 1 or the TP size (--target-tensor-parallel-size 2)"),
        (["--model-type-hf", "bloom"], "convert-ckpt: error: --model-type-hf 'bloom': not a family mmtui converts; one of llama2,"),
        (["--target-tensor-paralel-size", "2"], "--target-tensor-paralel-size is not a flag of MindSpeed-LLM's convert_ckpt that mmtui takes; did you mean --target-tensor-parallel-size?"),
        (["--target-tensor", "2"], "--target-tensor is not a flag of MindSpeed-LLM's convert_ckpt that mmtui takes"),
        (["--num-layer-list", "2,x"], "--num-layer-list '2,x': expected whole numbers separated by commas"),
        (["--num-layer-list", "1,1,2"], "--num-layer-list 1,1,2: 3 stages, --target-pipeline-parallel-size 2"),
        (["--model-type", "BERT"], "--model-type BERT: only GPT models are converted"),
    ],
)  # fmt: skip
def test_what_is_not_taken_is_one_line(tiny_llms: dict[str, Path], tmp_path: Path, extra: list[str], words: str):
    hf = tiny_llms["llama"]
    args = [*V1_TO_MG, "--load-dir", str(hf), "--save-dir", str(tmp_path / "out")]
    if extra[0] == "--model-type-hf":
        args = args[: args.index("--model-type-hf")] + args[args.index("--model-type-hf") + 2 :]
    if extra[0] == "--num-layer-list":
        args = args[: args.index("--num-layer-list")] + args[args.index("--num-layer-list") + 2 :]
    if extra[0] == "--model-type":
        args = args[: args.index("--model-type")] + args[args.index("--model-type") + 2 :]
    line = _one_line(convert_ckpt(*args, *extra))
    assert words in line, line
    assert not (tmp_path / "out").exists()


def test_mg_to_hf_without_a_config_names_both_ways(tiny_llms: dict[str, Path], tmp_path: Path) -> None:
    hf = tiny_llms["llama"]
    assert convert_ckpt(*V1_TO_MG, "--load-dir", str(hf), "--save-dir", str(tmp_path / "mcore")).returncode == 0
    line = _one_line(convert_ckpt("--load-model-type", "mg", "--save-model-type", "hf", "--load-dir",
                                  str(tmp_path / "mcore"), "--save-dir", str(tmp_path / "out")))  # fmt: skip
    assert line == (
        f"convert-ckpt: error: --save-dir {tmp_path}/out: holds no config.json; give the model's HF directory as "
        "--save-dir (v1: written to <save-dir>/mg2hf) or as --hf-cfg-dir (v2)"
    )


def test_ckpt_format_torch_dist_writes_megatron_cores_and_reads_back(tiny_llms: dict[str, Path], tmp_path: Path):
    """--ckpt-format torch_dist (Megatron-LM's flag for the format) writes Megatron-Core's distributed checkpoint;
    the way back needs no flag: the directory says what it is."""
    hf = tiny_llms["llama"]
    out = tmp_path / "mg"
    r = convert_ckpt(*V1_TO_MG, "--load-dir", str(hf), "--save-dir", str(out), "--ckpt-format", "torch_dist")
    assert r.returncode == 0, r.stderr
    it = (out / "latest_checkpointed_iteration.txt").read_text().strip()
    step = out / f"iter_{int(it):07d}"
    assert {"metadata.json", "common.pt", ".metadata"} <= {p.name for p in step.iterdir()}
    assert '"sharded_backend": "torch_dist"' in (step / "metadata.json").read_text()
    back = tmp_path / "back"
    r = convert_ckpt("--load-model-type", "mg", "--save-model-type", "hf", "--load-dir", str(out),
                     "--save-dir", str(back), "--hf-cfg-dir", str(hf), "--model-type-hf", "llama2")  # fmt: skip
    assert r.returncode == 0, r.stderr
    got, want = _hf(back), _hf(hf)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_ckpt_format_other_is_one_line(tiny_llms: dict[str, Path], tmp_path: Path) -> None:
    args = [*V1_TO_MG, "--load-dir", str(tiny_llms["llama"]), "--save-dir", str(tmp_path / "out")]
    line = _one_line(convert_ckpt(*args, "--ckpt-format", "zarr"))
    assert "--ckpt-format zarr: torch (legacy rank files) or torch_dist (Megatron-Core's) are written" in line
    assert not (tmp_path / "out").exists()
