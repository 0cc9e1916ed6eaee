"""`mmtui verify A B`: are two checkpoints the same model? Any mix of HF and Megatron layouts.

Exit 0 when every tensor is identical (or within --atol) and, with --logits, the logits
agree within --logits-atol; 1 when not; 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .cli_args import StrictParser
from .readable import readable

# the flags verify took first, kept working unlisted: old spelling -> ParallelConfig field
OLD_FLAGS = {
    "tp": "tp_size",
    "llm-pp-layers": "llm_pp_layers",
    "vit-pp-layers": "vit_pp_layers",
    "ep": "ep_size",
    "noop-layers": "noop_layers",
    "vocab-divisible-by": "make_vocab_size_divisible_by",
}


def _layout(args: argparse.Namespace, side: str):
    """Side A's or B's layout from `--a.FIELD VALUE` (mm-convert's parallel_config fields), or None."""
    from pydantic import ValidationError

    from engine.errors import ConvertError
    from engine.layout import ParallelConfig

    given = {f: _value(v) for f in ParallelConfig.model_fields if (v := getattr(args, f"{side}__{f}")) is not None}
    if not given:
        return None
    try:
        return ParallelConfig(**given)
    except ValidationError as e:
        err = e.errors()[0]
        field = str(err["loc"][0]) if err["loc"] else ""
        shown = f" = {given[field]!r}" if field in given else ""
        raise ConvertError(f"--{side}.{field}{shown}: {err['msg']}") from None


def _value(raw: str) -> object:
    """`2`, `[[1,3]]`: JSON as on mm-convert's command line; anything else is left for the schema to refuse."""
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def parse_args(argv: list[str]) -> argparse.Namespace:
    from engine.layout import ParallelConfig

    p = StrictParser(
        prog="mmtui verify",
        description="Compare two checkpoints tensor by tensor in canonical naming (HF or Megatron/MindSpeed). "
        "A Megatron side's layout takes mm-convert's parallel_config fields: --b.tp_size 2 --b.llm_pp_layers "
        "[[1,3]] is --cfg.parallel_config.tp_size 2 --cfg.parallel_config.llm_pp_layers [[1,3]].",
    )
    p.add_argument("a", type=Path, help="an HF directory or a Megatron checkpoint directory")
    p.add_argument("b", type=Path, help="the other checkpoint")
    p.add_argument("--hf-dir", type=Path, help="HF directory for config.json when neither side is HF")
    for side in ("a", "b"):
        group = p.add_argument_group(f"layout of {side.upper()} when it is Megatron (mm-convert's parallel_config)")
        for name, field in ParallelConfig.model_fields.items():
            default = "" if field.default is None or field.is_required() else f" (default: {field.default})"
            text = readable(field.rebuild_annotation()) + default
            group.add_argument(f"--{side}.{name}", dest=f"{side}__{name}", metavar="VALUE", help=text)
        group.add_argument(
            f"--{side}.transformer_impl",
            dest=f"{side}__transformer_impl",
            choices=["local", "transformer_engine"],
            help="the names its norms are saved under (transformer_engine: TE's fused layer_norm_weight); "
            "default: read from the disk",
        )
        for old, name in OLD_FLAGS.items():
            p.add_argument(f"--{side}-{old}", dest=f"{side}__{name}", help=argparse.SUPPRESS)
    p.add_argument("--atol", type=float, default=0.0, help="accept differences up to this absolute value")
    p.add_argument("--all", action="store_true", help="list equal tensors too")
    p.add_argument(
        "--logits",
        action="store_true",
        help="also run both sides (HF in transformers, Megatron in megatron-core, CPU, fp32) and compare logits",
    )
    p.add_argument("--logits-atol", type=float, default=1e-4, help="largest accepted |logit A - logit B|")
    p.add_argument("--tokens", metavar="JSON", help="token ids for --logits, e.g. [1,2,3]; default: 16 fixed ids")
    return p.parse_args(argv)


def _logits_diff(args: argparse.Namespace, info) -> tuple[float, str]:
    """max |A - B| of the two sides' logits, and what was compared."""
    from mmtui.logits import default_tokens, hf_logits, mm_logits

    vocab = info.field_int("vocab_size")
    tokens = json.loads(args.tokens) if args.tokens else default_tokens(vocab)
    if not (isinstance(tokens, list) and tokens and all(isinstance(t, int) and 0 <= t < vocab for t in tokens)):
        raise ValueError(f"--tokens {args.tokens}: give a JSON list of token ids in 0..{vocab - 1}")
    out = []
    for side, path in (("a", args.a), ("b", args.b)):
        layout = _layout(args, side)
        megatron = (path / "latest_checkpointed_iteration.txt").is_file()
        out.append(mm_logits(info, path, layout, tokens) if megatron else hf_logits(path, tokens))
    a, b = out
    if a.shape != b.shape:
        raise ValueError(f"logits shapes differ: A {tuple(a.shape)}, B {tuple(b.shape)}")
    return float((a - b).abs().max()), f"{len(tokens)} tokens x {vocab} vocabulary"


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    from rich.console import Console
    from rich.table import Table

    from engine.errors import ConvertError
    from engine.run.verify import compare, identical, open_side, status_counts
    from engine.source.hf_source import inspect_hf

    console = Console()
    try:
        hf = args.hf_dir or next(
            (p for p in (args.a, args.b) if not (p / "latest_checkpointed_iteration.txt").is_file()), None
        )
        info = inspect_hf(hf) if hf else None
        layouts = {side: _layout(args, side) for side in "ab"}  # None: the layout on disk
        a = open_side(args.a, info, layouts["a"], "A", args.a__transformer_impl)
        b = open_side(args.b, info, layouts["b"], "B", args.b__transformer_impl)
    except ConvertError as e:
        print(f"mmtui verify: error: {e}", file=sys.stderr)
        sys.exit(2)
    rows = list(compare(a, b, atol=args.atol))
    table = Table("tensor", "result", "max |A-B|", "note", box=None)
    for r in rows:
        if r.status == "equal" and not args.all:
            continue
        diff = "" if r.max_abs_diff is None else f"{r.max_abs_diff:.3g}"
        color = {"equal": "green", "close": "yellow"}.get(r.status, "red")
        table.add_row(r.name, f"[{color}]{r.status}[/]", diff, r.detail)
    if table.row_count:
        console.print(table)
    summary = status_counts(rows)
    ok = identical(rows, args.atol)
    console.print(f"{'[green]identical' if ok else '[red]different'}[/]: {len(rows)} tensors ({summary})")
    if args.logits:
        try:
            diff, what = _logits_diff(args, info)
        except (ConvertError, ValueError) as e:
            print(f"mmtui verify: error: {e}", file=sys.stderr)
            sys.exit(2)
        close = diff <= args.logits_atol
        ok = ok and close
        verdict = "[green]logits agree" if close else "[red]logits differ"
        console.print(f"{verdict}[/]: max |A-B| = {diff:.3g} over {what} (--logits-atol {args.logits_atol:g})")
    sys.exit(0 if ok else 1)
