"""The conversion alone (in this process, no start-up) against `cp -r` + `sync`, alternating.

bench_convert.py times the `mm-convert` command as a user runs it; this one separates the
writer's speed from the cost of starting Python and building the job.

    python bench/bench_inprocess.py /work/bench-data/qwen2vl-2b --rounds 4
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import time
from pathlib import Path

from engine.execute import run
from engine.hf_source import inspect_hf
from engine.layout import ParallelConfig
from engine.plan import build_plan

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
    times: dict[str, list[float]] = {"cp -r + sync": [], f"convert {args.layout} (in process)": []}
    for _ in range(args.rounds):
        for name in times:
            shutil.rmtree(out, ignore_errors=True)
            subprocess.run(["sync"], check=True)
            time.sleep(1)
            start = time.perf_counter()
            if name.startswith("cp"):
                subprocess.run(["cp", "-r", str(args.hf_dir), str(out)], check=True)
                subprocess.run(["sync"], check=True)
            else:
                run(build_plan(info, LAYOUTS[args.layout]), out)  # fsyncs every file before the rename
            times[name].append(time.perf_counter() - start)
    shutil.rmtree(out, ignore_errors=True)
    for name, ts in times.items():
        print(f"{name}: median {statistics.median(ts):.2f} s ({' '.join(f'{t:.2f}' for t in ts)})")


if __name__ == "__main__":
    main()
