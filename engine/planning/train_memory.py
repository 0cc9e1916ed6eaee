"""Will it fit? The weight, gradient and optimizer memory each training rank needs.

Per parameter a rank holds (Megatron-LM's accounting for bf16 training with Adam:
docs/user-guide/features/dist_optimizer.md and megatron/training/theoretical_memory_usage.py):

- 2 bytes: the bf16 weight;
- 4 bytes: its fp32 gradient (Megatron's main grad, accumulated in fp32);
- 12 bytes: the optimizer's fp32 master weight and two fp32 Adam moments.

That is 18 bytes per parameter, or with the distributed optimizer 6 + 12/d: the 12 bytes of
optimizer state are sharded over the d data-parallel ranks, while weights and gradients stay
whole. Expert weights shard their state over the expert data-parallel group instead, which
has d x TP / (EP x expert TP) ranks: d / EP when the experts are cut by TP like the rest, d x TP / EP
when every TP rank holds whole experts (expert TP 1).

The parameters come from the plan: every entry of a rank's file, in every VPP chunk, with
vocabulary padding and a tied output layer counted where the rank holds them. The dtype of
the checkpoint plays no part: training keeps bf16 weights whatever the files store.
Activations, the framework's buffers and the allocator's slack are not counted.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

from ..errors import ConvertError
from ..layout import ParallelConfig
from ..source.hf_source import ModelInfo
from .build import build_plan
from .experts import is_expert_key
from .plan import Plan

WEIGHT_BYTES = 2  # bf16 weight
GRAD_BYTES = 4  # fp32 main gradient
OPTIMIZER_BYTES = 12  # fp32 master weight + two fp32 Adam moments
GIB = 1 << 30


@dataclass(frozen=True)
class RankMemory:
    """Training memory of one (TP, PP, EP) rank, in bytes (activations excluded)."""

    tp_rank: int
    pp_rank: int
    ep_rank: int
    label: str  # the rank's directory name, e.g. mp_rank_01_003
    params: int  # parameters the rank holds
    expert_params: int  # of them, expert weights sharded by EP > 1 (their optimizer state over dp / ep); 0 at EP 1
    weights: int
    grads: int
    optimizer: int

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.optimizer


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _expert_sources(plan: Plan, ep: int) -> set[str]:
    """Source tensors only some EP ranks read: the experts. Dense weights are in every EP rank's file.
    `ep` 0: the routed experts by their names (with expert TP 1 their optimizer state is sharded apart even at EP 1)."""
    if ep == 0:
        return {src for f in plan.files for e in f.entries if is_expert_key(e.key) for src in e.sources}
    if ep == 1:
        return set()
    readers: dict[tuple[int, int, str], set[int]] = {}
    for f in plan.files:
        for e in f.entries:
            for p in e.pieces:  # not e.sources: this runs for every piece of a 671B plan
                readers.setdefault((f.tp_rank, f.pp_rank, p.source), set()).add(f.ep_rank)
    return {src for (_, _, src), ranks in readers.items() if len(ranks) < ep}


def train_memory(
    plan_or_info: Plan | ModelInfo,
    layout: ParallelConfig,
    dp: int = 1,
    distributed_optimizer: bool = False,
) -> list[RankMemory]:
    """Weight, gradient and optimizer bytes of every rank of `layout`, in the plan's file order.

    `plan_or_info` is a plan of Megatron rank files for `layout` (as `build_plan` makes it) or
    the model, whose plan is then built (metadata only). `dp` is Megatron's data-parallel size
    (world size / (TP x PP)); it matters only with `distributed_optimizer`, and with experts
    it must be a multiple of EP. A shard of optimizer state is rounded up to whole parameters.
    """
    plain, dist = train_memories(plan_or_info, layout, dp)
    return dist if distributed_optimizer else plain


def train_memories(
    plan_or_info: Plan | ModelInfo, layout: ParallelConfig, dp: int = 1
) -> tuple[list[RankMemory], list[RankMemory]]:
    """`train_memory` with the plain and with the distributed optimizer, counting the plan once (a 671B plan at
    EP 64 has 650,000 entries)."""
    if isinstance(dp, bool) or not isinstance(dp, int) or dp < 1:
        raise ConvertError(f"dp = {dp!r}: give the data-parallel size as a whole number >= 1")
    ep, etp = layout.ep_size, layout.etp
    whole = layout.tp_size // etp  # TP ranks holding the same experts: 1, or TP with expert TP 1
    if dp * whole % ep:
        group = "dp / ep" if whole == 1 else f"dp x {whole} / ep"
        raise ConvertError(
            f"dp = {dp}: with ep_size {ep} the data-parallel size must be a multiple of {ep // math.gcd(ep, whole)} "
            f"(the expert data-parallel group has {group} ranks)"
        )
    edp = dp * whole // ep
    plan = build_plan(plan_or_info, layout) if isinstance(plan_or_info, ModelInfo) else plan_or_info
    want = {(t, p, e) for t in range(layout.tp_world) for p in range(layout.pp_size) for e in range(ep)}
    ranks = [(f.tp_rank, f.pp_rank, f.ep_rank) for f in plan.files if f.kind == "torch"]
    if set(ranks) != want or len(plan.files) != len(want):
        other = Counter(f.kind for f in plan.files if f.kind != "torch")
        also = "".join(f" and {n} {kind} file(s)" for kind, n in sorted(other.items()))
        raise ConvertError(
            f"the plan does not match the layout: it holds {len(ranks)} Megatron rank file(s){also}, "
            f"TP {layout.tp_world} x PP {layout.pp_size} x EP {ep} has {len(want)}; give the plan built for this layout"
        )
    experts = _expert_sources(plan, ep if etp == layout.tp_size else 0)
    plain, dist = [], []
    for f in plan.files:
        params = expert = 0
        for e in f.entries:
            params += e.numel
            if experts and any(p.source in experts for p in e.pieces):
                expert += e.numel
        dense = params - expert
        for out, optimizer in (
            (plain, OPTIMIZER_BYTES * params),
            (dist, OPTIMIZER_BYTES * (_ceil_div(dense, dp) + _ceil_div(expert, edp))),
        ):
            out.append(
                RankMemory(
                    tp_rank=f.tp_rank,
                    pp_rank=f.pp_rank,
                    ep_rank=f.ep_rank,
                    label=f.dir_name,
                    params=params,
                    expert_params=expert,
                    weights=WEIGHT_BYTES * params,
                    grads=GRAD_BYTES * params,
                    optimizer=optimizer,
                )
            )
    return plain, dist


def human_bytes(n: int) -> str:
    """Binary units, as device memory is sold and reported (a "64 GB" card has 64 GiB)."""
    for factor, name in ((1 << 40, "TiB"), (GIB, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if n >= factor:
            x = n / factor
            return f"{x:.{1 if x >= 10 else 2}f} {name}"
    return f"{n} B"


def fits(ranks: list[RankMemory], device_gib: float) -> tuple[bool, str]:
    """Whether the largest rank fits a device of `device_gib` GiB, and a line that says so:
    "fits on 64 GiB: 51.2 GiB / rank at most" or "does not fit on 64 GiB: mp_rank_00_000 needs 70.1 GiB"."""
    if isinstance(device_gib, bool) or not isinstance(device_gib, int | float) or not 0 < device_gib < math.inf:
        raise ConvertError(f"device memory = {device_gib!r}: give the device's memory in GiB, a number > 0")
    top = max(ranks, key=lambda r: r.total)
    device = f"{device_gib:g} GiB"
    if top.total <= device_gib * GIB:
        return True, f"fits on {device}: {human_bytes(top.total)} / rank at most"
    return False, f"does not fit on {device}: {top.label} needs {human_bytes(top.total)}"
