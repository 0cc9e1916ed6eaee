"""Regenerate screenshots/*.svg from the real app on the built-in demo checkpoint.

    python screenshots/make_screenshots.py
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

from textual.widgets import DataTable, Input

from mmtui.app import make_app
from mmtui.demo import make_demo_checkpoint

HERE = Path(__file__).parent


async def shoot(size: tuple[int, int]) -> None:
    w, h = size
    with tempfile.TemporaryDirectory() as tmp:
        hf = make_demo_checkpoint(Path(tmp) / "Qwen2-VL-tiny")
        app = make_app(hf, out_dir=Path(tmp) / "out")
        async with app.run_test(size=size) as pilot:
            await pilot.pause()
            await app.workers.wait_for_complete()
            await pilot.pause()
            screen = app.screen
            screen.query_one("#tp", Input).value = "2"
            screen.query_one("#llm", Input).value = "[[1,3]]"
            screen.query_one("#vit", Input).value = "[[3,0]]"
            await pilot.pause()
            app.save_screenshot(str(HERE / f"workbench-{w}x{h}.svg"))
            screen.query_one("#tp", Input).value = "3"
            await pilot.pause()
            app.save_screenshot(str(HERE / f"validation-{w}x{h}.svg"))
            screen.query_one("#tp", Input).value = "2"
            await pilot.pause()
            preview = screen.query_one("#preview", DataTable)
            preview.focus()
            preview.move_cursor(row=1)
            await pilot.press("enter")
            await pilot.pause()
            app.save_screenshot(str(HERE / f"preview-{w}x{h}.svg"))


if __name__ == "__main__":
    for size in ((120, 40), (80, 24)):
        asyncio.run(shoot(size))
    print("\n".join(sorted(p.name for p in HERE.glob("*.svg"))))
