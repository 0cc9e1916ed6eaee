"""Start-up times side by side with a bare `python -c "import torch"`, alternating round by round.

    python bench/bench_startup.py --rounds 9
    git archive ae5e4e1 | tar -x -C /tmp/before && python bench/bench_startup.py --baseline /tmp/before

- `import torch`: the yardstick (`mm-convert -h` should take at most half of it);
- `mm-convert -h`, `mm-convert Qwen2VLConverter hf_to_mm -h`, `mmtui -h`: help texts;
- `mmtui --demo`: `mmtui --demo` as the console script runs it, headless: seconds from
  spawning the process until its first screen has been painted (the refresh after the
  workbench screen mounted), until the app is first idle (a Pilot pause; the model's summary
  and first plan may still be on their way from the workers), and until the process has
  exited. The demo checkpoint comes from its cache directory (XDG_CACHE_HOME, here a
  temporary one, built in a round 0 that is not counted).

The machine is shared, so the commands are interleaved and compared by their medians.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent

# `mmtui --demo` through the console script's own main(), headless; it prints when its first screen has been
# painted (the refresh after WorkbenchScreen mounted) and when the app is first idle, then exits
DEMO = """
import sys, time
import mmtui.app
from mmtui.screens.workbench import WorkbenchScreen

mount = WorkbenchScreen.on_mount
def on_mount(self):
    mount(self)
    self.call_after_refresh(lambda: print("painted", time.time(), file=sys.stderr))
WorkbenchScreen.on_mount = on_mount

async def first_idle(pilot):
    await pilot.pause()
    print("idle", time.time(), file=sys.stderr)
    pilot.app.exit()

run = mmtui.app.MmtuiApp.run
mmtui.app.MmtuiApp.run = lambda self, **kw: run(self, headless=True, auto_pilot=first_idle)
from mmtui.__main__ import main
main(["--demo"])
"""

COMMANDS = {
    "python -c 'import torch'": [sys.executable, "-c", "import torch"],
    "mm-convert -h": [str(BIN / "mm-convert"), "-h"],
    "mm-convert Qwen2VLConverter hf_to_mm -h": [str(BIN / "mm-convert"), "Qwen2VLConverter", "hf_to_mm", "-h"],
    "mmtui -h": [str(BIN / "mmtui"), "-h"],
    "mmtui --demo": [sys.executable, "-c", DEMO],
}


def once(argv: list[str], env: dict[str, str]) -> dict[str, float]:
    """Seconds from spawning to exit, and to each mark the command printed ("painted 1732.5" on stderr)."""
    start, t0 = time.time(), time.perf_counter()
    r = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=env["TMPDIR"], timeout=120)
    took = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"{argv}: exit {r.returncode}\n{r.stderr}")
    marks = dict(line.split() for line in r.stderr.splitlines() if line.startswith(("painted ", "idle ")))
    return {"exit": took} | {name: float(at) - start for name, at in marks.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument(
        "--baseline",
        type=Path,
        help="another checkout of the source (git archive COMMIT | tar -x -C DIR): its commands run in the same "
        "rounds, through PYTHONPATH",
    )
    args = ap.parse_args()
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "XDG_CACHE_HOME": f"{tmp}/cache", "TMPDIR": tmp}  # the temp dir is also the cwd
        runs = {name: (argv, env) for name, argv in COMMANDS.items()}
        if args.baseline:
            base = {**env, "PYTHONPATH": str(args.baseline.resolve())}
            runs |= {f"{name} [baseline]": (argv, base) for name, argv in COMMANDS.items() if "torch" not in name}
        for argv, e in runs.values():  # round 0: warm the page cache, build the demo checkpoint
            once(argv, e)
        times: dict[str, list[float]] = {}
        for _ in range(args.rounds):
            for name, (argv, e) in runs.items():
                for mark, took in once(argv, e).items():
                    times.setdefault(name if mark == "exit" else f"{name}: {mark}", []).append(took)
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    torch_s = medians["python -c 'import torch'"]
    print(f"{os.cpu_count()} CPUs, load average {load:.2f} -> {os.getloadavg()[0]:.2f}, {args.rounds} rounds, medians:")
    for name, ts in sorted(times.items(), key=lambda kv: kv[0].replace(" [baseline]", "~")):
        print(f"  {name:54s} {medians[name]:6.3f} s  ({medians[name] / torch_s:4.2f} x import torch)")
        print(f"  {'':54s} {' '.join(f'{t:.2f}' for t in ts)}")


if __name__ == "__main__":
    main()
