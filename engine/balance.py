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
With VPP the groups are the (chunk, stage) cells in chunk-major order and the largest cell
is minimised; each cell is one step of the interleaved schedule. Among optimal splits the
one whose earlier stages are lightest wins: early stages keep more micro-batches of
activations alive under 1F1B.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .errors import ConvertError
from .hf_source import ModelInfo
from .layout import Chunks
from .plan import ModuleWeights, module_weights

CostModel = Literal["params", "flops"]
COST_MODELS: tuple[CostModel, ...] = ("params", "flops")


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


def partition(costs: list[int], parts: int) -> list[int]:
    """Group sizes cutting `costs` into `parts` non-empty contiguous groups, minimising the largest sum.

    Feasibility is monotone in the limit and greedy packing decides it; the optimum is
    one of the contiguous sums, so a binary search over them is exact.
    """
    n = len(costs)
    if parts < 1 or n < parts:
        raise ConvertError(f"cannot cut {n} layers into {parts} non-empty pipeline stages")
    prefix = [0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    candidates = sorted({prefix[j] - prefix[i] for i in range(n) for j in range(i + 1, n + 1)})
    lo, hi = 0, len(candidates) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if _fits(costs, candidates[mid]) <= parts:
            hi = mid
        else:
            lo = mid + 1
    limit = candidates[lo]
    sizes, pos = [], 0
    for left in range(parts, 0, -1):
        if left == 1:
            sizes.append(n - pos)
            break
        # the smallest first group whose remainder still fits in the groups that are left
        size = 1
        while not (n - pos - size >= left - 1 and _fits(costs[pos + size :], limit) <= left - 1):
            size += 1
        sizes.append(size)
        pos += size
    return sizes


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
    vit_tokens: int = 1024,
    llm_tokens: int = 4096,
) -> list[list[int]]:
    """Cost of every (chunk, stage) cell of a given layout, under the same model `suggest` uses."""
    return _cells(_module_costs(info, model, vit_tokens, llm_tokens), layers)


def suggest(
    info: ModelInfo,
    pp: int,
    vpp: int = 1,
    model: CostModel = "params",
    vit_tokens: int = 1024,
    llm_tokens: int = 4096,
) -> Suggestion:
    """The optimal split of `info`'s modules over `pp` stages (and `vpp` chunks) under `model`."""
    if model not in COST_MODELS:
        raise ConvertError(f"cost model {model!r} is unknown; use one of: {', '.join(COST_MODELS)}")
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
