"""Session fixtures of the torch_dist tests of multi-latent attention and of vision-language models: their
outputs, and one megatron-core run for both oracles (starting megatron-core in two processes is most of an
oracle's time, so it is paid once)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def mla(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from tests.engine.test_torch_dist_mla import outputs

    return outputs(tmp_path_factory.mktemp("td_mla"))


@pytest.fixture(scope="session")
def vlm(qwen2vl_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from tests.engine.test_torch_dist_vlm import outputs

    return outputs(qwen2vl_dir, tmp_path_factory.mktemp("td_vlm"))


@pytest.fixture(scope="session")
def td_oracle(mla: dict[str, Path], vlm: dict[str, Path]) -> dict[str, list]:
    """megatron-core's results of both test modules' tasks: {"mla": [...], "vlm": [...]}."""
    pytest.importorskip("megatron.core")
    from tests.engine import test_torch_dist_mla, test_torch_dist_vlm
    from tests.fixtures.megatron_dist import run_megatron

    assert test_torch_dist_mla.TOKENS == test_torch_dist_vlm.TOKENS  # one run: the same tokens for both
    a, b = test_torch_dist_mla.oracle_tasks(mla), test_torch_dist_vlm.oracle_tasks(vlm)
    results = run_megatron([*a, *b], test_torch_dist_mla.TOKENS)
    return {"mla": results[: len(a)], "vlm": results[len(a) :]}
