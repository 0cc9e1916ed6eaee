"""Regenerate screenshots/*.svg from the real app on the built-in demo checkpoint: every step
of the wizard, a validation error, a finished run and the help screen, at 120x40 and 80x24.

    python screenshots/make_screenshots.py
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from pathlib import Path

from mmtui.app import make_app
from mmtui.demo import make_demo_checkpoint

HERE = Path(__file__).parent.absolute()


async def settle(pilot) -> None:
    for _ in range(2):
        await pilot.pause()
        await pilot.app.workers.wait_for_complete()
        await pilot.pause()


async def shoot(size: tuple[int, int]) -> None:
    w, h = size
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)  # relative paths on screen
        make_demo_checkpoint(Path("Qwen2-VL-tiny"))
        app = make_app("Qwen2-VL-tiny", out_dir=Path("Qwen2-VL-tiny-mm"))
        app.animation_level = "none"
        async with app.run_test(size=size) as pilot:
            await settle(pilot)
            screen = app.screen

            def save(name: str) -> None:
                app.save_screenshot(str(HERE / f"{name}-{w}x{h}.svg"))

            save("1-source")
            await pilot.press("f3")
            screen.query_one("#tp").value = "2"
            screen.query_one("#pp").value = "2"
            screen.query_one("#dp").value = "4"  # will it fit? on 64 GiB devices, data-parallel size 4
            screen.query_one("#device_gib").value = "64"
            await settle(pilot)
            save("2-layout")
            app.theme = "textual-light"  # the same step in a light theme: every colour is a theme variable
            await settle(pilot)
            save("2-layout-light")
            app.theme = "textual-dark"
            await settle(pilot)
            screen.query_one("#cost").value = "flops"  # the FLOPs model, its token counts, VPP stage totals
            screen.query_one("#vpp").value = "2"
            await settle(pilot)
            save("2-layout-flops-vpp")
            screen.query_one("#cost").value = "params"
            screen.query_one("#vpp").value = "1"
            await settle(pilot)
            cell = screen.query_one("#cell-llm-0-0")
            cell.value = "3"
            cell.focus()  # the focused cell with the wrong sum still shows its number
            await settle(pilot)
            save("3-validation")
            await pilot.press("ctrl+b")
            await settle(pilot)
            await pilot.press("f4")
            table = screen.query_one("#preview")
            table.focus()
            table.move_cursor(row=1)
            await pilot.press("enter")
            await settle(pilot)
            save("4-preview")
            await pilot.press("ctrl+r")
            await settle(pilot)
            await pilot.press("ctrl+t")
            await settle(pilot)
            save("5-run")
            await pilot.press("ctrl+l")
            await settle(pilot)
            save("6-command-line")
            await pilot.press("escape")
            await pilot.press("f1")
            await settle(pilot)
            save("7-help")
            await pilot.press("escape")
            await settle(pilot)
            await pilot.press("f2")
            screen.query_one("#direction").value = "resplit"  # the longest form: still no scrolling at 80x24
            await settle(pilot)
            save("1-source-resplit")
            screen.query_one("#direction").value = "hf_to_mm"
            await settle(pilot)
            await pilot.press("ctrl+o")
            await pilot.pause(0.5)  # not settle(): the directory tree's loader worker never completes
            save("0-open")


if __name__ == "__main__":
    for old in HERE.glob("*.svg"):
        old.unlink()
    for size in ((120, 40), (80, 24)):
        asyncio.run(shoot(size))
    print("\n".join(sorted(p.name for p in HERE.glob("*.svg"))))
