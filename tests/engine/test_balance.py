"""Suggest: the split is optimal under its cost model (checked against brute force)."""

from __future__ import annotations

import random
from itertools import combinations, pairwise
from pathlib import Path

import pytest

from engine.balance import layer_costs, partition, suggest
from engine.errors import ConvertError
from engine.hf_source import inspect_hf
from engine.layout import ParallelConfig, layout_problems
from engine.plan import ModuleWeights, module_weights


def brute_force(costs: list[int], parts: int) -> tuple[int, list[int]]:
    """(min of the largest group sum, lexicographically smallest sizes reaching it) by enumeration."""
    n = len(costs)
    best: tuple[int, list[int]] | None = None
    for cuts in combinations(range(1, n), parts - 1):
        bounds = [0, *cuts, n]
        sizes = [b - a for a, b in pairwise(bounds)]
        worst = max(sum(costs[a:b]) for a, b in pairwise(bounds))
        if best is None or (worst, sizes) < best:
            best = (worst, sizes)
    assert best is not None
    return best


def _largest(costs: list[int], sizes: list[int]) -> int:
    out, pos = 0, 0
    for s in sizes:
        out = max(out, sum(costs[pos : pos + s]))
        pos += s
    return out


# A VLM-like shape: small ViT layers, big LLM layers, embeddings and output layer riding along.
VIT = ModuleWeights("vit", [], first=7, last=30, lookup=0)
LLM = ModuleWeights("llm", [], first=90, last=95, lookup=90)


@pytest.mark.parametrize("model", ["params", "flops"])
def test_optimal_for_every_small_model(model: str) -> None:
    """All layer counts <= 12 for both modules, PP <= 4, with and without a ViT."""
    tokens = {"vit": 3, "llm": 2}
    for vit in range(13):
        for llm in range(1, 13):
            weights = [
                ModuleWeights("vit", [20] * vit, VIT.first, VIT.last, 0),
                ModuleWeights("llm", [60] * llm, LLM.first, LLM.last, LLM.lookup),
            ]
            costs = [c for per in layer_costs(weights, model, tokens) for c in per]  # type: ignore[arg-type]
            for pp in range(1, 5):
                if len(costs) < pp:
                    continue
                sizes = partition(costs, pp)
                assert (_largest(costs, sizes), sizes) == brute_force(costs, pp), (vit, llm, pp)


def test_optimal_for_random_costs() -> None:
    rng = random.Random(7)
    for _ in range(400):
        n = rng.randint(1, 12)
        costs = [rng.randint(1, 50) for _ in range(n)]
        parts = rng.randint(1, min(n, 4))
        sizes = partition(costs, parts)
        assert (_largest(costs, sizes), sizes) == brute_force(costs, parts), (costs, parts)


def test_more_stages_than_layers_is_refused() -> None:
    with pytest.raises(ConvertError, match="cannot cut 3 layers into 4 non-empty pipeline stages"):
        partition([1, 2, 3], 4)


def test_module_weights_account_for_every_parameter(tiny_dirs: dict[str, Path]) -> None:
    for name, path in tiny_dirs.items():
        info = inspect_hf(path)
        weights = module_weights(info)
        total = sum(sum(w.layers) + w.first + w.last for w in weights)
        tied_copy = info.tensors["model.embed_tokens.weight"].numel if "tied" in name else 0
        assert total == sum(t.numel for t in info.tensors.values()) + tied_copy, name


@pytest.mark.parametrize("pp,vpp", [(1, 1), (2, 1), (3, 1), (4, 1), (2, 2), (3, 2)])
@pytest.mark.parametrize("model", ["params", "flops"])
def test_suggestion_is_a_valid_layout(qwen2vl_dir: Path, pp: int, vpp: int, model: str) -> None:
    info = inspect_hf(qwen2vl_dir)
    s = suggest(info, pp, vpp, model)  # type: ignore[arg-type]
    layout = ParallelConfig(llm_pp_layers=s.layers["llm"], vit_pp_layers=s.layers["vit"])
    assert layout_problems(layout, info) == []
    assert len(s.stage_costs) == pp
    # cell costs agree with the parameter count of what lands in each cell
    if model == "params":
        weights = {w.name: w for w in module_weights(info)}
        assert sum(s.stage_costs) == sum(sum(w.layers) + w.first + w.last for w in weights.values())


def test_tiny_qwen2vl_params_split(qwen2vl_dir: Path) -> None:
    """Hand-checked: 3 ViT + 4 LLM layers over 2 stages."""
    info = inspect_hf(qwen2vl_dir)
    s = suggest(info, 2)
    w = {m.name: m for m in module_weights(info)}
    costs = [c for per in layer_costs(list(w.values()), "params", {}) for c in per]
    best, sizes = brute_force(costs, 2)
    assert max(s.stage_costs) == best
    assert [s.layers["vit"][0][i] + s.layers["llm"][0][i] for i in range(2)] == sizes


def test_suggest_command_line(qwen2vl_dir: Path) -> None:
    """`mmtui suggest` prints the optimal split as flags mm-convert accepts; bad input is one line, exit 2."""
    import subprocess

    from tests.test_cli import BIN, _bad

    info = inspect_hf(qwen2vl_dir)
    s = suggest(info, 2)
    r = subprocess.run([str(BIN / "mmtui"), "suggest", str(qwen2vl_dir), "--pp", "2"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    llm = str(s.layers["llm"]).replace(" ", "")
    assert f"--cfg.parallel_config.llm_pp_layers {llm}" in r.stdout
    r = subprocess.run([str(BIN / "mmtui"), "suggest", str(qwen2vl_dir), "--pp", "9"], capture_output=True, text=True)
    _bad(r, "cannot cut 7 layers into 9 non-empty pipeline stages")


def test_cell_costs_of_a_suggestion_match_it(qwen2vl_dir: Path) -> None:
    from engine.balance import cell_costs

    info = inspect_hf(qwen2vl_dir)
    for model in ("params", "flops"):
        s = suggest(info, 3, 2, model)  # type: ignore[arg-type]
        assert cell_costs(info, s.layers, model) == s.cell_costs  # type: ignore[arg-type]
