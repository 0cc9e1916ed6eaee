"""`mmtui [HF_DIR] | --demo | --replay JOB [--cfg.FIELD VALUE ...] | verify A B | suggest HF_DIR --pp N`.

Torch and the engine are imported lazily so the first screen appears fast.
"""

from __future__ import annotations

import argparse
import sys

from .cli_args import StrictParser, fail


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = StrictParser(prog="mmtui", description="Workbench for Megatron / MindSpeed checkpoint conversion.")
    p.add_argument("hf_dir", nargs="?", help="a Hugging Face model directory to open")
    p.add_argument(
        "--replay",
        metavar="JOB",
        help="run a job file (TOML or YAML) headless and exit, as `mm-convert --config JOB` does; "
        "mm-convert's options may follow it (--cfg.overwrite true, --print_config, ...), and --part i/N "
        "(--cfg.part) to run one part of a job split over Slurm array tasks or torchrun ranks",
    )
    p.add_argument("--demo", action="store_true", help="open a tiny generated Qwen2-VL checkpoint")
    p.epilog = (
        "Also: mmtui verify A B [...] compares two checkpoints (mmtui verify -h); "
        "mmtui suggest HF_DIR --pp N suggests a balanced pipeline split (mmtui suggest -h)."
    )
    return p.parse_args(argv)


def _replay(argv: list[str]) -> list[str] | None:
    """`--replay JOB ...` (the job and mm-convert's options after it), or None."""
    for i, a in enumerate(argv):
        if a == "--replay":
            if i + 1 >= len(argv):
                fail("mmtui", "argument --replay: expected one argument (a job file)")
            head, job, rest = argv[:i], argv[i + 1], argv[i + 2 :]
        elif a.startswith("--replay="):
            head, job, rest = argv[:i], a.partition("=")[2], argv[i + 1 :]
        else:
            continue
        if head:
            fail("mmtui", f"--replay runs a job file alone; {' '.join(head)} does not go with it")
        return ["--config", job, *_part_flags(rest)]
    return None


def _part_flags(rest: list[str]) -> list[str]:
    """`--part i/N` after the job: its `--cfg.part` (one part of a job split over processes or nodes)."""
    out = []
    for a in rest:
        if a == "--part":
            out.append("--cfg.part")
        elif a.startswith("--part="):
            out.append("--cfg.part=" + a.partition("=")[2])
        else:
            out.append(a)
    return out


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
    replay = _replay(argv)
    if replay is not None:
        from .convert_cli import main as convert

        convert(replay, prog="mmtui")
        return
    args = parse_args(argv)
    from .app import run_app

    run_app(hf_dir=args.hf_dir, demo=args.demo)


if __name__ == "__main__":
    main()
