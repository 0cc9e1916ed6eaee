"""Plan a DeepSeek-V3-671B-shaped checkpoint from its headers: inspect, plan, plan check, peak RSS.

python bench/make_deepseek_v3.py /tmp/dsv3-671b        # sparse: headers only
python bench/bench_deepseek_plan.py /tmp/dsv3-671b     # TP 8 / EP 8 / PP 8, vocabulary padded
python bench/bench_deepseek_plan.py /tmp/dsv3-671b --moe-grouped-gemm legacy --expert-tp-size 1
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("hf_dir", type=Path)
    ap.add_argument("--moe-grouped-gemm", choices=["legacy", "te"], default=None)
    ap.add_argument("--expert-tp-size", type=int, default=None)
    args = ap.parse_args()
    t0 = time.perf_counter()
    from engine.check import check_plan
    from engine.hf_source import inspect_hf
    from engine.layout import ParallelConfig
    from engine.plan import build_plan

    t1 = time.perf_counter()
    info = inspect_hf(args.hf_dir)
    t2 = time.perf_counter()
    layout = ParallelConfig(
        tp_size=8, ep_size=8, llm_pp_layers=[[7, 8, 8, 8, 8, 8, 7, 7]], make_vocab_size_divisible_by=128,
        moe_grouped_gemm=args.moe_grouped_gemm or False, expert_tp_size=args.expert_tp_size,
    )
    plan = build_plan(info, layout)
    t3 = time.perf_counter()
    problems = check_plan(plan)
    t4 = time.perf_counter()
    entries = sum(len(f.entries) for f in plan.files)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    size = plan.nbytes / 1e9
    print(f"{len(info.tensors)} source tensors -> {len(plan.files)} files, {entries} entries, {size:.1f} GB")
    print(f"import {t1 - t0:.2f} s, inspect {t2 - t1:.2f} s, plan {t3 - t2:.2f} s, check {t4 - t3:.2f} s")
    print(f"plan problems {len(problems)}, peak RSS {rss:.0f} MB")


if __name__ == "__main__":
    main()
