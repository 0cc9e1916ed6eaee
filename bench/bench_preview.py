"""How the wizard keeps up with a big plan: a Qwen2-VL-72B-shaped model at TP 8 / PP 8.

Times the engine steps behind the Layout and Preview tabs, then drives the real app
headless (Textual's pilot) and times what a user waits for: a TP/PP edit until the
preview is refilled, a filter keystroke, opening one rank's tensor list. Needs only
metadata, so the checkpoint is made sparse (headers, data as holes):

    python bench/make_qwen2vl_2b.py /tmp/qwen2vl-72b --size 72b --sparse
    python bench/bench_preview.py /tmp/qwen2vl-72b
    python bench/make_deepseek_v3.py /tmp/dsv3-671b && python bench/bench_preview.py /tmp/dsv3-671b --pp 16 --ep 64
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path
from statistics import median


def _timed(fn, repeat: int = 3):
    times, out = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return median(times), out


def engine_steps(hf: Path, tp: int, pp: int, ep: int = 1) -> list[tuple[str, float, str]]:
    from engine.layout import ParallelConfig
    from engine.planning.balance import cell_costs, suggest
    from engine.planning.build import build_plan
    from engine.planning.check import check_plan
    from engine.planning.targets import module_weights
    from engine.source.hf_source import inspect_hf

    rows = []
    t, info = _timed(lambda: inspect_hf(hf))
    rows.append(("inspect (config + safetensors headers)", t, f"{len(info.tensors)} tensors"))
    t, split = _timed(lambda: suggest(info, pp))
    rows.append((f"suggest PP {pp}", t, str(split.layers)))
    t, _ = _timed(lambda: module_weights(info))
    rows.append(("module_weights", t, ""))
    t, _ = _timed(lambda: cell_costs(info, split.layers, "params"))
    rows.append(("cell_costs (per keystroke)", t, ""))
    layout = ParallelConfig(tp_size=tp, ep_size=ep, **{f"{m}_pp_layers": v for m, v in split.layers.items()})
    t, plan = _timed(lambda: build_plan(info, layout))
    entries = sum(len(f.entries) for f in plan.files)
    rows.append((f"build_plan TP {tp} / PP {pp} / EP {ep}", t, f"{len(plan.files)} files, {entries} tensor entries"))
    t, problems = _timed(lambda: check_plan(plan))
    rows.append(("check_plan", t, f"{len(problems)} problems"))
    return rows


async def app_steps(hf: Path, tp: int, pp: int, ep: int = 1) -> list[tuple[str, float, str]]:
    from textual.widgets import DataTable, Input

    from mmtui.app import make_app

    async def settle(pilot, app) -> None:
        for _ in range(2):
            await pilot.pause()
            await app.workers.wait_for_complete()
            await pilot.pause()

    rows = []
    app = make_app(hf, out_dir=Path("/tmp/bench-preview-out"))
    t0 = time.perf_counter()
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(pilot, app)
        rows.append(("open + inspect + first plan", time.perf_counter() - t0, ""))
        screen = app.screen
        await pilot.press("f3")
        t = time.perf_counter()
        screen.query_one("#tp", Input).value = str(tp)
        screen.query_one("#pp", Input).value = str(pp)
        if ep > 1:
            screen.query_one("#ep", Input).value = str(ep)
        await settle(pilot, app)
        preview = screen.query_one("#preview", DataTable)
        took = time.perf_counter() - t
        rows.append((f"edit TP {tp} / PP {pp} / EP {ep} -> preview filled", took, f"{preview.row_count} rows"))
        await pilot.press("f4")
        await pilot.pause()
        from mmtui.widgets.preview import PlanPreview

        view = screen.query_one(PlanPreview)
        t = time.perf_counter()
        view.show(screen.plan)  # what the wizard does once a plan is ready: sums, rows, table
        await pilot.pause()
        took = time.perf_counter() - t
        rows.append(("preview of a ready plan (the table filled)", took, f"{preview.row_count} rows"))
        box = screen.query_one("#filter", Input)
        box.focus()
        times = []
        for ch in "mlp":
            t = time.perf_counter()
            await pilot.press(ch)
            await pilot.pause()
            times.append(time.perf_counter() - t)
        rows.append(("filter keystroke (median of 3)", median(times), f"{preview.row_count} rows match 'mlp'"))
        for _ in "mlp":
            await pilot.press("backspace")
        await pilot.pause()
        preview.focus()
        t = time.perf_counter()
        await pilot.press("enter")
        await pilot.pause()
        tensors = screen.query_one("#tensors", DataTable)
        rows.append(("open one rank's tensor list", time.perf_counter() - t, f"{tensors.row_count} rows"))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("hf_dir", type=Path)
    ap.add_argument("--tp", type=int, default=8)
    ap.add_argument("--pp", type=int, default=8)
    ap.add_argument("--ep", type=int, default=1)
    args = ap.parse_args()
    rows = engine_steps(args.hf_dir, args.tp, args.pp, args.ep)
    rows += asyncio.run(app_steps(args.hf_dir, args.tp, args.pp, args.ep))
    width = max(len(r[0]) for r in rows)
    print(f"| {'step':<{width}} | seconds | note |")
    print(f"|{'-' * (width + 2)}|--------:|------|")
    for name, secs, note in rows:
        print(f"| {name:<{width}} | {secs:7.3f} | {note} |")


if __name__ == "__main__":
    main()
