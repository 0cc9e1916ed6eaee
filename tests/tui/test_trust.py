"""Pilot tests for issue 17: no crash when models are switched, no stale validation, values visible."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from textual.widgets import DataTable, Input, Static

from mmtui.app import make_app
from mmtui.widgets.stage_grid import StageGrid, cell_id
from tests.tui.test_workbench import settle


def _problems(screen) -> str:
    return str(screen.query_one("#problems", Static).render())


def _screen_lines(app) -> list[str]:
    """The screen as a person sees it, one string per terminal row."""
    return [strip.text for strip in app.screen._compositor.render_strips()]


def _shown(app, widget) -> str:
    """The text on screen where `widget` is."""
    r = widget.region
    return "\n".join(line[r.x : r.right] for line in _screen_lines(app)[r.y : r.bottom])


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


def test_a_crash_exits_non_zero_and_keeps_the_traceback(qwen2vl_dir: Path, tmp_path: Path) -> None:
    """`mmtui DIR` where a bug raises in a worker: exit status 1, stderr names a log file, the file holds the
    traceback with the bug's own message. (A headless Textual driver stands in for the terminal.)"""
    script = tmp_path / "crash.py"
    script.write_text(
        "import sys, engine.source.summary\n"
        "def summarize(info):\n"
        "    raise RuntimeError('a bug in summarize')\n"
        "engine.source.summary.summarize = summarize\n"
        "from mmtui.__main__ import main\n"
        "main(sys.argv[1:])\n"
    )
    env = {
        **os.environ,
        "TEXTUAL_DRIVER": "textual.drivers.headless_driver:HeadlessDriver",
        "TMPDIR": str(tmp_path),
        "PYTHONPATH": str(Path(__file__).parents[2]),
    }
    done = subprocess.run([sys.executable, str(script), str(qwen2vl_dir)], env=env, capture_output=True, text=True)
    assert done.returncode == 1, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("mmtui stopped on an unexpected error (a bug, please report it): the traceback is in ")
    log = Path(last.rsplit(" ", 1)[1])
    assert log.parent == tmp_path and log.name.startswith("mmtui-crash-") and log.suffix == ".log"
    text = log.read_text()
    assert "Traceback (most recent call last)" in text and "RuntimeError: a bug in summarize" in text


async def test_a_clean_quit_exits_zero(qwen2vl_dir: Path) -> None:
    from mmtui.app import exit_code

    app = make_app(qwen2vl_dir)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot, app)
        app.screen.query_one("#preview", DataTable).focus()
        await pilot.press("q")
    assert exit_code(app) == 0 and not app.crashed and app.crash_log is None


async def test_clearing_and_retyping_pp_or_vpp_leaves_no_stale_error(qwen2vl_dir: Path, tmp_path: Path) -> None:
    """Clear PP (then VPP) and type the same value again: the error goes, the cost bars come back, Run runs."""
    app = make_app(qwen2vl_dir, out_dir=tmp_path / "out")
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot, app)
        screen = app.screen
        await pilot.press("f3")
        screen.query_one("#pp", Input).value = "2"
        await settle(pilot, app)
        layers = screen.query_one(StageGrid).read()
        assert _problems(screen) == "layout OK"
        for field, value in (("pp", "2"), ("vpp", "1"), ("pp", "2")):
            screen.query_one(f"#{field}", Input).focus()
            await pilot.press("end", "backspace")
            await settle(pilot, app)
            pp, vpp = ("", "1") if field == "pp" else ("2", "")
            assert _problems(screen).endswith("PP is 1..64 and VPP 1..16")
            assert _problems(screen) == f"PP {pp!r}, VPP {vpp!r}: PP is 1..64 and VPP 1..16"
            assert screen.query_one(f"#{field}", Input).has_class("-invalid")
            assert screen.plan is None and screen.query_one("#preview", DataTable).row_count == 0
            await pilot.press(value)
            await settle(pilot, app)
            assert _problems(screen) == "layout OK", field
            assert not screen.query_one(f"#{field}", Input).has_class("-invalid")
            assert screen.query_one(StageGrid).read() == layers
            costs = [str(screen.query_one(f"#cost-0-{s}", Static).render()) for s in range(2)]
            assert all("█" in c for c in costs), costs
            assert screen.query_one("#preview", DataTable).row_count == 2  # TP 1, PP 2
        await pilot.press("ctrl+r")
        await settle(pilot, app)
        assert "done" in str(screen.query_one("#status", Static).render())


async def test_a_focused_or_invalid_layer_cell_shows_its_number(qwen2vl_dir: Path, tmp_path: Path) -> None:
    """The cells are one row high: a focus or error border would cover the number (`▊▔▔▔▔▔▔▎`)."""
    app = make_app(qwen2vl_dir, out_dir=tmp_path / "out")
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot, app)
        screen = app.screen
        await pilot.press("f3")
        screen.query_one("#pp", Input).value = "2"
        await settle(pilot, app)
        cell = screen.query_one(f"#{cell_id('llm', 0, 0)}", Input)
        cell.focus()
        await pilot.press("end", "backspace", "3")  # the sum is now wrong: invalid and focused
        await settle(pilot, app)
        assert "sums to" in _problems(screen) and cell.has_class("-invalid") and cell.has_focus
        assert cell.region.height == 1 and _shown(app, cell).strip() == "3"
        other = screen.query_one(f"#{cell_id('llm', 0, 1)}", Input)
        assert other.has_class("-invalid") and _shown(app, other).strip() == other.value
        other.focus()
        await settle(pilot, app)
        assert _shown(app, other).strip() == other.value and _shown(app, cell).strip() == "3"
        assert not any(c in "\n".join(_screen_lines(app)) for c in "▔▁▊▎")
        for name in ("tp", "pp", "vpp"):  # the fields above the grid, focused
            screen.query_one(f"#{name}", Input).focus()
            await settle(pilot, app)
            assert _shown(app, screen.query_one(f"#{name}", Input)).strip() == screen.query_one(f"#{name}").value


def _cell_texts(table: DataTable, column: int) -> list[str]:
    return [str(table.get_row_at(i)[column]) for i in range(table.row_count)]


async def test_the_run_tab_after_a_refused_rerun(qwen2vl_dir: Path, tmp_path: Path) -> None:
    """Run twice into the same directory: the second run is refused, and nothing on the Run tab still shows
    the first run's bytes as if they were this run's; the problems line says why, before a third try."""
    from textual.widgets import ProgressBar

    app = make_app(qwen2vl_dir, out_dir=tmp_path / "out")
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot, app)
        screen = app.screen
        await pilot.press("ctrl+r")
        await settle(pilot, app)
        assert "done" in str(screen.query_one("#status", Static).render())
        assert "exists and is not empty: tick overwrite, or Run will refuse it" in _problems(screen)
        await pilot.press("ctrl+r")
        await settle(pilot, app)
        status = str(screen.query_one("#status", Static).render())
        assert "exists and is not empty" in status and "done" not in status
        total = str(screen.query_one("#rate", Static).render()).rsplit(" of ", 1)[1]
        assert str(screen.query_one("#rate", Static).render()) == f"stopped after 0.0 kB of {total}"
        assert screen.query_one("#bar", ProgressBar).progress == 0
        assert _cell_texts(screen.query_one("#ranks", DataTable), 2) == ["·"]
        assert str(screen.query_one("#current", Static).render()) == ""


async def test_the_run_tab_after_a_cancel(qwen2vl_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """Cancel (escape) while the second of two files is written: no 'writing ...' left, the file written
    before is marked discarded (nothing is kept), the one not started keeps its dot."""
    import time

    import engine.run.execute
    from engine.events import FileDone, FileStarted, Progress, Started

    def slow_execute(plan, out, **_):  # writes file 0, then file 1 until it is closed
        yield Started(300, 3)
        yield FileStarted(0, "a.pt", 100)
        yield Progress(100, 300, "a.pt", "k")
        yield FileDone(0, "a.pt")
        yield FileStarted(1, "b.pt", 100)
        for i in range(1000):
            time.sleep(0.01)
            yield Progress(100 + i % 50, 300, "b.pt", "k")

    monkeypatch.setattr(engine.run.execute, "execute", slow_execute)
    app = make_app(qwen2vl_dir, out_dir=tmp_path / "out")
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot, app)
        screen = app.screen
        await pilot.press("f3")
        screen.query_one("#pp", Input).value = "3"
        await settle(pilot, app)
        await pilot.press("ctrl+r")
        for _ in range(100):
            await pilot.pause(0.02)
            if str(screen.query_one("#current", Static).render()) == "writing b.pt":
                break
        assert str(screen.query_one("#current", Static).render()) == "writing b.pt"
        await pilot.press("escape")
        await settle(pilot, app)
        assert str(screen.query_one("#status", Static).render()) == "cancelled; nothing was written"
        assert str(screen.query_one("#current", Static).render()) == ""
        assert str(screen.query_one("#rate", Static).render()).startswith("stopped after ")
        assert _cell_texts(screen.query_one("#ranks", DataTable), 2) == ["discarded", "discarded", "·"]
        assert not (tmp_path / "out").exists()


async def test_the_title_follows_the_direction(qwen2vl_dir: Path, tmp_path: Path) -> None:
    from textual.widgets import Select

    app = make_app(qwen2vl_dir, out_dir=tmp_path / "out")
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot, app)
        assert "mmtui — HF → Megatron / MindSpeed" in _screen_lines(app)[0]
        for direction, label in (("mm_to_hf", "Megatron → HF"), ("resplit", "Re-split Megatron")):
            app.screen.query_one("#direction", Select).value = direction
            await settle(pilot, app)
            title = _screen_lines(app)[0]
            assert f"mmtui — {label}" in title and "HF → Megatron" not in title and "HF -> Megatron" not in title


async def test_the_cost_column_keeps_its_header(qwen2vl_dir: Path, tmp_path: Path) -> None:
    """An empty cell leaves no costs to show; the column's header stays, and the bars come back."""
    app = make_app(qwen2vl_dir, out_dir=tmp_path / "out")
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot, app)
        screen = app.screen
        await pilot.press("f3")
        screen.query_one("#pp", Input).value = "2"
        await settle(pilot, app)
        grid = screen.query_one(StageGrid)

        def head() -> list[str]:
            return _shown(app, grid).splitlines()[1].strip("│ ").split()

        assert head() == ["stage", "ViT", "LLM", "cost"]
        cell = screen.query_one(f"#{cell_id('llm', 0, 1)}", Input)
        original = cell.value
        cell.focus()
        await pilot.press("end", "backspace")
        await settle(pilot, app)
        assert _problems(screen) == "every stage cell needs a layer count (0 or more)"
        assert head() == ["stage", "ViT", "LLM", "cost"]
        assert "█" not in _shown(app, grid)
        await pilot.press(*original)
        await settle(pilot, app)
        assert head() == ["stage", "ViT", "LLM", "cost"] and "█" in _shown(app, grid)
        assert _problems(screen) == "layout OK"


async def test_the_preview_names_its_file_shows_sources_and_filters_by_either_name(
    qwen2vl_dir: Path, tmp_path: Path
) -> None:
    """PP 2. `lm_h` (the HF name) finds the last stage's output layer; the tensor list is titled with its
    file; the highlighted tensor's source and transform are shown in full; a filter matching nothing
    says so."""
    from safetensors import safe_open

    with safe_open(qwen2vl_dir / "model.safetensors", "pt") as f:  # the source names as the HF file has them
        assert "lm_head.weight" in set(f.keys())
    app = make_app(qwen2vl_dir, out_dir=tmp_path / "out")
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot, app)
        screen = app.screen
        screen.query_one("#pp", Input).value = "2"
        await settle(pilot, app)
        await pilot.press("f4")
        preview = screen.query_one("#preview", DataTable)
        assert "2 output files · enter lists a file's tensors" in _shown(app, preview).splitlines()[0]
        screen.query_one("#filter", Input).value = "lm_h"
        await settle(pilot, app)
        assert _cell_texts(preview, 0) == ["mp_rank_00_001"]
        assert "1 of 2 files match 'lm_h'" in _shown(app, preview).splitlines()[0]
        preview.focus()
        preview.move_cursor(row=0)
        await pilot.press("enter")
        await settle(pilot, app)
        tensors = screen.query_one("#tensors", DataTable)
        assert _cell_texts(tensors, 0) == ["text_decoder.output_layer.weight"]
        assert "release/mp_rank_00_001/model_optim_rng.pt: 1 of " in _shown(app, tensors).splitlines()[0]
        detail = _shown(app, screen.query_one("#tensor-detail", Static))
        assert detail.split() == [
            "text_decoder.output_layer.weight", "[128,", "64]", "float32", "32.8", "kB", "·", "from", "lm_head.weight",
            "·", "copy",
        ]  # fmt: skip

        screen.query_one("#filter", Input).value = "no_such_tensor"
        await settle(pilot, app)
        assert preview.row_count == 0 and not tensors.display
        assert "no match: no file or tensor name holds 'no_such_tensor'" in _shown(app, preview).splitlines()[0]


async def test_a_stage_past_the_last_layer_says_why_it_costs_nothing(qwen2vl_dir: Path, tmp_path: Path) -> None:
    """LLM [[4, 3]] on a 4-layer language model: stage 1's three layers do not exist; its cost line says so."""
    import json

    assert json.loads((qwen2vl_dir / "config.json").read_text())["num_hidden_layers"] == 4
    app = make_app(qwen2vl_dir, out_dir=tmp_path / "out")
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot, app)
        screen = app.screen
        await pilot.press("f3")
        screen.query_one("#pp", Input).value = "2"
        await settle(pilot, app)
        for module, counts in (("vit", [3, 0]), ("llm", [4, 3])):
            for s, n in enumerate(counts):
                screen.query_one(f"#{cell_id(module, 0, s)}", Input).value = str(n)
        await settle(pilot, app)
        assert "llm_pp_layers [[4, 3]]" in _problems(screen)
        stage0, stage1 = (_shown(app, screen.query_one(f"#cost-0-{s}", Static)).strip() for s in range(2))
        bar, numbers = stage1.split(" ", 1)
        assert set(bar) == {"·"} and numbers == "0 params · LLM has only 4", stage1
        assert "has only" not in stage0 and stage0.split(" ")[0] == "█" * len(bar)  # the full bar: the dearest stage


def test_every_command_of_the_cli_is_a_direction() -> None:
    import typing

    from engine.job import Job
    from mmtui.screens.workbench import DIRECTIONS

    commands = typing.get_args(Job.model_fields["command"].annotation)
    assert sorted(d for _, d in DIRECTIONS) == sorted(commands)


async def test_hf_to_dcp_from_the_wizard(qwen2vl_dir: Path, tmp_path: Path) -> None:
    """Direction HF → DCP: no layout asked for; the files written equal a headless run of the same job."""
    from textual.widgets import Select

    from engine.job import HfConfig, HfToDcpConfig, Job, prepare
    from engine.run.execute import run

    app = make_app(qwen2vl_dir, out_dir=tmp_path / "tui")
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot, app)
        screen = app.screen
        screen.query_one("#direction", Select).value = "hf_to_dcp"
        await settle(pilot, app)
        assert "mmtui — HF → torch DCP" in _screen_lines(app)[0]
        assert _problems(screen).startswith("layout OK"), _problems(screen)
        await pilot.press("ctrl+r")
        await settle(pilot, app)
        assert "done" in str(screen.query_one("#status", Static).render())
    cfg = HfToDcpConfig(dcp_dir=tmp_path / "headless", hf_config=HfConfig(hf_dir=qwen2vl_dir))
    _, plan = prepare(Job(converter="Qwen2VLConverter", command="hf_to_dcp", cfg=cfg))
    run(plan, tmp_path / "headless")
    tui = sorted(p.relative_to(tmp_path / "tui") for p in (tmp_path / "tui").rglob("*") if p.is_file())
    headless = sorted(p.relative_to(tmp_path / "headless") for p in (tmp_path / "headless").rglob("*") if p.is_file())
    assert tui == headless and any(p.suffix == ".distcp" for p in tui)
    for p in tui:
        assert (tmp_path / "tui" / p).read_bytes() == (tmp_path / "headless" / p).read_bytes(), p
