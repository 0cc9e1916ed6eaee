"""Pilot tests for issue 17: no crash when models are switched, no stale validation, values visible."""

from __future__ import annotations

from pathlib import Path

from textual.widgets import DataTable, Input, Static

from mmtui.app import make_app
from mmtui.widgets.stage_grid import StageGrid, cell_id
from tests.tui.test_workbench import settle


def _problems(screen) -> str:
    return str(screen.query_one("#problems", Static).render())


async def test_switching_models_back_and_forth_does_not_crash(qwen2vl_dir: Path, tiny_llms: dict[str, Path]) -> None:
    """Type another model's path and press enter, six times, as fast as keys come: each model's grid is
    rebuilt while the edit that fills in its output dir is planned. The model typed last is shown,
    with its own grid, its own output dir and a plan."""
    llama = tiny_llms["llama"]
    app = make_app(qwen2vl_dir)  # no output dir given: each model fills in its own, mid-rebuild
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot, app)
        screen = app.screen
        screen.query_one("#hf_dir", Input).focus()
        for path in [llama, qwen2vl_dir] * 3:
            await pilot.press("end", "ctrl+u", *str(path), "enter")
        await settle(pilot, app)
        assert "Qwen2-VL" in str(screen.query_one("#summary", Static).render())
        grid = screen.query_one(StageGrid)
        assert [m for m, _ in grid.modules] == ["vit", "llm"]
        assert grid.read() == {"vit": [[3]], "llm": [[4]]}
        assert sorted(i.id for i in grid.query(Input)) == ["cell-llm-0-0", "cell-vit-0-0"]
        assert screen.query_one("#out", Input).value == f"{qwen2vl_dir}-mm"
        assert _problems(screen).startswith("layout OK"), _problems(screen)
        assert screen.query_one("#preview", DataTable).row_count == 1
        assert app.return_code is None and app.is_running
