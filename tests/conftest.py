"""Shared fixtures: tiny checkpoints generated on the fly (never downloaded)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fixtures.tiny_deepseek import V2, build_tiny_deepseek
from tests.fixtures.tiny_internvl import build_tiny_internvl
from tests.fixtures.tiny_llm import build_tiny_llm
from tests.fixtures.tiny_vlm import build_tiny_vlm

VARIANTS = {
    # name: build_tiny_vlm keyword arguments
    "qwen2_vl": {"family": "qwen2_vl"},
    "qwen2_vl_tied": {"family": "qwen2_vl", "tied": True, "config_layout": "nested", "shards": 2},
    "qwen2_5_vl": {"family": "qwen2_5_vl", "config_layout": "nested", "key_spelling": "new", "shards": 2},
    "qwen2_vl_sharded_new": {"family": "qwen2_vl", "key_spelling": "new", "shards": 3},
}


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {name: build_tiny_vlm(root / name, **kw) for name, kw in VARIANTS.items()}


@pytest.fixture(scope="session")
def qwen2vl_dir(tiny_dirs: dict[str, Path]) -> Path:
    return tiny_dirs["qwen2_vl"]


LLM_VARIANTS = {
    # name: build_tiny_llm keyword arguments
    "llama": {"family": "llama", "shards": 2},
    "qwen2_tied": {"family": "qwen2", "tied": True},
    "qwen3": {"family": "qwen3"},
    "qwen3_vocab99": {"family": "qwen3", "tied": True, "vocab_size": 99},  # divides by no TP > 1
    "mixtral": {"family": "mixtral", "shards": 2},
    "qwen3_moe": {"family": "qwen3_moe"},  # layer 1 dense (mlp_only_layers)
    "qwen2_moe": {"family": "qwen2_moe", "shards": 2},  # layer 1 dense; a gated shared expert
}


@pytest.fixture(scope="session")
def tiny_llms(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf_llm")
    return {name: build_tiny_llm(root / name, **kw) for name, kw in LLM_VARIANTS.items()}


INTERNVL_VARIANTS = {
    # name: build_tiny_internvl keyword arguments
    # InternViT-6B-like (RMSNorm, q/k norms) with InternLM2, sharded
    "internlm2": {"llm": "internlm2", "norm": "rms_norm", "qk_norm": True, "shards": 2},
    # InternViT-300M-like (LayerNorm) with a tied Qwen2 whose vocabulary (130) divides by no TP > 2
    "qwen2": {"llm": "qwen2", "vocab_size": 130, "tied": True},
    "llama": {"llm": "llama"},
}


@pytest.fixture(scope="session")
def tiny_internvls(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf_internvl")
    return {name: build_tiny_internvl(root / name, **kw) for name, kw in INTERNVL_VARIANTS.items()}


DEEPSEEK_VARIANTS = {
    # name: build_tiny_deepseek keyword arguments
    "v3": {"shards": 2},  # MLA with q_lora_rank, 1 dense + 2 MoE layers, router bias, shared expert
    "v3_no_q_lora": {"q_lora_rank": None},  # MLA's query in one projection (DeepSeek-V2-Lite's shape)
    "v2_lite": {"q_lora_rank": None, "extra": V2},  # DeepSeek-V2's model type: softmax router, no bias
    "v3_fp8": {"fp8_block": (16, 32), "shards": 2},  # the hub's FP8 weights: 16 x 32 blocks, some partial
}


@pytest.fixture(scope="session")
def tiny_deepseeks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:

    root = tmp_path_factory.mktemp("hf_deepseek")
    return {name: build_tiny_deepseek(root / name, **kw) for name, kw in DEEPSEEK_VARIANTS.items()}


@pytest.fixture
def small_fs(tmp_path: Path):
    """A 2 MB tmpfs (root only)."""
    import os
    import subprocess

    from tests.fixtures.tmpfs import mount_tmpfs

    mnt = tmp_path / "mnt"
    if os.geteuid() != 0 or not mount_tmpfs(mnt, "size=2m"):
        pytest.skip("needs root and tmpfs mounts")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=True)
