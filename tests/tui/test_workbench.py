"""Pilot tests of the wizard: the TUI drives the engine and its output equals the headless run."""

from __future__ import annotations

import tomllib
from pathlib import Path

import torch
from textual.widgets import DataTable, Input, RichLog, Static

from engine.job import load_job
from engine.layout import ParallelConfig
from engine.planning.balance import suggest
from engine.planning.build import build_plan
from engine.run.execute import run
from engine.source.hf_source import inspect_hf
from mmtui.app import make_app
from mmtui.runner import run_job
from mmtui.widgets.stage_grid import StageGrid, cell_id


async def settle(pilot, app) -> None:
    """Let handlers, the grid rebuild and the planning workers finish (a finished plan can start the next)."""
    from textual.worker import WorkerState

    for _ in range(20):
        await pilot.pause()
        await app.workers.wait_for_complete()
        await pilot.pause()
        if not any(w.state in (WorkerState.PENDING, WorkerState.RUNNING) for w in app.workers):
            return
    raise AssertionError(f"workers still running: {list(app.workers)}")


def _load(out: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {p.parent.name: torch.load(p, weights_only=True)["model"] for p in sorted(out.glob("release/*/*.pt"))}


def _equal(a: Path, b: Path) -> bool:
    ta, tb = _load(a), _load(b)
    return ta.keys() == tb.keys() and all(
        ta[r].keys() == tb[r].keys() and all(torch.equal(ta[r][k], tb[r][k]) for k in ta[r]) for r in ta
    )


def _problems(screen) -> str:
    return str(screen.query_one("#problems", Static).render())


async def test_full_flow(qwen2vl_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "tui-out"
    info = inspect_hf(qwen2vl_dir)
    app = make_app(qwen2vl_dir, out_dir=out)
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(pilot, app)
        screen = app.screen
        assert "Qwen2-VL" in str(screen.query_one("#summary", Static).render())
        assert screen.query_one("#preview", DataTable).row_count == 1  # defaults: TP1, PP1

        # a validation error appears next to its field, then clears
        screen.query_one("#tp", Input).value = "3"
        await settle(pilot, app)
        assert "tp_size 3 does not divide vision_config.num_heads = 4" in _problems(screen)
        assert screen.query_one("#tp", Input).has_class("-invalid")
        assert screen.query_one("#preview", DataTable).row_count == 0
        screen.query_one("#tp", Input).value = "2"
        await settle(pilot, app)
        assert _problems(screen) == "layout OK" and not screen.query_one("#tp", Input).has_class("-invalid")

        # a new PP fills the grid with the balanced split; an edit that breaks a sum is flagged
        await pilot.press("f3")
        screen.query_one("#pp", Input).value = "2"
        await settle(pilot, app)
        best = suggest(info, 2)
        assert screen.query_one(StageGrid).read() == best.layers
        screen.query_one(f"#{cell_id('llm', 0, 0)}", Input).value = "3"
        await settle(pilot, app)
        assert "llm_pp_layers [[3, " in _problems(screen) and "sums to" in _problems(screen)
        assert screen.query_one(f"#{cell_id('llm', 0, 1)}", Input).has_class("-invalid")
        await pilot.press("ctrl+b")  # Suggest puts the optimum back
        await settle(pilot, app)
        assert screen.query_one(StageGrid).read() == best.layers
        assert _problems(screen) == "layout OK"

        # set an explicit layout and preview it
        for module, counts in (("vit", [3, 0]), ("llm", [1, 3])):
            for s, n in enumerate(counts):
                screen.query_one(f"#{cell_id(module, 0, s)}", Input).value = str(n)
        await settle(pilot, app)
        await pilot.press("f4")
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
        plan = build_plan(info, ParallelConfig(tp_size=2, llm_pp_layers=[[1, 3]], vit_pp_layers=[[3, 0]]))
        assert keys == {e.key for e in plan.files[1].entries}
        screen.query_one("#filter", Input).value = "mp_rank_01"
        await pilot.pause()
        assert preview.row_count == 2

        await pilot.press("ctrl+r")
        await settle(pilot, app)
        assert "done" in str(screen.query_one("#status", Static).render())
        await pilot.press("ctrl+t")
        await settle(pilot, app)
        log = "\n".join(line.text for line in screen.query_one("#log", RichLog).lines)
        assert "verify: identical" in log

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


async def test_way_back_from_the_wizard(qwen2vl_dir: Path, tmp_path: Path) -> None:
    """Direction MM -> HF: the grid is the source layout; the output equals the original bytes."""
    from textual.widgets import Select

    mm = tmp_path / "mm"
    run(build_plan(inspect_hf(qwen2vl_dir), ParallelConfig(llm_pp_layers=[[1, 3]], vit_pp_layers=[[3, 0]])), mm)
    app = make_app(qwen2vl_dir, out_dir=tmp_path / "back")
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(pilot, app)
        screen = app.screen
        screen.query_one("#direction", Select).value = "mm_to_hf"
        screen.query_one("#src", Input).value = str(mm)
        screen.query_one("#pp", Input).value = "2"
        await settle(pilot, app)
        for module, counts in (("vit", [3, 0]), ("llm", [1, 3])):
            for s, n in enumerate(counts):
                screen.query_one(f"#{cell_id(module, 0, s)}", Input).value = str(n)
        await settle(pilot, app)
        assert _problems(screen).startswith("layout OK"), _problems(screen)
        assert screen.query_one("#preview", DataTable).get_row_at(0)[0] == "model.safetensors"
        await pilot.press("ctrl+r")
        await settle(pilot, app)
    original = (qwen2vl_dir / "model.safetensors").read_bytes()
    assert (tmp_path / "back" / "model.safetensors").read_bytes() == original


async def test_demo_opens(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    app = make_app(demo=True)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot, app)
        assert "Qwen2-VL" in str(app.screen.query_one("#summary", Static).render())
        assert app.screen.query_one("#preview", DataTable).row_count == 1


async def test_help_and_command_line(qwen2vl_dir: Path, tmp_path: Path) -> None:
    from mmtui.screens.help import TextScreen

    app = make_app(qwen2vl_dir, out_dir=tmp_path / "o")
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot, app)
        await pilot.press("f1")
        assert isinstance(app.screen, TextScreen) and "ctrl+b" in str(app.screen.query_one("#text").render())
        await pilot.press("escape")
        await pilot.press("ctrl+l")
        await pilot.pause()
        text = str(app.screen.query_one("#text").render())
        assert text.startswith("mm-convert Qwen2VLConverter hf_to_mm --cfg.mm_dir")
        assert "--cfg.parallel_config.llm_pp_layers '[[4]]'" in text


async def test_quit_asks_while_running_and_cancels(qwen2vl_dir: Path, tmp_path: Path, monkeypatch) -> None:
    import time

    import engine.run.execute
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

    monkeypatch.setattr(engine.run.execute, "execute", slow_execute)
    app = make_app(qwen2vl_dir, out_dir=tmp_path / "out")
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot, app)
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
        await settle(pilot, app)
        app.screen.query_one("#preview", DataTable).focus()
        await pilot.press("q")
        await pilot.pause()
        assert app.return_code == 0 or not app.is_running


async def _suggest_and_run(hf: Path, tmp_path: Path, title: str, tp: int, files: int) -> None:
    """Open hf, set TP and PP 2: the grid holds the balanced split, no problem, `files` preview rows; the
    run writes what a headless conversion of that layout writes."""
    app = make_app(hf, out_dir=tmp_path / "tui")
    layers = suggest(inspect_hf(hf), 2).layers
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(pilot, app)
        screen = app.screen
        assert title in str(screen.query_one("#summary", Static).render())
        await pilot.press("f3")
        screen.query_one("#tp", Input).value = str(tp)
        screen.query_one("#pp", Input).value = "2"
        await settle(pilot, app)
        assert screen.query_one(StageGrid).read() == layers
        assert _problems(screen).splitlines()[0] == "layout OK"  # notes may follow (a tied output layer)
        assert screen.query_one("#preview", DataTable).row_count == files
        await pilot.press("ctrl+r")
        await settle(pilot, app)
        assert "done" in str(screen.query_one("#status", Static).render())
    layout = ParallelConfig(tp_size=tp, **{f"{m}_pp_layers": v for m, v in layers.items()})
    run(build_plan(inspect_hf(hf), layout), tmp_path / "headless")
    assert _equal(tmp_path / "tui", tmp_path / "headless")


async def test_language_model_only(tiny_llms: dict[str, Path], tmp_path: Path) -> None:
    """A Llama checkpoint: one grid column (no ViT), Suggest and Run work, output == headless."""
    await _suggest_and_run(tiny_llms["llama"], tmp_path, "Llama", tp=2, files=4)


async def test_internvl_with_uneven_vit_heads(tiny_internvls: dict[str, Path], tmp_path: Path) -> None:
    """InternVL at TP 4 (6 ViT heads, 130 vocabulary rows): no problem shown, Suggest and Run == headless."""
    await _suggest_and_run(tiny_internvls["qwen2"], tmp_path, "InternVL · Qwen2", tp=4, files=8)


async def test_merge_an_adapter_and_preview_what_changes(tiny_llms: dict[str, Path], tmp_path: Path) -> None:
    """Merge a LoRA adapter into HF from the wizard: the preview marks the changed tensors; output == headless."""
    from textual.widgets import Select

    from engine.job import HfConfig, Job, LoraConfig, MergeLoraConfig, prepare
    from tests.fixtures.tiny_lora import build_peft_adapter

    hf = tiny_llms["llama"]
    build_peft_adapter(hf, tmp_path / "adapter", target_modules=["q_proj", "down_proj"])
    app = make_app(hf, out_dir=tmp_path / "tui")
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(pilot, app)
        screen = app.screen
        screen.query_one("#direction", Select).value = "merge_lora"
        await settle(pilot, app)
        assert "LoRA adapter is empty" in _problems(screen)
        assert screen.query_one("#lora", Input).has_class("-invalid")
        screen.query_one("#lora", Input).value = str(tmp_path / "adapter")
        await settle(pilot, app)
        assert "LoRA: 8 weights merged" in _problems(screen)
        await pilot.press("f4")
        preview = screen.query_one("#preview", DataTable)
        assert [preview.get_row_at(i)[0] for i in range(preview.row_count)] == [
            "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
        ]  # fmt: skip
        screen.query_one("#filter", Input).value = ""
        preview.focus()
        preview.move_cursor(row=0)
        await pilot.press("enter")
        await pilot.pause()
        tensors = screen.query_one("#tensors", DataTable)
        changed = set()
        for i in range(tensors.row_count):  # the highlighted tensor's transform shows below the list
            tensors.move_cursor(row=i)
            await pilot.pause()
            if "LoRA" in str(screen.query_one("#tensor-detail", Static).render()):
                changed.add(tensors.get_row_at(i)[0])
        assert changed and all(k.endswith(("q_proj.weight", "down_proj.weight")) for k in changed)
        await pilot.press("ctrl+r")
        await settle(pilot, app)
        assert "done" in str(screen.query_one("#status", Static).render())
    cfg = MergeLoraConfig(save_hf_dir=tmp_path / "headless", hf_config=HfConfig(hf_dir=hf),
                          lora=LoraConfig(adapter_dir=tmp_path / "adapter"))  # fmt: skip
    _, plan = prepare(Job(converter="LlamaConverter", command="merge_lora", cfg=cfg))
    run(plan, tmp_path / "headless")
    for f in (tmp_path / "headless").iterdir():
        assert f.read_bytes() == (tmp_path / "tui" / f.name).read_bytes(), f.name


async def test_a_mindspeed_adapter_back_to_peft_asks_for_r_and_alpha(tiny_llms: dict[str, Path], tmp_path: Path):
    """Adapter Megatron -> PEFT: an adapter mmtui did not write needs its r and alpha, asked for on the Source tab."""
    from textual.widgets import Select

    from engine.job import HfConfig, Job, LoraConfig, LoraMmToHfConfig, prepare
    from tests.engine.test_lora import _mindspeed_adapter

    hf = tiny_llms["llama"]
    _mindspeed_adapter(hf, tmp_path / "ms", r=4)
    app = make_app(hf, out_dir=tmp_path / "peft")
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(pilot, app)
        screen = app.screen
        screen.query_one("#direction", Select).value = "lora_mm_to_hf"
        screen.query_one("#src", Input).value = str(tmp_path / "ms")
        await settle(pilot, app)
        assert "give lora.r and lora.alpha" in _problems(screen)
        assert screen.query_one("#lora_r", Input).has_class("-invalid")
        screen.query_one("#lora_r", Input).value = "4"
        screen.query_one("#lora_alpha", Input).value = "16"
        await settle(pilot, app)
        assert _problems(screen).splitlines()[0] == "layout OK"
        await pilot.press("ctrl+r")
        await settle(pilot, app)
        assert "done" in str(screen.query_one("#status", Static).render())
    lora = LoraConfig(adapter_dir=tmp_path / "ms", parallel_config=ParallelConfig(llm_pp_layers=[[4]]), r=4, alpha=16)
    cfg = LoraMmToHfConfig(save_hf_dir=tmp_path / "headless", hf_config=HfConfig(hf_dir=hf), lora=lora)
    _, plan = prepare(Job(converter="LlamaConverter", command="lora_mm_to_hf", cfg=cfg))
    run(plan, tmp_path / "headless")
    for f in (tmp_path / "headless").iterdir():
        assert f.read_bytes() == (tmp_path / "peft" / f.name).read_bytes(), f.name


async def test_mixture_of_experts_takes_an_ep_size(tiny_llms: dict[str, Path], tmp_path: Path) -> None:
    """A Mixtral checkpoint shows EP; an EP that does not divide the experts is marked, a good one runs."""
    hf = tiny_llms["mixtral"]
    app = make_app(hf, out_dir=tmp_path / "tui")
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(pilot, app)
        screen = app.screen
        assert screen.query_one("#ep", Input).display
        await pilot.press("f3")
        screen.query_one("#ep", Input).value = "3"
        await settle(pilot, app)
        assert _problems(screen).startswith("parallel_config.ep_size 3 does not divide num_local_experts = 4")
        assert screen.query_one("#ep", Input).has_class("-invalid")
        screen.query_one("#ep", Input).value = "2"
        await settle(pilot, app)
        assert _problems(screen) == "layout OK"
        # will it fit? the data-parallel size is a multiple of EP (empty: EP itself)
        screen.query_one("#dp", Input).value = "3"
        await settle(pilot, app)
        assert _problems(screen).startswith("dp = 3: with ep_size 2 the data-parallel size must be a multiple of 2")
        assert screen.query_one("#dp", Input).has_class("-invalid") and screen.plan is None
        screen.query_one("#dp", Input).value = ""
        await settle(pilot, app)
        assert _problems(screen) == "layout OK"
        assert "distributed optimizer over dp 2:" in str(screen.query_one("#fits", Static).render())
        preview = screen.query_one("#preview", DataTable)
        assert [preview.get_row_at(i)[0] for i in range(preview.row_count)] == ["mp_rank_00_000", "mp_rank_00_001"]
        await pilot.press("ctrl+r")
        await settle(pilot, app)
        assert "done" in str(screen.query_one("#status", Static).render())
    run(build_plan(inspect_hf(hf), ParallelConfig(ep_size=2, llm_pp_layers=[[4]])), tmp_path / "headless")
    assert _equal(tmp_path / "tui", tmp_path / "headless")
    # a dense model hides the field
    app = make_app(tiny_llms["llama"], out_dir=tmp_path / "llama")
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(pilot, app)
        assert not app.screen.query_one("#ep", Input).display


async def test_no_argument_opens_a_directory_picker(tiny_dirs: dict[str, Path], tmp_path: Path, monkeypatch) -> None:
    """`mmtui` alone: pick the model from a tree; a directory without config.json is not taken."""
    from textual.widgets import DirectoryTree

    from mmtui.screens.pick_dir import PickDirScreen

    monkeypatch.chdir(tiny_dirs["qwen2_vl"].parent)
    app = make_app(None, out_dir=tmp_path / "out")
    async with app.run_test(size=(80, 24)) as pilot:
        # not settle(): the tree's loader is a worker that lives as long as the tree
        await pilot.pause(0.2)
        assert isinstance(app.screen, PickDirScreen)
        app.screen.query_one("#pick-path", Input).value = str(tmp_path)  # no config.json there
        app.screen.query_one("#pick-path", Input).focus()
        await pilot.press("enter")
        await pilot.pause()
        assert isinstance(app.screen, PickDirScreen)
        assert "no config.json here" in str(app.screen.query_one("#pick-hint", Static).render())
        tree = app.screen.query_one(DirectoryTree)
        tree.focus()
        await pilot.pause(0.2)
        names = [str(node.data.path.name) for node in tree.root.children]
        tree.move_cursor(tree.root.children[names.index("qwen2_5_vl")])
        await pilot.press("enter")
        await settle(pilot, app)
        assert not isinstance(app.screen, PickDirScreen)
        assert "Qwen2.5-VL" in str(app.screen.query_one("#summary", Static).render())
        assert app.screen.query_one("#hf_dir", Input).value == str(tiny_dirs["qwen2_5_vl"])


async def test_qwen3_vl_moe(tmp_path: Path) -> None:
    """Qwen3-VL-MoE (deepstack mergers, fused experts) at TP 2: Suggest and Run == headless."""
    from tests.fixtures.tiny_qwen3_vl import build_tiny_qwen3_vl

    hf = build_tiny_qwen3_vl(tmp_path / "hf", "qwen3_vl_moe", tied=False)
    await _suggest_and_run(hf, tmp_path, "Qwen3-VL-MoE", tp=2, files=4)


async def test_a_worker_result_arriving_as_the_app_quits_is_dropped(qwen2vl_dir: Path, tmp_path: Path) -> None:
    """A plan or inspection that finishes after quit was asked is not shown: its widgets are being removed, and
    showing it crashed the app (seen as a crash log of the demo's first screen under load)."""
    import asyncio

    app = make_app(qwen2vl_dir, out_dir=tmp_path / "out")
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot, app)
        screen = app.screen
        delivered: list[int] = []


        async def later(n: int) -> None:  # the screen's own handlers of worker results are coroutines too
            delivered.append(n)

        await asyncio.to_thread(screen._from_worker, delivered.append, 1)  # as a worker thread hands a result
        await asyncio.to_thread(screen._from_worker, later, 2)
        assert delivered == [1, 2]
        app.exit()
        await asyncio.to_thread(screen._from_worker, delivered.append, 3)
        await asyncio.to_thread(screen._from_worker, later, 4)
        assert delivered == [1, 2]
    assert not app.crashed
