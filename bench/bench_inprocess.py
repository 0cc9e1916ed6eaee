"""The conversion alone (in this process, no start-up) against `cp -r` + `sync`, alternating.

bench_convert.py times the `mm-convert` command as a user runs it; this one separates the
writer's speed from the cost of starting Python and building the job.

    python bench/bench_inprocess.py /work/bench-data/qwen2vl-2b --rounds 4
"""

from __future__ import annotations

import argparse
from pathlib import Path

from alternate import alternate, copy_and_sync

from engine.layout import ParallelConfig
from engine.planning.build import build_plan
from engine.run.execute import run
from engine.source.hf_source import inspect_hf

LAYOUTS = {
    "tp1pp1": ParallelConfig(tp_size=1, llm_pp_layers=[[28]], vit_pp_layers=[[32]]),
    "tp2pp4": ParallelConfig(tp_size=2, llm_pp_layers=[[1, 9, 9, 9]], vit_pp_layers=[[32, 0, 0, 0]]),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("hf_dir", type=Path)
    ap.add_argument("--work", type=Path, default=Path("/work/bench-data/run"))
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--layout", choices=LAYOUTS, default="tp1pp1")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    out = args.work / "inprocess"
    info = inspect_hf(args.hf_dir)
    alternate(
        {
            "cp -r + sync": lambda: copy_and_sync(args.hf_dir, out),
            f"convert {args.layout} (in process)": lambda: run(build_plan(info, LAYOUTS[args.layout]), out),
        },
        out,
        args.rounds,
    )  # the conversion fsyncs every file before its rename


if __name__ == "__main__":
    main()
