"""Suggest a pipeline split that makes the most expensive stage as cheap as possible.

Cost model (the caller picks one):

- ``params``: a stage costs the parameters it holds (balances weight and optimizer memory).
- ``flops``: a stage costs the forward FLOPs of one sample: 2 per parameter per token its
  module processes (``vit_tokens`` image patches, ``llm_tokens`` text tokens), except an
  embedding table, which is a lookup and costs nothing. Attention's tokens-squared term is
  left out.

What rides along with a module's first or last layer (patch or word embedding, projector,
final norm, output layer — a tied one too, since PP > 1 writes a copy) adds to that layer's
cost. The modules' layers, in model order (vision encoder, then language model), are then
cut into contiguous non-empty groups: the classic linear partition problem, solved exactly.
With VPP the groups are the (chunk, stage) cells in chunk-major order; each cell is one
step of the interleaved schedule.

Which split among those whose largest group is smallest: the most even one, meaning the
lexicographically smallest list of group costs sorted from largest down (the largest as
small as possible, then the second largest, and so on). Minimising the largest alone lets
the others be lopsided (a stage holding one small ViT layer beside a stage holding thirty).
Among splits equal in that, the one whose earlier groups hold fewer layers wins: early
stages keep more micro-batches of activations alive under 1F1B.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Literal

from ..errors import ConvertError
from ..layout import Chunks
from ..source.hf_source import ModelInfo
from .targets import ModuleWeights, module_weights

CostModel = Literal["params", "flops"]
COST_MODELS: tuple[CostModel, ...] = ("params", "flops")
VIT_TOKENS = 1024  # image patches per sample the flops model assumes unless told
LLM_TOKENS = 4096  # text tokens per sample


@dataclass(frozen=True)
class Suggestion:
    cost_model: CostModel
    layers: dict[str, Chunks]  # module name -> layer counts [chunk][stage]
    cell_costs: list[list[int]]  # [chunk][stage]

    @property
    def stage_costs(self) -> list[int]:
        return stage_costs(self.cell_costs)

    @property
    def imbalance(self) -> float:
        """Largest stage over the mean stage: 1.0 is perfect."""
        costs = self.stage_costs
        return max(costs) * len(costs) / sum(costs)


def stage_costs(cells: list[list[int]]) -> list[int]:
    """A stage runs all of its chunks: its cost is the sum over them."""
    return [sum(chunk[s] for chunk in cells) for s in range(len(cells[0]))]


def layer_costs(weights: list[ModuleWeights], model: CostModel, tokens: dict[str, int]) -> list[list[int]]:
    """Per module, the cost of each layer with the ride-along parts folded in."""
    out = []
    for w in weights:
        if not w.layers:
            out.append([])
            continue
        if model == "params":
            per, first, last = list(w.layers), w.first, w.last
        else:
            t = 2 * tokens[w.name]
            per, first, last = [n * t for n in w.layers], (w.first - w.lookup) * t, w.last * t
        per[0] += first
        per[-1] += last
        out.append(per)
    return out


def _fits(costs: list[int], limit: int) -> int:
    """Fewest contiguous groups with sums <= limit (a large number when one item exceeds it)."""
    groups, run = 1, 0
    for c in costs:
        if c > limit:
            return len(costs) + 1
        if run + c > limit:
            groups, run = groups + 1, c
        else:
            run += c
    return groups


def _largest(costs: list[int], parts: int, prefix: list[int]) -> int:
    """The smallest possible largest group sum. Feasibility is monotone in the limit and
    greedy packing decides it; the optimum is one of the contiguous sums, so a binary
    search over them is exact."""
    n = len(costs)
    candidates = sorted({prefix[j] - prefix[i] for i in range(n) for j in range(i + 1, n + 1)})
    lo, hi = 0, len(candidates) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if _fits(costs, candidates[mid]) <= parts:
            hi = mid
        else:
            lo = mid + 1
    return candidates[lo]


def _with(costs: tuple[int, ...], c: int) -> tuple[int, ...]:
    """`costs` (sorted largest first) with `c` added in its place."""
    i = bisect.bisect_left(costs, -c, key=lambda x: -x)
    return (*costs[:i], c, *costs[i:])


def partition(costs: list[int], parts: int) -> list[int]:
    """Group sizes cutting `costs` into `parts` non-empty contiguous groups: the most even of
    those whose largest sum is smallest (see the module docstring for the order).

    Adding the same group to two sorted cost lists keeps their order, so the best cut of a
    suffix into j groups extends to the best cut of a longer suffix: a dynamic programme
    over (position, groups left), each group capped at the smallest possible largest sum.
    """
    n = len(costs)
    if parts < 1 or n < parts:
        raise ConvertError(f"cannot cut {n} layers into {parts} non-empty pipeline stages")
    prefix = [0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    limit = _largest(costs, parts, prefix)
    # best[j][i]: group costs (largest first) of the best cut of costs[i:] into j groups; None if none fits
    best: list[list[tuple[int, ...] | None]] = [[None] * (n + 1) for _ in range(parts + 1)]
    best[0][n] = ()
    for j in range(1, parts + 1):
        for i in range(n - j, -1, -1):
            top = None
            for e in range(i + 1, n - j + 2):
                c = prefix[e] - prefix[i]
                if c > limit:
                    break
                rest = best[j - 1][e]
                if rest is not None:
                    cand = _with(rest, c)
                    if top is None or cand < top:
                        top = cand
            best[j][i] = top
    sizes, pos = [], 0
    for j in range(parts, 0, -1):  # the smallest first group that still reaches the optimum
        end = pos + 1
        while (rest := best[j - 1][end]) is None or _with(rest, prefix[end] - prefix[pos]) != best[j][pos]:
            end += 1
        sizes.append(end - pos)
        pos = end
    return sizes


def check_costing(model: str, vit_tokens: object, llm_tokens: object) -> None:
    """Refuse a cost model or token count that makes no sense, naming it (the CLI's flags and
    the wizard's fields both land here)."""
    if model not in COST_MODELS:
        raise ConvertError(f"cost model {model!r} is unknown; use one of: {', '.join(COST_MODELS)}")
    for name, value, what in (("vit_tokens", vit_tokens, "image patches"), ("llm_tokens", llm_tokens, "text tokens")):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConvertError(f"{name} = {value!r}: give the {what} per sample as a whole number >= 1")


def _module_costs(info: ModelInfo, model: CostModel, vit_tokens: int, llm_tokens: int) -> dict[str, list[int]]:
    """Module name -> cost of each of its layers, in model order."""
    weights = module_weights(info)
    tokens = {w.name: vit_tokens if w.name == "vit" else llm_tokens for w in weights}
    return {w.name: costs for w, costs in zip(weights, layer_costs(weights, model, tokens), strict=True)}


def _cells(costs: dict[str, list[int]], layers: dict[str, Chunks]) -> list[list[int]]:
    """Layers fill cells in chunk-major order, as the plan places them; counts beyond a
    module's layers are ignored (the layout check reports them)."""
    first = next(iter(layers.values()))
    cells = [[0] * len(first[0]) for _ in first]
    for name, per_layer in costs.items():
        pos = 0
        for c, chunk in enumerate(layers.get(name, [])):
            for s, n in enumerate(chunk):
                if c < len(cells) and s < len(cells[c]):
                    cells[c][s] += sum(per_layer[pos : pos + n])
                pos += n
    return cells


def cell_costs(
    info: ModelInfo,
    layers: dict[str, Chunks],
    model: CostModel = "params",
    vit_tokens: int = VIT_TOKENS,
    llm_tokens: int = LLM_TOKENS,
) -> list[list[int]]:
    """Cost of every (chunk, stage) cell of a given layout, under the same model `suggest` uses.

    A stage's total is the sum over its chunks: `stage_costs(cells)`."""
    check_costing(model, vit_tokens, llm_tokens)
    return _cells(_module_costs(info, model, vit_tokens, llm_tokens), layers)


def suggest(
    info: ModelInfo,
    pp: int,
    vpp: int = 1,
    model: CostModel = "params",
    vit_tokens: int = VIT_TOKENS,
    llm_tokens: int = LLM_TOKENS,
) -> Suggestion:
    """The best split of `info`'s modules over `pp` stages (and `vpp` chunks) under `model`;
    `vit_tokens` / `llm_tokens` are what one sample holds (used by the flops model)."""
    check_costing(model, vit_tokens, llm_tokens)
    for name, value, what in (("pp", pp, "pipeline stages"), ("vpp", vpp, "virtual-pipeline chunks per stage")):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConvertError(f"{name} = {value!r}: give the {what} as a whole number >= 1")
    costs = _module_costs(info, model, vit_tokens, llm_tokens)
    owners = [name for name, per_layer in costs.items() for _ in per_layer]
    sizes = partition([c for per_layer in costs.values() for c in per_layer], pp * vpp)
    layers = {name: [[0] * pp for _ in range(vpp)] for name in costs}
    pos = 0
    for cell, size in enumerate(sizes):
        c, s = divmod(cell, pp)
        for name in owners[pos : pos + size]:
            layers[name][c][s] += 1
        pos += size
    return Suggestion(model, layers, _cells(costs, layers))


_FLOP_UNITS = tuple((10**e, f"{p}FLOP") for e, p in ((18, "E"), (15, "P"), (12, "T"), (9, "G"), (6, "M"), (3, "k")))
_PARAM_UNITS = tuple((10**e, f"{p} params") for e, p in ((12, "T"), (9, "B"), (6, "M"), (3, "k")))


def scaled(n: float, units: tuple[tuple[int, str], ...], unit: str, like: float | None = None) -> tuple[str, str]:
    """(number, unit) of `n` in the largest unit it reaches (or `like` reaches), to four significant
    digits: a tiny model's stages read "2.304 MFLOP", not "0.00 TFLOP". Below the smallest unit
    it is a whole count."""
    ref = abs(n if like is None else like)
    for factor, name in units:
        if ref >= factor:
            x = n / factor
            digits = 1 if abs(x) >= 100 else 2 if abs(x) >= 10 else 3
            return f"{x:.{digits}f}", name
    return f"{round(n)}", unit


def human_flops(n: int) -> str:
    return " ".join(scaled(n, _FLOP_UNITS, "FLOP"))


def human_params(n: int) -> str:
    return " ".join(scaled(n, _PARAM_UNITS, "params"))


def format_cost(n: int, model: CostModel) -> str:
    """A cell or stage cost as people read it, in the unit of its cost model: "14.75 TFLOP", "2.153 B params"."""
    return human_flops(n) if model == "flops" else human_params(n)


def cost_number(n: int, model: CostModel, like: int) -> str:
    """`n` as a bare number in the unit `format_cost(like, model)` uses: a stage's chunk costs
    beside its total ("37.38 + 35.95" beside "73.33 TFLOP")."""
    units = _FLOP_UNITS if model == "flops" else _PARAM_UNITS
    return scaled(n, units, "", like)[0]
