"""Megatron -> HF, re-split and LoRA Megatron -> PEFT: the source layout is read from the disk as soon
as the Megatron dir is given, not guessed as a balanced split; an edit is still checked against the disk."""

from __future__ import annotations

from pathlib import Path

from textual.widgets import DataTable, Input, Select, Static

from engine.layout import ParallelConfig
from engine.planning.balance import suggest
from engine.planning.build import build_plan
from engine.run.execute import run
from engine.source.hf_source import inspect_hf
from mmtui.app import make_app
from mmtui.widgets.stage_grid import StageGrid, cell_id
from tests.tui.test_workbench import settle

ON_DISK = {"vit": [[3, 0]], "llm": [[2, 2]]}


def _problems(screen) -> str:
    return str(screen.query_one("#problems", Static).render())


def _write(hf: Path, mm: Path) -> None:
    info = inspect_hf(hf)
    assert suggest(info, 2).layers != ON_DISK  # else a balanced split would pass for the disk's
    run(build_plan(info, ParallelConfig(tp_size=2, llm_pp_layers=ON_DISK["llm"], vit_pp_layers=ON_DISK["vit"])), mm)


async def test_megatron_to_hf_reads_the_layout_from_the_disk(qwen2vl_dir: Path, tmp_path: Path) -> None:
    mm = tmp_path / "mm"
    _write(qwen2vl_dir, mm)
    app = make_app(qwen2vl_dir, out_dir=tmp_path / "back")
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(pilot, app)
        screen = app.screen
        screen.query_one("#direction", Select).value = "mm_to_hf"
        await settle(pilot, app)
        assert screen.query_one(StageGrid).read() == {"vit": [[3]], "llm": [[4]]}  # no dir yet: untouched
        screen.query_one("#src", Input).value = str(mm)
        await settle(pilot, app)
        assert screen.query_one(StageGrid).read() == ON_DISK
        assert [screen.query_one(f"#{f}", Input).value for f in ("tp", "ep", "pp", "vpp")] == ["2", "1", "2", "1"]
        assert _problems(screen).startswith("layout OK"), _problems(screen)

        # an edit is the user's: kept, and checked against the disk
        screen.query_one(f"#{cell_id('llm', 0, 0)}", Input).value = "1"
        screen.query_one(f"#{cell_id('llm', 0, 1)}", Input).value = "3"
        await settle(pilot, app)
        assert screen.query_one(StageGrid).read() == {"vit": [[3, 0]], "llm": [[1, 3]]}
        assert not _problems(screen).startswith("layout OK") and screen.plan is None
        screen.query_one(f"#{cell_id('llm', 0, 0)}", Input).value = "2"
        screen.query_one(f"#{cell_id('llm', 0, 1)}", Input).value = "2"
        await settle(pilot, app)
        assert _problems(screen).startswith("layout OK"), _problems(screen)
        assert screen.query_one("#preview", DataTable).get_row_at(0)[0] == "model.safetensors"
        await pilot.press("ctrl+r")
        await settle(pilot, app)
        assert "done" in str(screen.query_one("#status", Static).render())
    assert (tmp_path / "back" / "model.safetensors").read_bytes() == (qwen2vl_dir / "model.safetensors").read_bytes()


async def test_resplit_fills_the_source_fields_from_the_disk(qwen2vl_dir: Path, tmp_path: Path) -> None:
    mm = tmp_path / "mm"
    _write(qwen2vl_dir, mm)
    app = make_app(qwen2vl_dir, out_dir=tmp_path / "resplit")
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(pilot, app)
        screen = app.screen
        screen.query_one("#src", Input).value = str(mm)  # given first, the direction after: read then
        screen.query_one("#direction", Select).value = "resplit"
        await settle(pilot, app)
        fields = [screen.query_one(f"#{f}", Input).value for f in ("src_tp", "src_ep", "src_llm", "src_vit")]
        assert fields == ["2", "1", "[[2,2]]", "[[3,0]]"]
        assert screen.query_one(StageGrid).read() == {"vit": [[3]], "llm": [[4]]}  # the layout to write: the user's
        assert _problems(screen).startswith("layout OK"), _problems(screen)


async def test_a_directory_that_is_no_checkpoint_leaves_the_fields_alone(qwen2vl_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    app = make_app(qwen2vl_dir, out_dir=tmp_path / "back")
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(pilot, app)
        screen = app.screen
        screen.query_one("#direction", Select).value = "mm_to_hf"
        screen.query_one("#src", Input).value = str(tmp_path / "empty")
        await settle(pilot, app)
        assert screen.query_one(StageGrid).read() == {"vit": [[3]], "llm": [[4]]}
        assert screen.query_one("#tp", Input).value == "1"
        assert "latest_checkpointed_iteration.txt" in _problems(screen)
        assert screen.query_one("#src", Input).has_class("-invalid")
