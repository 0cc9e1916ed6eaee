"""`mmtui [HF_DIR] | --demo | --replay job.toml`.

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
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.replay:
        from .runner import replay

        replay(args.replay)
        return
    from .app import run_app

    run_app(hf_dir=args.hf_dir, demo=args.demo)


if __name__ == "__main__":
    main()
