"""hf_to_mm against `cp -r` + `sync` of the same checkpoint, side by side in one run.

Each round runs the copy and every layout once, in turn, each starting after a `sync`
with a warm page cache for the source; the table reports medians over rounds (this
machine's disk throughput varies 2-3x from minute to minute, so single runs mislead).
Peak RSS is the converter process's own `ru_maxrss` from wait4.

    python bench/bench_convert.py /work/bench-data/qwen2vl-2b --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

LAYOUTS = {
    "tp1pp1": (1, "[[28]]", "[[32]]"),
    "tp2pp4": (2, "[[1,9,9,9]]", "[[32,0,0,0]]"),
}


def timed(cmd: list[str]) -> tuple[float, int]:
    """Wall seconds of cmd followed by sync, and cmd's peak RSS in bytes."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode() if proc.stderr else ""
    if proc.returncode:
        raise SystemExit(f"{cmd[0]} failed ({proc.returncode}): {err.strip()}")
    subprocess.run(["sync"], check=True)
    return time.perf_counter() - start, usage.ru_maxrss * 1024


def convert_cmd(hf: Path, out: Path, layout: str) -> list[str]:
    tp, llm, vit = LAYOUTS[layout]
    mm_convert = str(Path(sys.executable).parent / "mm-convert")
    return [
        mm_convert, "Qwen2VLConverter", "hf_to_mm", "--cfg.mm_dir", str(out), "--cfg.hf_config.hf_dir", str(hf),
        "--cfg.parallel_config.llm_pp_layers", llm, "--cfg.parallel_config.vit_pp_layers", vit,
        "--cfg.parallel_config.tp_size", str(tp),
    ]  # fmt: skip


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("hf_dir", type=Path)
    ap.add_argument("--work", type=Path, default=Path("/work/bench-data/run"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--layouts", default=",".join(LAYOUTS))
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    layouts = args.layouts.split(",")
    args.work.mkdir(parents=True, exist_ok=True)
    for f in args.hf_dir.iterdir():  # warm the page cache for the source, as a re-run would find it
        with open(f, "rb") as fh:
            while fh.read(64 << 20):
                pass
    subprocess.run(["sync"], check=True)
    runs: dict[str, list[tuple[float, int, int]]] = {name: [] for name in ["copy", *layouts]}
    for _ in range(args.rounds):
        for name in runs:
            out = args.work / name
            shutil.rmtree(out, ignore_errors=True)
            subprocess.run(["sync"], check=True)
            time.sleep(1)
            cmd = ["cp", "-r", str(args.hf_dir), str(out)] if name == "copy" else convert_cmd(args.hf_dir, out, name)
            wall, rss = timed(cmd)
            runs[name].append((wall, rss, du(out)))
            shutil.rmtree(out)
    copy_wall = statistics.median(w for w, _, _ in runs["copy"])
    rows = []
    print(f"source: {args.hf_dir} ({du(args.hf_dir) / 1e9:.2f} GB), {args.rounds} rounds, medians\n")
    print("| run | wall s (median) | all runs | ratio to copy | peak RSS MB | output GB |")
    print("|---|---|---|---|---|---|")
    for name, rs in runs.items():
        wall = statistics.median(w for w, _, _ in rs)
        rss = max(r for _, r, _ in rs)
        row = {"run": name, "wall": wall, "walls": [w for w, _, _ in rs], "ratio": wall / copy_wall,
               "peak_rss_mb": rss / 2**20, "output_gb": rs[0][2] / 1e9}  # fmt: skip
        rows.append(row)
        label = "cp -r + sync" if name == "copy" else f"hf_to_mm {name} + sync"
        walls = " ".join(f"{w:.1f}" for w in row["walls"])
        ratio, rss_mb, gb = row["ratio"], row["peak_rss_mb"], row["output_gb"]
        print(f"| {label} | {wall:.2f} | {walls} | {ratio:.2f}x | {rss_mb:.0f} | {gb:.2f} |")
    print("\ncommands:")
    for name in layouts:
        print("  " + " ".join(convert_cmd(args.hf_dir, Path("OUT"), name)))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
