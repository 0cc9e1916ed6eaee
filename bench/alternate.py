"""Time several ways of writing the same output, alternating round by round.

The bench machine's disk swings 2-3x from minute to minute, so runs are interleaved
and compared by their medians, each starting from a synced disk and an absent output.
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path


def copy_and_sync(src: Path, out: Path) -> None:
    subprocess.run(["cp", "-r", str(src), str(out)], check=True)
    subprocess.run(["sync"], check=True)


def alternate(runs: dict[str, Callable[[], object]], out: Path, rounds: int) -> None:
    """Run each of `runs` (which writes `out`) once per round; print each one's median and all times."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
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
