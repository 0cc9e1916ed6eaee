"""A model with three modules (Qwen2.5-Omni: vision, audio, language): three grid columns, readable at 80x24."""

from __future__ import annotations

from pathlib import Path

import pytest
from textual.widgets import Input, Select

from mmtui.app import make_app
from mmtui.widgets.stage_grid import StageGrid, cell_id
from tests.fixtures.tiny_omni import build_tiny_omni
from tests.tui.test_workbench import settle


@pytest.fixture(scope="module")
def omni_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_omni(tmp_path_factory.mktemp("omni_tui") / "Qwen2.5-Omni-tiny", talker=True)


async def test_the_grid_has_three_columns_at_80x24(omni_dir: Path, tmp_path: Path) -> None:
    app = make_app(omni_dir, out_dir=tmp_path / "out")
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot, app)
        await pilot.press("f3")
        screen = app.screen
        screen.query_one("#tp", Input).value = "2"
        screen.query_one("#pp", Input).value = "2"
        await settle(pilot, app)
        grid = screen.query_one(StageGrid)
        assert [m for m, _ in grid.modules] == ["vit", "audio", "llm"]
        heads = [str(label.render()) for label in grid.query(".head Label")]
        assert heads == ["stage", "ViT", "Audio", "LLM", "cost"]
        layers = grid.read()
        assert layers is not None and set(layers) == {"vit", "audio", "llm"}
        assert sum(layers["audio"][0]) == 3  # the suggested split covers the audio encoder's layers
        # every cell and its cost bar inside the 80 columns, nothing scrolled sideways
        assert grid.max_scroll_x == 0
        for s in range(2):
            for m in ("vit", "audio", "llm"):
                cell = screen.query_one(f"#{cell_id(m, 0, s)}", Input)
                assert cell.region.width >= 4 and cell.region.right <= 80, (m, s, cell.region)
            cost = screen.query_one(f"#cost-0-{s}")
            assert cost.region.width >= 10 and cost.region.right <= 80, cost.region
        assert not any("-invalid" in c.classes for c in grid.query(Input))
        said = str(screen.query_one("#problems").render())
        assert said.splitlines()[0] == "layout OK", said
        assert "talker.*, token2wav.* are not written" in said  # the plan's note, shown with the grid


async def test_resplit_asks_for_the_source_audio_layout(omni_dir: Path, tmp_path: Path) -> None:
    """The Source tab shows a Source audio field for this model; the form still fits 80x24 (the summary
    below it, one module longer, scrolls)."""
    app = make_app(omni_dir, out_dir=tmp_path / "out")
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot, app)
        screen = app.screen
        screen.query_one("#direction", Select).value = "resplit"
        await settle(pilot, app)
        assert screen.query_one("#src_audio", Input).display
        form = screen.query_one("#form")
        assert form.max_scroll_y == 0 and form.max_scroll_x == 0
        assert screen.query_one("#src_audio", Input).region.bottom <= 24


async def test_no_audio_field_for_a_model_without_audio(qwen2vl_dir: Path, tmp_path: Path) -> None:
    app = make_app(qwen2vl_dir, out_dir=tmp_path / "out")
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot, app)
        app.screen.query_one("#direction", Select).value = "resplit"
        await settle(pilot, app)
        field = app.screen.query_one("#src_audio", Input)
        assert "no-audio" in app.screen.classes and field.parent is not None and not field.parent.display


async def test_megatron_to_hf_reads_three_modules_and_their_tp_from_the_disk(omni_dir: Path, tmp_path: Path) -> None:
    """A checkpoint with the audio encoder at TP 1 beside TP 2: the grid and the sizes come from the disk,
    and Run gives the HF files back."""
    import filecmp

    from engine.layout import ParallelConfig
    from engine.planning.build import build_plan
    from engine.run.execute import run
    from engine.source.hf_source import inspect_hf

    on_disk = {"vit": [[2, 0]], "audio": [[3, 0]], "llm": [[1, 2]]}
    layout = ParallelConfig(tp_size=2, audio_tp_size=1, **{f"{m}_pp_layers": v for m, v in on_disk.items()})
    run(build_plan(inspect_hf(omni_dir), layout), tmp_path / "mm")
    app = make_app(omni_dir, out_dir=tmp_path / "back")
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot, app)
        screen = app.screen
        screen.query_one("#direction", Select).value = "mm_to_hf"
        await settle(pilot, app)
        screen.query_one("#src", Input).value = str(tmp_path / "mm")
        await settle(pilot, app)
        assert screen.query_one(StageGrid).read() == on_disk
        said = str(screen.query_one("#problems").render())
        assert said.startswith("layout OK"), said
        await pilot.press("ctrl+r")
        await settle(pilot, app)
    for f in omni_dir.iterdir():
        assert filecmp.cmp(f, tmp_path / "back" / f.name, shallow=False), f.name
