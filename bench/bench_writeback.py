"""Write-behind on its own: copy a directory's files with engine.out_file.OutFile, with and
without the write-back requests, against `cp -r` + `sync`, alternating in one run.

    python bench/bench_writeback.py /work/bench-data/qwen2vl-2b --rounds 8
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import time
from pathlib import Path

from engine import out_file
from engine.out_file import OutFile

_REAL_WRITEBACK = out_file.start_writeback


def copy_tree(src: Path, dst: Path, *, write_behind: bool) -> None:
    out_file.start_writeback = _REAL_WRITEBACK if write_behind else (lambda *_: None)
    dst.mkdir()
    for path in sorted(src.iterdir()):
        s = os.open(path, os.O_RDONLY)
        d = os.open(dst / path.name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            out = OutFile(d)
            out.copy([(s, 0, os.fstat(s).st_size)])
            out.flush_started()
        finally:
            os.close(s)
            os.close(d)
    subprocess.run(["sync"], check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", type=Path)
    ap.add_argument("--work", type=Path, default=Path("/work/bench-data/run"))
    ap.add_argument("--rounds", type=int, default=8)
    args = ap.parse_args()
    out = args.work / "writeback"
    runs = {
        "cp -r + sync": lambda: (
            subprocess.run(["cp", "-r", str(args.src), str(out)], check=True),
            subprocess.run(["sync"], check=True),
        ),
        "copy_file_range + sync": lambda: copy_tree(args.src, out, write_behind=False),
        "copy_file_range, write-behind + sync": lambda: copy_tree(args.src, out, write_behind=True),
    }
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, fn in runs.items():
            shutil.rmtree(out, ignore_errors=True)
            subprocess.run(["sync"], check=True)
            time.sleep(1)
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    shutil.rmtree(out, ignore_errors=True)
    for name, ts in times.items():
        print(f"{name}: median {statistics.median(ts):.2f} s ({' '.join(f'{t:.2f}' for t in ts)})")


if __name__ == "__main__":
    main()
