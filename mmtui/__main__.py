"""`mmtui [HF_DIR] | --demo | --replay job.toml | verify A B | suggest HF_DIR --pp N`.

Torch and the engine are imported lazily so the first screen appears fast.
"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="mmtui", description="Workbench for Megatron / MindSpeed checkpoint conversion.")
    p.add_argument("hf_dir", nargs="?", help="a Hugging Face model directory to open")
    p.add_argument("--replay", metavar="JOB", help="run a saved job (TOML or YAML) headless and exit")
    p.add_argument("--demo", action="store_true", help="open a tiny generated Qwen2-VL checkpoint")
    p.epilog = (
        "Also: mmtui verify A B [...] compares two checkpoints (mmtui verify -h); "
        "mmtui suggest HF_DIR --pp N suggests a balanced pipeline split (mmtui suggest -h)."
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["verify"]:
        from .verify_cli import main as verify

        verify(argv[1:])
        return
    if argv[:1] == ["suggest"]:
        from .suggest_cli import main as suggest

        suggest(argv[1:])
        return
    args = parse_args(argv)
    if args.replay:
        from .runner import replay

        replay(args.replay)
        return
    from .app import run_app

    run_app(hf_dir=args.hf_dir, demo=args.demo)


if __name__ == "__main__":
    main()
