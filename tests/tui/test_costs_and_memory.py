"""The Layout tab's costs and "will it fit?": token counts the FLOPs model assumes are settable, each
stage's total is shown with VPP, a tiny model's costs read in a unit that shows them, and the training
memory per rank is judged against a device memory and data-parallel size the user gives."""

from __future__ import annotations

from pathlib import Path

from textual.widgets import Input, Select, Static

from engine.layout import ParallelConfig
from engine.planning.balance import cell_costs, format_cost, stage_costs
from engine.planning.build import build_plan
from engine.planning.train_memory import human_bytes
from engine.source.hf_source import inspect_hf
from mmtui.app import make_app
from mmtui.widgets.stage_grid import StageGrid
from tests.tui.test_workbench import settle


def _text(screen, selector: str) -> str:
    return str(screen.query_one(selector, Static).render())


def _problems(screen) -> str:
    return _text(screen, "#problems")


async def test_flops_with_the_token_counts_given(qwen2vl_dir: Path, tmp_path: Path) -> None:
    info = inspect_hf(qwen2vl_dir)
    app = make_app(qwen2vl_dir, out_dir=tmp_path / "out")
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot, app)
        screen = app.screen
        await pilot.press("f3")
        assert not screen.query_one("#llm_tokens", Input).display or not screen.query_one("#llm_tokens").region
        screen.query_one("#cost", Select).value = "flops"
        screen.query_one("#pp", Input).value = "2"
        await settle(pilot, app)
        assert screen.query_one("#llm_tokens", Input).region.width > 0  # shown with the flops model
        for vit, llm in (("1024", "4096"), ("7", "3")):
            screen.query_one("#vit_tokens", Input).value = vit
            screen.query_one("#llm_tokens", Input).value = llm
            await settle(pilot, app)
            layers = screen.query_one(StageGrid).read()
            # 2 FLOPs per parameter and token, embedding tables free: by hand from the plan's tensors
            cells = cell_costs(info, layers, "flops", vit_tokens=int(vit), llm_tokens=int(llm))
            for s in range(2):
                shown = _text(screen, f"#cost-0-{s}")
                assert shown.endswith(" " + format_cost(cells[0][s], "flops")), shown
                assert "0.00" not in shown and "FLOP" in shown
        assert _problems(screen) == "layout OK"
        # a tiny model at 3 tokens: a few MFLOP, in MFLOP
        assert any("MFLOP" in _text(screen, f"#cost-0-{s}") for s in range(2))

        screen.query_one("#llm_tokens", Input).value = "0"
        await settle(pilot, app)
        assert _problems(screen) == "LLM tokens '0': give a positive whole number"
        assert screen.query_one("#llm_tokens", Input).has_class("-invalid") and screen.plan is None
        screen.query_one("#llm_tokens", Input).value = ""
        await settle(pilot, app)
        assert _problems(screen) == "LLM tokens '': give a positive whole number"


async def test_vpp_shows_each_stage_total(qwen2vl_dir: Path, tmp_path: Path) -> None:
    info = inspect_hf(qwen2vl_dir)
    app = make_app(qwen2vl_dir, out_dir=tmp_path / "out")
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(pilot, app)
        screen = app.screen
        await pilot.press("f3")
        screen.query_one("#pp", Input).value = "2"
        screen.query_one("#vpp", Input).value = "2"
        await settle(pilot, app)
        layers = screen.query_one(StageGrid).read()
        cells = cell_costs(info, layers, "params")
        totals = stage_costs(cells)
        assert totals == [cells[0][0] + cells[1][0], cells[0][1] + cells[1][1]]
        for s in range(2):
            assert "stage" not in _text(screen, f"#cost-0-{s}")
            assert _text(screen, f"#cost-1-{s}").endswith(f" · stage {s}: {format_cost(totals[s], 'params')}")


async def test_will_it_fit(qwen2vl_dir: Path, tmp_path: Path) -> None:
    info = inspect_hf(qwen2vl_dir)
    app = make_app(qwen2vl_dir, out_dir=tmp_path / "out")
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(pilot, app)
        screen = app.screen
        await pilot.press("f3")
        screen.query_one("#tp", Input).value = "2"
        screen.query_one("#pp", Input).value = "2"
        screen.query_one("#dp", Input).value = "4"
        screen.query_one("#device_gib", Input).value = "64"
        await settle(pilot, app)
        layers = screen.query_one(StageGrid).read()
        plan = build_plan(info, ParallelConfig(tp_size=2, **{f"{m}_pp_layers": v for m, v in layers.items()}))
        # independent accounting: 18 B per parameter, or 6 + 12/4 with the optimizer sharded over dp 4
        numel = {(f.tp_rank, f.pp_rank): sum(e.numel for e in f.entries) for f in plan.files}
        plain = {k: 18 * n for k, n in numel.items()}
        dist = {k: 6 * n + 12 * -(-n // 4) for k, n in numel.items()}
        fits = _text(screen, "#fits").splitlines()
        assert fits[1] == f"plain optimizer: fits on 64 GiB: {human_bytes(max(plain.values()))} / rank at most"
        assert fits[2] == (
            f"distributed optimizer over dp 4: fits on 64 GiB: {human_bytes(max(dist.values()))} / rank at most"
        )
        per = " · ".join(
            f"{s}: {human_bytes(max(plain[t, s] for t in (0, 1)))} / {human_bytes(max(dist[t, s] for t in (0, 1)))}"
            for s in (0, 1)
        )
        assert fits[3] == f"per stage, largest TP rank (plain / distributed): {per}"

        # too small a device: the rank that does not fit is named
        screen.query_one("#device_gib", Input).value = "0.001"
        await settle(pilot, app)
        top = max(plain, key=plain.get)
        name = next(f.dir_name for f in plan.files if (f.tp_rank, f.pp_rank) == top)
        assert _text(screen, "#fits").splitlines()[1] == (
            f"plain optimizer: does not fit on 0.001 GiB: {name} needs {human_bytes(plain[top])}"
        )

        for field, value, message in (
            ("dp", "0", "dp '0': give the data-parallel size as a whole number >= 1"),
            ("device_gib", "1.2.3", "device memory '1.2.3': give one device's memory in GiB, a number > 0 (e.g. 64)"),
            ("device_gib", "0", "device memory '0': give one device's memory in GiB, a number > 0 (e.g. 64)"),
        ):
            screen.query_one("#dp", Input).value = "4"
            screen.query_one("#device_gib", Input).value = "64"
            screen.query_one(f"#{field}", Input).value = value
            await settle(pilot, app)
            assert _problems(screen) == message
            assert screen.query_one(f"#{field}", Input).has_class("-invalid")
            assert not screen.query_one("#fits", Static).display and screen.plan is None
