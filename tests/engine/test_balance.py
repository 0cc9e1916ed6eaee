"""Suggest: the split is optimal under its cost model (checked against brute force)."""

from __future__ import annotations

import os
import random
import subprocess
from itertools import combinations, pairwise
from pathlib import Path

import pytest

from engine.errors import ConvertError
from engine.layout import ParallelConfig, layout_problems
from engine.planning.balance import cell_costs, cost_number, format_cost, layer_costs, partition, suggest
from engine.planning.targets import ModuleWeights, module_weights
from engine.source.hf_source import inspect_hf


def brute_force(costs: list[int], parts: int) -> tuple[list[int], list[int]]:
    """(group sums sorted largest first, sizes) of the best split, by enumerating every split:
    the sorted sums are compared first (smallest largest, then smallest second largest, ...),
    then the sizes (earlier groups smaller)."""
    n = len(costs)
    best: tuple[list[int], list[int]] | None = None
    for cuts in combinations(range(1, n), parts - 1):
        bounds = [0, *cuts, n]
        sizes = [b - a for a, b in pairwise(bounds)]
        sums = sorted((sum(costs[a:b]) for a, b in pairwise(bounds)), reverse=True)
        if best is None or (sums, sizes) < best:
            best = (sums, sizes)
    assert best is not None
    return best


def _sums(costs: list[int], sizes: list[int]) -> list[int]:
    out, pos = [], 0
    for s in sizes:
        out.append(sum(costs[pos : pos + s]))
        pos += s
    return out


def _judged(costs: list[int], sizes: list[int]) -> tuple[list[int], list[int]]:
    return sorted(_sums(costs, sizes), reverse=True), sizes


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
                assert _judged(costs, partition(costs, pp)) == brute_force(costs, pp), (vit, llm, pp)


def test_optimal_for_random_costs() -> None:
    rng = random.Random(7)
    for _ in range(600):
        n = rng.randint(1, 12)
        costs = [rng.randint(1, rng.choice((3, 50))) for _ in range(n)]  # few values: many ties
        parts = rng.randint(1, min(n, 6))
        assert _judged(costs, partition(costs, parts)) == brute_force(costs, parts), (costs, parts)


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
    assert sorted(s.stage_costs, reverse=True) == best
    assert [s.layers["vit"][0][i] + s.layers["llm"][0][i] for i in range(2)] == sizes


def test_suggest_command_line(qwen2vl_dir: Path) -> None:
    """`mmtui suggest` prints the optimal split as flags mm-convert accepts; bad input is one line, exit 2."""
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
    info = inspect_hf(qwen2vl_dir)
    for model in ("params", "flops"):
        s = suggest(info, 3, 2, model)  # type: ignore[arg-type]
        assert cell_costs(info, s.layers, model) == s.cell_costs  # type: ignore[arg-type]


@pytest.mark.parametrize("pp,vpp", [(2, 1), (3, 1), (2, 2), (3, 2), (2, 3)])
@pytest.mark.parametrize("model", ["params", "flops"])
def test_suggestion_is_the_brute_force_split(qwen2vl_dir: Path, pp: int, vpp: int, model: str) -> None:
    """End to end on the tiny Qwen2-VL (3 ViT + 4 LLM layers): the cells, chunk-major, are the
    groups brute force picks from the per-layer costs."""
    info = inspect_hf(qwen2vl_dir)
    s = suggest(info, pp, vpp, model, vit_tokens=5, llm_tokens=3)  # type: ignore[arg-type]
    costs = [c for per in layer_costs(module_weights(info), model, {"vit": 5, "llm": 3}) for c in per]  # type: ignore[arg-type]
    _, sizes = brute_force(costs, pp * vpp)
    assert [s.layers["vit"][c][st] + s.layers["llm"][c][st] for c in range(vpp) for st in range(pp)] == sizes
    assert [cost for chunk in s.cell_costs for cost in chunk] == _sums(costs, sizes)
    assert s.stage_costs == [sum(s.cell_costs[c][st] for c in range(vpp)) for st in range(pp)]


def _leximax(costs: list[int], parts: int) -> tuple[int, ...]:
    """The best sorted group sums by memoised recursion over (start, groups): independent of
    engine.planning.balance, checked against brute force below, fast enough for 112 layers in 16 cells."""
    from functools import cache

    prefix = [0]
    for c in costs:
        prefix.append(prefix[-1] + c)

    @cache
    def best(i: int, j: int) -> tuple[int, ...] | None:
        if j == 0:
            return () if i == len(costs) else None
        found = None
        for e in range(i + 1, len(costs) - j + 2):
            rest = best(e, j - 1)
            if rest is not None:
                cand = tuple(sorted((prefix[e] - prefix[i], *rest), reverse=True))
                found = cand if found is None or cand < found else found
        return found

    out = best(0, parts)
    assert out is not None
    return out


def test_leximax_oracle_agrees_with_brute_force() -> None:
    rng = random.Random(3)
    for _ in range(200):
        n = rng.randint(1, 10)
        costs = [rng.randint(1, 9) for _ in range(n)]
        parts = rng.randint(1, n)
        assert list(_leximax(costs, parts)) == brute_force(costs, parts)[0], (costs, parts)


@pytest.fixture(scope="module")
def qwen2vl_72b(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Qwen2-VL-72B's shapes, headers only (the bench generator; data left as holes)."""
    from tests.engine.test_memory import _generator

    out = tmp_path_factory.mktemp("qwen2vl-72b")
    _generator().write_checkpoint(out, "72b", sparse=True)
    return out


def test_72b_flops_split_is_even(qwen2vl_72b: Path) -> None:
    """PP8/VPP2 under FLOPs: minimising the largest cell alone gave ViT [[1,1,30,0,...]], two
    cells holding one small ViT layer each beside cells of six LLM layers. The most even split
    keeps the ViT together and gives every cell 4-6 LLM layers."""
    info = inspect_hf(qwen2vl_72b)
    s = suggest(info, 8, 2, "flops")
    costs = [c for per in layer_costs(module_weights(info), "flops", {"vit": 1024, "llm": 4096}) for c in per]
    cells = [c for chunk in s.cell_costs for c in chunk]
    assert tuple(sorted(cells, reverse=True)) == _leximax(costs, 16)
    assert s.layers == {
        "vit": [[32, 0, 0, 0, 0, 0, 0, 0], [0] * 8],
        "llm": [[5, 5, 5, 5, 5, 5, 5, 5], [5, 5, 5, 5, 5, 5, 6, 4]],
    }
    # the lopsided split has the same largest cell: only the evenness differs
    lopsided = ParallelConfig(
        vit_pp_layers=[[1, 1, 30, 0, 0, 0, 0, 0], [0] * 8],
        llm_pp_layers=[[0, 0, 4, 6, 6, 6, 6, 6], [6, 6, 6, 6, 6, 6, 6, 4]],
    )
    old = [c for chunk in cell_costs(info, lopsided.given(), "flops") for c in chunk]
    assert max(old) == max(cells) and sorted(cells, reverse=True) < sorted(old, reverse=True)
    # with VPP each stage's total is the sum of its chunks
    assert s.stage_costs == [s.cell_costs[0][st] + s.cell_costs[1][st] for st in range(8)]


def test_token_counts_set_the_flops(qwen2vl_dir: Path) -> None:
    """One stage: 2 FLOPs per parameter per token, ViT parameters (with the projector) at the
    image patches, LLM parameters but the embedding table at the text tokens."""
    from safetensors import safe_open

    vit = llm = embed = 0
    for f in sorted(qwen2vl_dir.glob("*.safetensors")):
        with safe_open(str(f), "pt") as sf:
            for name in sf.keys():  # noqa: SIM118 (safe_open is not a dict)
                n = 1
                for d in sf.get_slice(name).get_shape():
                    n *= d
                if name.startswith(("visual.", "model.visual.")):
                    vit += n
                elif name.endswith("embed_tokens.weight"):
                    embed += n
                else:
                    llm += n
    info = inspect_hf(qwen2vl_dir)
    layers = {"vit": [[3]], "llm": [[4]]}
    assert embed > 0 and cell_costs(info, layers, "params") == [[vit + llm + embed]]
    for vt, lt in ((1, 1), (1024, 4096), (7, 1)):
        assert cell_costs(info, layers, "flops", vit_tokens=vt, llm_tokens=lt) == [[2 * vt * vit + 2 * lt * llm]]
        assert suggest(info, 1, 1, "flops", vit_tokens=vt, llm_tokens=lt).stage_costs == [2 * vt * vit + 2 * lt * llm]


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"vit_tokens": 0}, "vit_tokens = 0: give the image patches per sample as a whole number >= 1"),
        ({"llm_tokens": -5}, "llm_tokens = -5: give the text tokens per sample as a whole number >= 1"),
        ({"llm_tokens": 1.5}, "llm_tokens = 1.5: give the text tokens per sample as a whole number >= 1"),
        ({"vit_tokens": True}, "vit_tokens = True: give the image patches per sample as a whole number >= 1"),
        ({"vit_tokens": "1024"}, "vit_tokens = '1024': give the image patches per sample as a whole number >= 1"),
        ({"model": "time"}, "cost model 'time' is unknown; use one of: params, flops"),
    ],
)
def test_bad_cost_settings_are_refused(qwen2vl_dir: Path, kwargs: dict, message: str) -> None:
    info = inspect_hf(qwen2vl_dir)
    with pytest.raises(ConvertError) as e:
        suggest(info, 2, **kwargs)
    assert str(e.value) == message
    with pytest.raises(ConvertError) as e:
        cell_costs(info, {"vit": [[3, 0]], "llm": [[1, 3]]}, **kwargs)
    assert str(e.value) == message


@pytest.mark.parametrize(
    "pp,vpp,message",
    [
        (0, 1, "pp = 0: give the pipeline stages as a whole number >= 1"),
        (2, 0, "vpp = 0: give the virtual-pipeline chunks per stage as a whole number >= 1"),
        (2, -1, "vpp = -1: give the virtual-pipeline chunks per stage as a whole number >= 1"),
    ],
)
def test_bad_stage_counts_are_refused(qwen2vl_dir: Path, pp: int, vpp: int, message: str) -> None:
    with pytest.raises(ConvertError) as e:
        suggest(inspect_hf(qwen2vl_dir), pp, vpp)
    assert str(e.value) == message


@pytest.mark.parametrize(
    "n,flops,params",
    [
        (0, "0 FLOP", "0 params"),
        (999, "999 FLOP", "999 params"),
        (1000, "1.000 kFLOP", "1.000 k params"),
        (2_304_000, "2.304 MFLOP", "2.304 M params"),
        (12_345_678, "12.35 MFLOP", "12.35 M params"),
        (512_000_000_000, "512.0 GFLOP", "512.0 B params"),
        (14_750_000_000_000, "14.75 TFLOP", "14.75 T params"),
        (3 * 10**18, "3.000 EFLOP", "3000000.0 T params"),
    ],
)
def test_costs_are_shown_in_a_unit_that_shows_them(n: int, flops: str, params: str) -> None:
    assert format_cost(n, "flops") == flops
    assert format_cost(n, "params") == params


def test_chunk_costs_take_the_unit_of_their_stage() -> None:
    assert cost_number(35_950_000_000_000, "flops", 73_330_000_000_000) == "35.95"
    assert cost_number(40_000_000, "flops", 73_330_000_000_000) == "0.000"  # shown as part of a TFLOP total
    assert cost_number(999, "params", 1500) == "0.999"


def _suggest_cli(*args: str) -> subprocess.CompletedProcess:
    from tests.test_cli import BIN

    env = {**os.environ, "COLUMNS": "200"}  # no wrapping: lines are compared whole
    return subprocess.run([str(BIN / "mmtui"), "suggest", *args], capture_output=True, text=True, env=env)


def test_suggest_command_line_shows_tiny_costs_and_stage_totals(qwen2vl_dir: Path) -> None:
    """A tiny model's FLOPs read in a unit that shows them; with VPP each stage row has its
    chunks' costs and their total."""
    info = inspect_hf(qwen2vl_dir)
    r = _suggest_cli(str(qwen2vl_dir), "--pp", "2", "--vpp", "2", "--cost", "flops", "--vit-tokens", "16")
    assert r.returncode == 0, r.stderr
    assert "TFLOP" not in r.stdout and "0.00" not in r.stdout
    s = suggest(info, 2, 2, "flops", vit_tokens=16)
    rows = [line.split() for line in r.stdout.splitlines()[1:3]]
    for st, row in enumerate(rows):
        c0, c1 = s.cell_costs[0][st], s.cell_costs[1][st]
        total = format_cost(c0 + c1, "flops")
        assert row[:6] == [str(st), f"{s.layers['vit'][0][st]}+{s.layers['vit'][1][st]}",
                           f"{s.layers['llm'][0][st]}+{s.layers['llm'][1][st]}",
                           cost_number(c0, "flops", c0 + c1), "+", cost_number(c1, "flops", c0 + c1)]  # fmt: skip
        assert " ".join(row[6:8]) == total and total.endswith(("kFLOP", "MFLOP", "GFLOP"))
    assert "(16 image patches, 4096 text tokens)" in r.stdout


@pytest.mark.parametrize(
    "args,message",
    [
        (["--pp", "0"], "mmtui suggest: error: argument --pp: '0' is not a whole number >= 1"),
        (["--pp", "2", "--vpp", "x"], "mmtui suggest: error: argument --vpp: 'x' is not a whole number >= 1"),
        (["--pp", "2", "--vit-tokens", "0"], "mmtui suggest: error: argument --vit-tokens: '0' is not a whole number >= 1"),
        (["--pp", "2", "--llm-tokens", "-3"], "mmtui suggest: error: argument --llm-tokens: '-3' is not a whole number >= 1"),
        (["--pp", "2", "--vit", "5"], "mmtui suggest: error: unrecognized arguments: --vit 5"),  # no abbreviations
        (["--pp", "2", "--cost", "time"], "mmtui suggest: error: argument --cost: invalid choice: 'time' (choose from "),
    ],
)  # fmt: skip
def test_suggest_command_line_bad_values(qwen2vl_dir: Path, args: list[str], message: str) -> None:
    r = _suggest_cli(str(qwen2vl_dir), *args)
    assert (r.returncode, r.stdout, len(r.stderr.splitlines())) == (2, "", 1)
    assert r.stderr.startswith(message) and (r.stderr == message + "\n" or message.endswith("from "))
