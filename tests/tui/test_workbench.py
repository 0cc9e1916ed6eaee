"""Pilot tests of the workbench: the TUI drives the engine and its output equals the headless run."""

from __future__ import annotations

import tempfile
import tomllib
from pathlib import Path

import torch
from textual.widgets import DataTable, Input, Static

from engine.execute import run
from engine.hf_source import inspect_hf
from engine.job import load_job
from engine.layout import ParallelConfig
from engine.plan import build_plan
from mmtui.app import make_app
from mmtui.runner import run_job


async def _settle(pilot, app) -> None:
    await pilot.pause()
    await app.workers.wait_for_complete()
    await pilot.pause()


def _load(out: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {p.parent.name: torch.load(p, weights_only=True)["model"] for p in sorted(out.glob("release/*/*.pt"))}


def _equal(a: Path, b: Path) -> bool:
    ta, tb = _load(a), _load(b)
    return ta.keys() == tb.keys() and all(
        ta[r].keys() == tb[r].keys() and all(torch.equal(ta[r][k], tb[r][k]) for k in ta[r]) for r in ta
    )


async def test_edit_validate_preview_run_save(qwen2vl_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "tui-out"
    app = make_app(qwen2vl_dir, out_dir=out)
    async with app.run_test(size=(120, 40)) as pilot:
        await _settle(pilot, app)
        screen = app.screen
        assert "Qwen2-VL" in str(screen.query_one("#summary", Static).render())
        assert screen.query_one("#preview", DataTable).row_count == 1  # defaults: TP1, PP1

        screen.query_one("#tp", Input).value = "3"
        await pilot.pause()
        problems = str(screen.query_one("#problems", Static).render())
        assert "tp_size 3 does not divide vision_config.num_heads = 4" in problems
        assert screen.query_one("#preview", DataTable).row_count == 0

        screen.query_one("#tp", Input).value = "2"
        screen.query_one("#llm", Input).value = "[[1,3]]"
        screen.query_one("#vit", Input).value = "[[3,0]]"
        await pilot.pause()
        assert str(screen.query_one("#problems", Static).render()) == "layout OK"
        preview = screen.query_one("#preview", DataTable)
        assert preview.row_count == 4
        assert [preview.get_row_at(i)[0] for i in range(4)] == [
            "mp_rank_00_000", "mp_rank_00_001", "mp_rank_01_000", "mp_rank_01_001",
        ]  # fmt: skip

        preview.focus()
        preview.move_cursor(row=1)
        await pilot.press("enter")
        await pilot.pause()
        tensors = screen.query_one("#tensors", DataTable)
        keys = {tensors.get_row_at(i)[0] for i in range(tensors.row_count)}
        plan = build_plan(
            inspect_hf(qwen2vl_dir), ParallelConfig(tp_size=2, llm_pp_layers=[[1, 3]], vit_pp_layers=[[3, 0]])
        )
        assert keys == {e.key for e in plan.files[1].entries}

        await pilot.press("ctrl+r")
        await _settle(pilot, app)
        assert "done:" in str(screen.query_one("#status", Static).render())

        await pilot.press("ctrl+s")
        await pilot.pause()

    run(plan, tmp_path / "headless")
    assert _equal(out, tmp_path / "headless")

    saved = tmp_path / "tui-out.job.toml"
    data = tomllib.loads(saved.read_text())
    assert data["converter"] == "Qwen2VLConverter" and data["cfg"]["parallel_config"]["tp_size"] == 2
    job = load_job(saved)
    job.cfg.mm_dir = tmp_path / "replayed"
    run_job(job, quiet=True)
    assert _equal(out, tmp_path / "replayed")


async def test_demo_opens(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    app = make_app(demo=True)
    async with app.run_test(size=(80, 24)) as pilot:
        await _settle(pilot, app)
        assert "Qwen2-VL" in str(app.screen.query_one("#summary", Static).render())
        assert app.screen.query_one("#preview", DataTable).row_count == 1


async def test_quit_asks_while_running_and_cancels(qwen2vl_dir: Path, tmp_path: Path, monkeypatch) -> None:
    import time

    import engine.execute
    from engine.events import Progress, Started
    from mmtui.screens.confirm import ConfirmScreen

    closed = []

    def slow_execute(plan, out, **_):  # a conversion that runs until it is closed
        try:
            yield Started(100, 1)
            for i in range(1000):
                time.sleep(0.01)
                yield Progress(i, 100, "f", "k")
        finally:
            closed.append(True)

    monkeypatch.setattr(engine.execute, "execute", slow_execute)
    app = make_app(qwen2vl_dir, out_dir=tmp_path / "out")
    async with app.run_test(size=(80, 24)) as pilot:
        await _settle(pilot, app)
        app.screen.query_one("#preview", DataTable).focus()
        await pilot.press("ctrl+r")
        await pilot.pause(0.1)
        await pilot.press("q")
        await pilot.pause()
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("n")
        await pilot.pause()
        assert not isinstance(app.screen, ConfirmScreen) and app.is_running and not closed
        await pilot.press("q")
        await pilot.pause()
        await pilot.press("y")
        await pilot.pause(0.3)
    assert closed == [True]


async def test_quit_when_idle_is_immediate(qwen2vl_dir: Path) -> None:
    app = make_app(qwen2vl_dir)
    async with app.run_test(size=(80, 24)) as pilot:
        await _settle(pilot, app)
        app.screen.query_one("#preview", DataTable).focus()
        await pilot.press("q")
        await pilot.pause()
        assert app.return_code == 0 or not app.is_running
