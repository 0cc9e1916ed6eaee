"""Snapshot tests of every step of the wizard at 80x24 and 120x40 (pytest-textual-snapshot).

Paths shown on screen are relative (the test runs in a temporary directory) so the
snapshots do not depend on where the suite runs. `pytest --snapshot-update` rewrites them.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from mmtui.app import make_app
from mmtui.demo import make_demo_checkpoint

SIZES = [(80, 24), (120, 40)]


@pytest.fixture
def demo_app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    make_demo_checkpoint(tmp_path / "Qwen2-VL-tiny")
    monkeypatch.chdir(tmp_path)
    app = make_app("Qwen2-VL-tiny", out_dir=Path("out"))
    app.animation_level = "none"  # the tab underline slides; a frame mid-slide is random
    return app


async def _ready(pilot) -> None:
    for _ in range(2):
        await pilot.pause()
        await pilot.app.workers.wait_for_complete()
        await pilot.pause()


def _steps(
    *keys: str,
    pp: str | None = None,
    select_row: bool = False,
    theme: str | None = None,
    bad_cell: bool = False,
    direction: str | None = None,
    quit_question: bool = False,
):
    async def run_before(pilot) -> None:
        if theme:  # every colour comes from the theme's variables ($primary, $error, ...)
            pilot.app.theme = theme
        await _ready(pilot)
        screen = pilot.app.screen
        if direction:  # the Source tab with the fields of another direction
            screen.query_one("#direction").value = direction
            screen.query_one("#src").value = "Qwen2-VL-tiny-mm"
            await _ready(pilot)
        if pp:
            screen.query_one("#tp").value = "2"
            screen.query_one("#pp").value = pp
            await _ready(pilot)
        for key in keys:
            await pilot.press(key)
            await _ready(pilot)
        if bad_cell:  # a wrong sum, in the focused cell: its number must stay visible
            cell = screen.query_one("#cell-llm-0-0")
            cell.value = "3"
            cell.focus()
            await _ready(pilot)
        if select_row:
            table = screen.query_one("#preview")
            table.focus()
            table.move_cursor(row=1)
            await pilot.press("enter")
            await _ready(pilot)
        if quit_question:  # what q asks while a conversion runs (a demo run is over before a snapshot)
            from mmtui.app import QUIT_QUESTION
            from mmtui.screens.confirm import ConfirmScreen

            await pilot.app.push_screen(ConfirmScreen(QUIT_QUESTION))
            await _ready(pilot)

    return run_before


async def _open_picker(pilot) -> None:
    await _ready(pilot)
    await pilot.press("ctrl+o")
    await pilot.pause(0.5)  # not _ready(): the directory tree's loader worker lives as long as the tree


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize(
    "step",
    [
        "open",
        "source",
        "source-mm-to-hf",
        "source-resplit",
        "layout",
        "validation",
        "preview",
        "run",
        "help",
        "command-line",
        "quit",
        "layout-light",
    ],
)
def test_screen(step: str, size: tuple[int, int], demo_app, snap_compare) -> None:
    run_before = {
        "source": _steps(),
        "layout": _steps("f3", pp="2"),
        "layout-light": _steps("f3", pp="2", theme="textual-light"),
        "validation": _steps("f3", pp="2", bad_cell=True),
        "preview": _steps("f4", pp="2", select_row=True),
        "run": _steps("f5", pp="2"),
        "help": _steps("f1"),
        "source-mm-to-hf": _steps(direction="mm_to_hf"),
        "source-resplit": _steps(direction="resplit"),
        "command-line": _steps("f3", "ctrl+l", pp="2"),
        "quit": _steps("f5", pp="2", quit_question=True),
        "open": _open_picker,
    }[step]
    assert snap_compare(demo_app, terminal_size=size, run_before=run_before)
