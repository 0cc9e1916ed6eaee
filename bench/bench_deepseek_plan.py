"""Plan a DeepSeek-V3-671B-shaped checkpoint from its headers: inspect, plan, plan check, peak RSS.

python bench/make_deepseek_v3.py /tmp/dsv3-671b        # sparse: headers only
python bench/bench_deepseek_plan.py /tmp/dsv3-671b     # TP 8 / PP 16 / EP 64, vocabulary padded
python bench/bench_deepseek_plan.py /tmp/dsv3-671b --pp 8 --ep 8
python bench/bench_deepseek_plan.py /tmp/dsv3-671b --moe-grouped-gemm legacy --expert-tp-size 1

Each step's wall and CPU time: on a busy machine the CPU time is the work itself.
"""

from __future__ import annotations

import argparse
import itertools
import resource
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("hf_dir", type=Path)
    ap.add_argument("--tp", type=int, default=8)
    ap.add_argument("--pp", type=int, default=16)
    ap.add_argument("--ep", type=int, default=64)
    ap.add_argument("--moe-grouped-gemm", choices=["legacy", "te"], default=None)
    ap.add_argument("--expert-tp-size", type=int, default=None)
    args = ap.parse_args()
    marks = [(time.perf_counter(), time.process_time())]

    def mark() -> None:
        marks.append((time.perf_counter(), time.process_time()))

    from engine.layout import ParallelConfig
    from engine.planning.balance import suggest
    from engine.planning.build import build_plan
    from engine.planning.check import check_plan
    from engine.source.hf_source import inspect_hf

    mark()
    info = inspect_hf(args.hf_dir)
    mark()
    layers = suggest(info, args.pp).layers["llm"]
    layout = ParallelConfig(
        tp_size=args.tp, ep_size=args.ep, llm_pp_layers=layers, make_vocab_size_divisible_by=128,
        moe_grouped_gemm=args.moe_grouped_gemm or False, expert_tp_size=args.expert_tp_size,
    )
    plan = build_plan(info, layout)
    mark()
    problems = check_plan(plan)
    mark()
    entries = sum(len(f.entries) for f in plan.files)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    size = plan.nbytes / 1e9
    print(f"{len(info.tensors)} source tensors -> {len(plan.files)} files, {entries} entries, {size:.1f} GB")
    print(f"TP {args.tp} / PP {args.pp} {layers} / EP {args.ep}")
    steps = ["import", "inspect", "suggest + plan", "check"]
    for name, ((w0, c0), (w1, c1)) in zip(steps, itertools.pairwise(marks), strict=True):
        print(f"{name:15} {w1 - w0:6.2f} s wall {c1 - c0:6.2f} s CPU")
    print(f"{'total':15} {marks[-1][0] - marks[0][0]:6.2f} s wall {marks[-1][1] - marks[0][1]:6.2f} s CPU")
    print(f"plan problems {len(problems)}, peak RSS {rss:.0f} MB")


if __name__ == "__main__":
    main()
