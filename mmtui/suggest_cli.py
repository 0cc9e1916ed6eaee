"""`mmtui suggest HF_DIR --pp N`: the balanced pipeline split, its stage costs, and the flags to use it."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .cli_args import StrictParser


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = StrictParser(
        prog="mmtui suggest",
        description="Suggest per-stage layer counts that minimise the most expensive pipeline stage.",
    )
    p.add_argument("hf_dir", type=Path, help="a Hugging Face model directory (metadata is all that is read)")
    p.add_argument("--pp", type=int, required=True, help="pipeline stages")
    p.add_argument("--vpp", type=int, default=1, help="virtual-pipeline chunks per stage")
    p.add_argument("--cost", choices=["params", "flops"], default="params", help="cost model (default: params)")
    p.add_argument("--vit-tokens", type=int, default=1024, help="image patches per sample (flops model)")
    p.add_argument("--llm-tokens", type=int, default=4096, help="text tokens per sample (flops model)")
    return p.parse_args(argv)


def human(cost: int, model: str) -> str:
    return f"{cost / 1e9:.3f} B params" if model == "params" else f"{cost / 1e12:.2f} TFLOP"


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    from rich.console import Console
    from rich.table import Table

    from engine.balance import suggest
    from engine.errors import ConvertError
    from engine.hf_source import inspect_hf

    from .widgets.format import bar

    try:
        info = inspect_hf(args.hf_dir)
        s = suggest(info, args.pp, args.vpp, args.cost, args.vit_tokens, args.llm_tokens)
    except ConvertError as e:
        print(f"mmtui suggest: error: {e}", file=sys.stderr)
        sys.exit(2)
    console = Console()
    names = [m.name for m in info.preset.modules]
    table = Table("stage", *(f"{n} layers" for n in names), "cost", "", box=None)
    top = max(s.stage_costs)
    for st, cost in enumerate(s.stage_costs):
        counts = ["+".join(str(s.layers[n][c][st]) for c in range(args.vpp)) for n in names]
        table.add_row(str(st), *counts, human(cost, args.cost), bar(cost / top, 24))
    console.print(table)
    model = "parameters per stage" if args.cost == "params" else "forward FLOPs per sample and stage"
    console.print(f"cost model: {model}; largest stage / mean = {s.imbalance:.3f}")
    for n in names:
        console.print(f"--cfg.parallel_config.{n}_pp_layers {json.dumps(s.layers[n], separators=(',', ':'))}")
