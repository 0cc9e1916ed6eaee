"""One part of a split job on a DeepSeek-V3-671B-shaped checkpoint: plan, its share, and a few of its files
written as a part writes them, against `cp` + `sync` of the same bytes.

python bench/make_deepseek_v3.py /tmp/dsv3-671b                      # sparse: headers only, ~20 MB on disk
python bench/bench_parts.py /tmp/dsv3-671b --out /tmp/parts-bench --part 1/64 --files 3

The source is holes (zeros): reading costs no disk, so the files' time is the part's own work (FP8
block dequantisation to bf16, CRC, writing, fsync) on this machine's disk. The written files and
their copy are removed at the end.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import time
from collections import deque
from pathlib import Path


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("hf_dir", type=Path)
    ap.add_argument("--out", type=Path, required=True, help="a scratch directory (removed at the end)")
    ap.add_argument("--part", default="1/64")
    ap.add_argument("--files", type=int, default=3, help="how many of the part's files to write")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of (write the files, cp -r + sync them)")
    ap.add_argument("--tp", type=int, default=8)
    ap.add_argument("--ep", type=int, default=64)
    ap.add_argument("--pp-layers", default="3" + ",4" * 14 + ",2", help="layers per stage (61 in 16 stages)")
    args = ap.parse_args()

    t0 = time.perf_counter()
    from engine.layout import ParallelConfig
    from engine.planning.build import build_plan
    from engine.planning.check import check_plan
    from engine.run.execute import write_files
    from engine.run.parts import parse_part, shares
    from engine.source.hf_source import inspect_hf

    t1 = time.perf_counter()
    info = inspect_hf(args.hf_dir)
    t2 = time.perf_counter()
    stages = [int(x) for x in args.pp_layers.split(",")]
    layout = ParallelConfig(tp_size=args.tp, ep_size=args.ep, llm_pp_layers=[stages], make_vocab_size_divisible_by=128)
    plan = build_plan(info, layout)
    t3 = time.perf_counter()
    problems = check_plan(plan)
    t4 = time.perf_counter()
    part = parse_part(args.part)
    assert part is not None
    sizes = [f.nbytes for f in plan.files]
    t5 = time.perf_counter()
    share = shares(sizes, part.count)
    t6 = time.perf_counter()
    mine = share[part.index]
    loads = [sum(sizes[i] for i in s) for s in share]
    entries = sum(len(f.entries) for f in plan.files)
    print(
        f"{len(info.tensors)} source tensors -> {len(plan.files)} files, {entries} entries, {plan.nbytes / 1e9:.1f} GB"
    )
    print(f"import {t1 - t0:.2f} s, inspect {t2 - t1:.2f} s, plan {t3 - t2:.2f} s, check {t4 - t3:.2f} s, "
          f"shares {t6 - t5:.2f} s; plan problems {len(problems)}; peak RSS {_rss_mb():.0f} MB")  # fmt: skip
    print(f"part {part}: {len(mine)} files, {loads[part.index] / 1e9:.2f} GB; parts' loads "
          f"{min(loads) / 1e9:.2f}..{max(loads) / 1e9:.2f} GB")  # fmt: skip

    chosen = mine[: args.files]
    nbytes = sum(sizes[i] for i in chosen)
    ours, cps, cpu = [], [], []
    try:
        for r in range(args.rounds):  # alternating, so both see the same disk and the same neighbours
            dest, stage, copy = args.out / f"out{r}", args.out / f"staging{r}", args.out / f"copy{r}"
            for d in (dest, stage):
                d.mkdir(parents=True)
            before = resource.getrusage(resource.RUSAGE_SELF)
            start = time.perf_counter()
            deque(write_files(plan, dest, chosen, stage=stage), maxlen=0)  # each file synced, then moved in
            ours.append(time.perf_counter() - start)
            after = resource.getrusage(resource.RUSAGE_SELF)
            cpu.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
            on_disk = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
            start = time.perf_counter()
            subprocess.run(["cp", "-r", str(dest), str(copy)], check=True)
            os.sync()
            cps.append(time.perf_counter() - start)
            shutil.rmtree(dest)
            shutil.rmtree(copy)
            shutil.rmtree(stage)
        a, b, c = statistics.median(ours), statistics.median(cps), statistics.median(cpu)
        print(f"{len(chosen)} files of part {part}, {nbytes / 1e9:.2f} GB of tensors ({on_disk / 1e9:.2f} GB on disk), "
              f"medians of {args.rounds} rounds: written in {a:.2f} s ({on_disk / a / 1e9:.2f} GB/s, "
              f"{c:.2f} CPU s = {c / (on_disk / 1e9):.2f} CPU s per GB); cp -r + sync of them {b:.2f} s "
              f"({on_disk / b / 1e9:.2f} GB/s); ratio {a / b:.2f}x; peak RSS {_rss_mb():.0f} MB")  # fmt: skip
        print("rounds (ours / cp):", " ".join(f"{x:.1f}/{y:.1f}" for x, y in zip(ours, cps, strict=True)))
    finally:
        shutil.rmtree(args.out, ignore_errors=True)


if __name__ == "__main__":
    main()
