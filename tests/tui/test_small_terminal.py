"""80x24: every key the footer offers, the whole model summary and the whole form are on the screen
in every direction, without scrolling."""

from __future__ import annotations

from pathlib import Path

import pytest
from textual.widgets import Footer, Select

from mmtui.app import make_app
from mmtui.screens.workbench import DIRECTIONS
from tests.tui.test_workbench import settle


@pytest.mark.parametrize("direction", [d for _, d in DIRECTIONS])
async def test_the_source_tab_fits_80x24(direction: str, qwen2vl_dir: Path, tmp_path: Path) -> None:
    app = make_app(qwen2vl_dir, out_dir=tmp_path / "out")
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot, app)
        screen = app.screen
        screen.query_one("#direction", Select).value = direction
        await settle(pilot, app)
        for box in ("#summary-box", "#form"):
            widget = screen.query_one(box)
            assert widget.max_scroll_y == 0 and widget.max_scroll_x == 0, (direction, box)
        footer = " ".join(str(b.render()) for b in screen.query_one(Footer).query("FooterKey"))
        for word in ("Suggest", "Run", "Save", "Command", "Help", "Quit"):
            assert word in footer, (word, footer)
        right = max(k.region.right for k in screen.query_one(Footer).query("FooterKey"))
        assert right <= 80
