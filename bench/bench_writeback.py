"""Write-behind on its own: copy a directory's files with engine.run.out_file.OutFile, with and
without the write-back requests, against `cp -r` + `sync`, alternating in one run.

    python bench/bench_writeback.py /work/bench-data/qwen2vl-2b --rounds 8
"""

from __future__ import annotations

import argparse
import os
import subprocess
from pathlib import Path

from alternate import alternate, copy_and_sync

from engine.run import out_file
from engine.run.out_file import OutFile

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
    args.work.mkdir(parents=True, exist_ok=True)
    out = args.work / "writeback"
    runs = {
        "cp -r + sync": lambda: copy_and_sync(args.src, out),
        "copy_file_range + sync": lambda: copy_tree(args.src, out, write_behind=False),
        "copy_file_range, write-behind + sync": lambda: copy_tree(args.src, out, write_behind=True),
    }
    alternate(runs, out, args.rounds)


if __name__ == "__main__":
    main()
