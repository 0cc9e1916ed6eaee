"""`mmtui suggest HF_DIR --pp N`: the balanced pipeline split, its stage costs, the flags to use
it, and (with --dp / --device-gb) the training memory every rank of that layout needs.

Exit 0; 1 when --device-gb is given and the layout fits with neither optimizer; 2 on bad input (one line).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from .cli_args import StrictParser

if TYPE_CHECKING:
    from rich.console import Console

    from engine.planning.balance import Suggestion
    from engine.planning.train_memory import RankMemory


def _whole(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1")
    return int(text)


def _gib(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"{text!r} is not a memory size in GiB (a number > 0, e.g. 64)")
    return value


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = StrictParser(
        prog="mmtui suggest",
        allow_abbrev=False,
        description="Suggest per-stage layer counts that minimise the most expensive pipeline stage "
        "(the most even split among those), and the training memory per rank it implies.",
    )
    p.add_argument("hf_dir", type=Path, help="a Hugging Face model directory (metadata is all that is read)")
    p.add_argument("--pp", type=_whole, required=True, help="pipeline stages")
    p.add_argument("--vpp", type=_whole, default=1, help="virtual-pipeline chunks per stage (default 1)")
    p.add_argument("--cost", choices=["params", "flops"], default="params", help="cost model (default: params)")
    p.add_argument("--vit-tokens", type=_whole, default=1024, help="image patches per sample (flops; default 1024)")
    p.add_argument("--llm-tokens", type=_whole, default=4096, help="text tokens per sample (flops; default 4096)")
    mem = p.add_argument_group("will it fit? (shown when --dp or --device-gb is given)")
    mem.add_argument("--tp", type=_whole, default=1, help="tensor-parallel size of the layout (default 1)")
    mem.add_argument("--ep", type=_whole, default=1, help="expert-parallel size (MoE models; default 1)")
    mem.add_argument("--dp", type=_whole, help="data-parallel size the distributed optimizer shards over (default 1)")
    mem.add_argument("--device-gb", type=_gib, metavar="GIB", help="memory of one device in GiB, e.g. 64")
    return p.parse_args(argv)


def _ranges(ranks: list[int]) -> str:
    """[0, 1, 2, 3, 5] -> "0-3,5"."""
    out, start = [], ranks[0]
    for a, b in zip(ranks, [*ranks[1:], None], strict=True):
        if b != a + 1:
            out.append(str(start) if start == a else f"{start}-{a}")
            start = b if b is not None else a
    return ",".join(out)


def _print_split(console: Console, info_modules: list[str], s: Suggestion, args: argparse.Namespace) -> None:
    from rich.table import Table

    from engine.planning.balance import cost_number, format_cost

    from .widgets.format import bar

    table = Table("stage", *(f"{n} layers" for n in info_modules), box=None)
    if args.vpp > 1:
        table.add_column("chunk costs")
    table.add_column("stage cost")
    table.add_column("")
    top = max(s.stage_costs) or 1
    for st, cost in enumerate(s.stage_costs):
        counts = ["+".join(str(s.layers[n][c][st]) for c in range(args.vpp)) for n in info_modules]
        chunks = [" + ".join(cost_number(cells[st], args.cost, cost) for cells in s.cell_costs)] if args.vpp > 1 else []
        table.add_row(
            str(st), *counts, *chunks, format_cost(cost, args.cost), bar(cost / top, 24 if args.vpp == 1 else 16)
        )
    console.print(table)
    model = "parameters per stage" if args.cost == "params" else "forward FLOPs per sample and stage"
    if args.cost == "flops":
        model += f" ({args.vit_tokens} image patches, {args.llm_tokens} text tokens)"
    console.print(f"cost model: {model}")
    console.print(f"largest stage / mean = {s.imbalance:.3f}")
    for n in info_modules:
        console.print(f"--cfg.parallel_config.{n}_pp_layers {json.dumps(s.layers[n], separators=(',', ':'))}")


def _print_memory(
    console: Console, plain: list[RankMemory], dist: list[RankMemory], args: argparse.Namespace, dp: int
) -> bool:
    """The per-rank table and, with --device-gb, one verdict per optimizer; False when neither fits."""
    from rich.table import Table

    from engine.planning.balance import human_params
    from engine.planning.train_memory import fits, human_bytes

    if args.tp > 1:
        console.print(f"--cfg.parallel_config.tp_size {args.tp}")
    if args.ep > 1:
        console.print(f"--cfg.parallel_config.ep_size {args.ep}")
    groups: dict[tuple[int, int, int, int, int], list[int]] = {}  # a stage's ranks with equal numbers share a row
    for p, d in zip(plain, dist, strict=True):
        groups.setdefault((p.pp_rank, p.ep_rank, p.params, p.total, d.total), []).append(p.tp_rank)
    ep_col = ["EP rank"] if args.ep > 1 else []
    table = Table("stage", "TP ranks", *ep_col, "params", "18 B/param", f"6 + 12/{dp} B/param", box=None)
    for (pp, ep, params, a, b), tps in groups.items():
        ep_cell = [str(ep)] if args.ep > 1 else []
        table.add_row(str(pp), _ranges(tps), *ep_cell, human_params(params), human_bytes(a), human_bytes(b))
    console.print()
    console.print("training memory per rank, activations not included; per parameter:")
    console.print("2 B bf16 weight + 4 B fp32 grad + 12 B fp32 master weight and 2 Adam moments")
    console.print(table)
    ok = args.device_gb is None
    if args.device_gb is not None:
        for what, ranks in (("plain optimizer", plain), (f"distributed optimizer, dp {dp}", dist)):
            good, line = fits(ranks, args.device_gb)
            ok = ok or good
            console.print(f"{what}: {line}")
    return ok


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    from rich.console import Console

    from engine.errors import ConvertError
    from engine.layout import ParallelConfig
    from engine.planning.balance import suggest
    from engine.planning.train_memory import train_memories
    from engine.source.hf_source import inspect_hf

    memory = args.dp is not None or args.device_gb is not None
    dp = 1 if args.dp is None else args.dp
    try:  # everything is computed before anything is printed: a bad value prints only its error
        info = inspect_hf(args.hf_dir)
        s = suggest(info, args.pp, args.vpp, args.cost, vit_tokens=args.vit_tokens, llm_tokens=args.llm_tokens)
        if memory:
            layout = ParallelConfig(
                tp_size=args.tp, ep_size=args.ep, **{f"{m}_pp_layers": v for m, v in s.layers.items()}
            )
            plain, dist = train_memories(info, layout, dp)  # one plan for both optimizers
    except ConvertError as e:
        print(f"mmtui suggest: error: {e}", file=sys.stderr)
        sys.exit(2)
    console = Console()
    _print_split(console, [m.name for m in info.preset.modules], s, args)
    if memory and not _print_memory(console, plain, dist, args, dp):
        sys.exit(1)
