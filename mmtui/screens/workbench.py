"""The wizard: Source -> Layout -> Preview -> Run, as tabs of one screen.

It only gathers what the user typed into a `Job` and calls the engine (inspect, suggest,
layout_problems, prepare, execute, verify), then shows what comes back. The engine and
torch are imported inside workers, so the first screen appears at once.
"""

from __future__ import annotations

import json
import shlex
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import Button, Checkbox, Footer, Header, Input, Label, RichLog, Select, Static, TabbedContent

from ..planning import Form, Planned
from ..widgets.format import count, rate, size
from ..widgets.preview import PlanPreview, label_of
from ..widgets.run_panel import RunPanel
from ..widgets.stage_grid import StageGrid
from ..widgets.write_options import FORMAT_TITLE, WriteOptions
from .help import TextScreen, help_screen
from .pick_dir import PickDirScreen, is_model_dir
from .workbench_panes import (
    DIRECTIONS,
    DISK_FILLS,
    INPUTS,
    LAYOUT_CAPTION,
    OUT_FROM,
    OUT_SUFFIX,
    SHORT,
    SRC_DEFAULT,
    SRC_WORDS,
    TORCH_DIST_CAPTION,
    compose_tabs,
)

if TYPE_CHECKING:
    from engine.job import Job
    from engine.planning.plan import Plan
    from engine.source.hf_source import ModelInfo


class WorkbenchScreen(Screen[None]):
    BINDINGS = [
        Binding("f2", "tab('source')", "Source", show=False),  # the tab labels name their keys
        Binding("f3", "tab('layout')", "Layout", show=False),
        Binding("f4", "tab('preview')", "Preview", show=False),
        Binding("f5", "tab('run')", "Run tab", show=False),
        Binding("ctrl+b", "suggest", "Suggest"),
        Binding("ctrl+r", "run", "Run"),
        Binding("ctrl+s", "save", "Save"),
        Binding("ctrl+l", "command_line", "Command"),
        Binding("ctrl+t", "verify", "Verify", show=False),
        Binding("ctrl+o", "open", "Open", show=False),
        Binding("escape", "back", "Back/cancel", show=False),
        Binding("f1", "help", "Help"),
        Binding("question_mark", "help", "Help", show=False),
    ]

    def __init__(self, hf_dir: Path | None, out_dir: Path | None = None) -> None:
        super().__init__()
        self.hf_dir = hf_dir
        self.out_dir = out_dir
        self.info: ModelInfo | None = None
        self.plan: Plan | None = None
        self.job: Job | None = None
        self.finished_job: Job | None = None
        self._cancel = False
        self._auto_out = ""
        self._generation = 0  # bumped per edit; a planning result of an older edit is dropped
        self._opened = 0  # bumped per model opened; an inspection of an earlier one is dropped
        self._planning = False  # a planning worker is running
        self._next_plan: tuple[ModelInfo, Form, int] | None = None  # what to plan when it is done
        self._disk: dict[str, Any] = {}  # noop layers, vocab padding, experts' layout last read from disk
        self._read_format: str | None = None  # the format of the Megatron dir (legacy or torch_dist), once read

    # -- layout of the screen -----------------------------------------------------------
    def compose(self) -> ComposeResult:
        yield Header()
        yield from compose_tabs(self.hf_dir, self.out_dir)
        yield Static("", id="problems")
        yield Footer()

    def on_resize(self) -> None:
        self.set_class(self.size.width < 110, "narrow")  # the summary goes below the form: both fit 80x24
        self._retitle()

    def on_mount(self) -> None:
        self.set_class(True, "dir-hf_to_mm")
        self.set_class(True, "cost-params")
        self._retitle()
        if self.hf_dir:
            self.open_model(self.hf_dir)
        else:
            self.action_open()

    @property
    def direction(self) -> str:
        return str(self.query_one("#direction", Select).value)

    def _value(self, name: str) -> str:
        return self.query_one(f"#{name}", Input).value.strip()

    def _from_worker(self, callback: Callable[..., object], *args: object) -> None:
        """Hand a worker's result to `callback` on the app's thread, unless the app has begun to quit meanwhile:
        its widgets are then going, and a late inspection, plan, progress or verify has nowhere to be shown.
        Every worker of this screen hands back through here."""

        def deliver() -> object:
            return callback(*args) if self.is_attached else None  # an async callback's coroutine is awaited

        self.app.call_from_thread(deliver)

    # -- inspect ----------------------------------------------------------------------

    def open_model(self, hf_dir: Path) -> None:
        """Inspect hf_dir in a worker; only the model opened last is shown, whichever answers first."""
        self._opened += 1
        self._inspect(hf_dir, self._opened)

    @work(thread=True, group="inspect")  # not exclusive: an older one's answer is dropped by `_opened`
    def _inspect(self, hf_dir: Path, opened: int) -> None:
        from engine.errors import ConvertError
        from engine.source.hf_source import inspect_hf
        from engine.source.summary import summarize

        try:
            info = inspect_hf(hf_dir)
            summary = summarize(info)
        except ConvertError as e:
            self._from_worker(self._inspect_failed, str(e), opened)
            return
        self._from_worker(self._inspected, info, summary, opened)

    def _inspect_failed(self, message: str, opened: int) -> None:
        if opened != self._opened:
            return
        self.info = None
        self.query_one("#summary", Static).update(f"[red]{message}[/red]")
        self._generation += 1
        self._show(Planned([message], {"hf_dir"}, None, None, None), self._generation)

    async def _inspected(self, info: ModelInfo, summary: Any, opened: int) -> None:
        if opened != self._opened:
            return  # another model was asked for since
        self.info = info
        self.set_class(not any(m.name == "vit" for m in info.preset.modules), "no-vit")
        self.set_class(not any(m.name == "audio" for m in info.preset.modules), "no-audio")
        self.set_class(not any(m.experts for m in info.preset.modules), "no-experts")
        files = summary.files if len(summary.files) <= 2 else [summary.files[0], f"… {len(summary.files)} files"]
        modules = summary.modules
        lines = [
            f"[b]{info.preset.title}[/b] · {info.preset.converter} · {info.hf_dir.name}"
            f" · TP sizes that fit: {', '.join(map(str, summary.tp_sizes))}",
            *(f"[b]{m.title}[/b]: {m.layers} layers · {count(m.params)} params · {size(m.nbytes)}" for m in modules),
            " · ".join(f"{k}={v}" for k, v in summary.fields.items()),  # a line wraps between fields
            f"{summary.tensors} tensors · {summary.dtypes} · {size(info.total_bytes)} in {', '.join(files)}",
            *(f"[yellow]{w}[/yellow]" for w in summary.warnings),
        ]
        self.query_one("#summary", Static).update("\n".join(lines))
        self._default_out()
        await self._rebuild_grid(self._suggested(1, 1))
        self._read_disk()

    def _default_out(self) -> None:
        out = self.query_one("#out", Input)
        if out.value and out.value != self._auto_out:
            return
        base = self._value(OUT_FROM.get(self.direction, "hf_dir"))
        if base:
            p = Path(base).expanduser()
            self._auto_out = out.value = str(p.parent / f"{p.name}{OUT_SUFFIX[self.direction]}")

    # -- layout grid ------------------------------------------------------------------
    def _suggested(self, pp: int, vpp: int) -> dict[str, list[list[int]]]:
        from engine.errors import ConvertError
        from engine.planning.balance import suggest

        assert self.info is not None
        try:
            tokens = {
                name: int(self._value(name)) if self._value(name).isdigit() and int(self._value(name)) else default
                for name, default in (("vit_tokens", 1024), ("llm_tokens", 4096))
            }  # the Suggest of a half-typed count uses the default
            cost = str(self.query_one("#cost", Select).value)
            return suggest(self.info, pp, vpp, cost, **tokens).layers  # type: ignore[arg-type]
        except ConvertError:
            return {m.name: [[0] * pp for _ in range(vpp)] for m in self.info.preset.modules}

    async def _rebuild_grid(self, layers: dict[str, list[list[int]]]) -> None:
        """Put a new layout in the grid. Everything is set before the first await, so the handlers that
        run while the cells are rebuilt see the new layout, the new PP and VPP, and plan for them."""
        assert self.info is not None
        modules = [(m.name, SHORT.get(m.name, m.name)) for m in self.info.preset.modules]
        sizes = {m.name: self.info.field_int(m.layers) for m in self.info.preset.modules}
        rebuilt = self.query_one("#grid", StageGrid).set_layout(modules, layers, sizes)
        pp, vpp = len(next(iter(layers.values()))[0]), len(next(iter(layers.values())))
        self.query_one("#pp", Input).value = str(pp)
        self.query_one("#vpp", Input).value = str(vpp)
        self.replan()
        await rebuilt

    def _stages_problem(self) -> str | None:
        pp, vpp = self._value("pp"), self._value("vpp")
        if pp.isdigit() and vpp.isdigit() and 0 < int(pp) <= 64 and 0 < int(vpp) <= 16:
            return None
        return f"PP {pp!r}, VPP {vpp!r}: PP is 1..64 and VPP 1..16"

    @on(Input.Changed, "#pp, #vpp")
    async def _stages_changed(self) -> None:
        if self.info is None:
            return
        grid = self.query_one("#grid", StageGrid)
        if self._stages_problem() is None and (int(self._value("pp")), int(self._value("vpp"))) != (grid.pp, grid.vpp):
            await self._rebuild_grid(self._suggested(int(self._value("pp")), int(self._value("vpp"))))
        else:  # a bad value, or back to the grid's own shape: plan what the fields say now
            self.replan()

    async def action_suggest(self) -> None:
        if self.info is None:
            self.notify("Open a model first", severity="error")
            return
        problem = self._stages_problem()
        if problem is not None:
            self.notify(problem, severity="error")
            return
        await self._rebuild_grid(self._suggested(int(self._value("pp")), int(self._value("vpp"))))
        self.notify("balanced split applied: the largest stage is as small as the cost model allows")

    @on(Button.Pressed, "#suggest")
    async def _suggest_pressed(self) -> None:
        await self.action_suggest()

    @on(Select.Changed, "#cost")
    def _cost_changed(self) -> None:
        self.set_class(self.query_one("#cost", Select).value != "flops", "cost-params")
        self.replan()

    # -- planning (a worker, so big models do not stall typing) ---------------------
    @on(Input.Changed)
    def _changed(self, event: Input.Changed) -> None:
        if event.input.id in ("hf_dir", "filter", "pp", "vpp"):
            return
        if event.input.id in ("src", "lora"):
            self._default_out()
        if event.input.id == "src":
            self._disk = {}
            self._format_read(None)
            self._read_disk()
        self.replan()

    # -- the layout of a Megatron checkpoint, read from its disk ------------------------
    def _read_disk(self) -> None:
        """Fill the source layout from the checkpoint the Megatron dir names, as soon as it is one:
        nobody should have to restate what the disk says. The user may still edit it (the plan then
        checks the edit against the disk)."""
        src = self._value("src")
        if self.info is None or self.direction not in DISK_FILLS or not src or not Path(src).expanduser().is_dir():
            return
        self._infer(self.info, src, self.direction)

    @work(thread=True, group="disk")
    def _infer(self, info: ModelInfo, src: str, direction: str) -> None:
        from engine.errors import ConvertError
        from engine.formats.mm_source import open_checkpoint
        from engine.source.disk_layout import infer_layout

        try:
            ckpt = open_checkpoint(Path(src).expanduser())
            fmt = "legacy" if ckpt.dist is None else "torch_dist"
            self._from_worker(self._disk_format, fmt, info, src, direction)
            layout = infer_layout(info, ckpt)
        except (ConvertError, OSError):
            return  # not (yet) a checkpoint of this model: the plan says what is wrong with it
        self._from_worker(self._disk_read, layout, info, src, direction)

    def _disk_format(self, fmt: str, info: ModelInfo, src: str, direction: str) -> None:
        if info is self.info and src == self._value("src") and direction == self.direction:
            self._format_read(fmt)

    async def _disk_read(self, layout: Any, info: ModelInfo, src: str, direction: str) -> None:
        if info is not self.info or src != self._value("src") or direction != self.direction:
            return  # the fields changed since: this layout is of another question
        layers = {m.name: getattr(layout, f"{m.name}_pp_layers") for m in info.preset.modules}
        kept = {"noop_layers", "make_vocab_size_divisible_by", "moe_grouped_gemm", "expert_tp_size", "vit_tp_size",
                "audio_tp_size"}  # fmt: skip
        self._disk = layout.model_dump(include=kept, exclude_none=True, exclude_defaults=True)
        if direction == "resplit":
            for name, value in (("src_tp", layout.tp_size), ("src_ep", layout.ep_size)):
                self.query_one(f"#{name}", Input).value = str(value)
            for m in ("llm", "vit", "audio"):  # the modules a model can have (presets/*.toml)
                text = json.dumps(layers[m], separators=(",", ":")) if m in layers else ""
                self.query_one(f"#src_{m}", Input).value = text
            self.replan()
            return
        self.query_one("#tp", Input).value = str(layout.tp_size)
        self.query_one("#ep", Input).value = str(layout.ep_size)
        await self._rebuild_grid(layers)
        self.notify(f"layout read from {src}: TP {layout.tp_size}, PP {len(next(iter(layers.values()))[0])}")

    @on(Select.Changed, "#format, #grouped_gemm")
    def _format_changed(self) -> None:
        self._retitle()
        self.replan()

    def _retitle(self) -> None:
        """The header says what this screen will do, and in which format it reads or writes: the longest
        wording that fits the terminal's width."""
        label = dict((d, label) for label, d in DIRECTIONS)[self.direction]
        out, read = self.query_one(WriteOptions).value, self._read_format
        if self.direction == "hf_to_mm":
            words = [f"{label} · {FORMAT_TITLE[out]}", f"{label} · {out}"]
        elif self.direction == "resplit":
            words = [f"{label} · {read} → {FORMAT_TITLE[out]}"] if read else []
            words += [f"{label} → {FORMAT_TITLE[out]}", f"{label} → {out}"]
        elif self.direction == "mm_to_hf" and read:
            words = [f"{label} · from {FORMAT_TITLE[read]}", f"{label} · from {read}"]
        else:
            words = [label]
        room = self.size.width - 18 - len(f"{self.app.title} — ")  # the header's icon and clock take 18
        self.sub_title = next((w for w in words if len(w) <= room), words[-1])

    def _format_read(self, fmt: str | None) -> None:
        """What the Megatron dir was found to be (None: not read yet), beside it and in the header."""
        self._read_format = fmt
        self.query_one("#src-format", Label).update(f" {fmt}" if fmt else "")
        if self.direction == "mm_to_hf":
            caption = TORCH_DIST_CAPTION if fmt == "torch_dist" else LAYOUT_CAPTION["mm_to_hf"]
            self.query_one("#layout-caption", Static).update(caption)
        self._retitle()

    @on(Checkbox.Changed)
    def _overwrite_changed(self) -> None:
        self.replan()

    @on(Select.Changed, "#direction")
    def _direction_changed(self) -> None:
        for _, d in DIRECTIONS:
            self.set_class(d == self.direction, f"dir-{d}")
        self.query_one("#layout-caption", Static).update(LAYOUT_CAPTION[self.direction])
        label, hint = SRC_WORDS.get(self.direction, SRC_DEFAULT)  # the Megatron dir, or the DCP dir
        self.query_one("#src-label", Label).update(label)
        self.query_one("#src", Input).placeholder = hint
        self._default_out()
        self._disk = {}
        self._format_read(None)
        self._read_disk()
        self.replan()

    @on(Input.Submitted, "#hf_dir")
    def _new_dir(self, event: Input.Submitted) -> None:
        self.open_model(Path(event.value).expanduser())

    def _form(self) -> Form:
        return Form(
            direction=self.direction,
            hf_dir=self._value("hf_dir"),
            src=self._value("src"),
            src_tp=self._value("src_tp"),
            src_ep=self._value("src_ep"),
            src_llm=self._value("src_llm"),
            src_vit=self._value("src_vit"),
            src_audio=self._value("src_audio"),
            out=self._value("out"),
            lora=self._value("lora"),
            lora_r=self._value("lora_r"),
            lora_alpha=self._value("lora_alpha"),
            overwrite=self.query_one("#overwrite", Checkbox).value,
            tp=self._value("tp"),
            ep=self._value("ep"),
            layers=self.query_one("#grid", StageGrid).read(),
            cost=str(self.query_one("#cost", Select).value),
            disk=dict(self._disk),
            vit_tokens=self._value("vit_tokens"),
            llm_tokens=self._value("llm_tokens"),
            dp=self._value("dp"),
            device_gib=self._value("device_gib"),
            out_format=self.query_one(WriteOptions).value,
            grouped_gemm="off" if self.has_class("no-experts") else self.query_one(WriteOptions).grouped_gemm,
            hf_dtype=self.query_one("#hf_dtype", Checkbox).value,
        )

    def replan(self) -> None:
        """Validate and plan what the fields say now. Every edit comes here, so what is shown (problems,
        marks, costs, preview) is always about the current fields: older results are dropped."""
        if self.info is None:
            return
        self.plan = self.job = None
        self._generation += 1
        problem = self._stages_problem()
        if problem is not None:
            self._show(Planned([problem], {"pp", "vpp"}, None, None, None), self._generation)
            return
        self._next_plan = (self.info, self._form(), self._generation)  # the fields, read here on the UI thread
        if not self._planning:
            self._start_plan()

    def _start_plan(self) -> None:
        """One planner at a time: edits made while it works wait, and only the newest of them is planned
        next (a thread cannot be stopped, so starting one per keystroke would only pile them up)."""
        assert self._next_plan is not None
        job, self._next_plan = self._next_plan, None
        self._planning = True
        self._plan(*job)

    @work(thread=True, group="plan")
    def _plan(self, info: ModelInfo, form: Form, generation: int) -> None:
        from ..planning import plan_form

        result = plan_form(info, form)
        self._from_worker(self._planned, result, generation)

    def _planned(self, result: Planned, generation: int) -> None:
        self._planning = False
        self._show(result, generation)  # dropped if the fields changed since
        if self._next_plan is not None:
            self._start_plan()

    def _show(self, result: Planned, generation: int) -> None:
        if generation != self._generation:
            return  # the user has edited since; a newer result is on its way
        box = self.query_one("#problems", Static)
        box.set_class(not result.problems, "ok")
        if result.problems:
            box.update("\n".join(result.problems[:4]))
        else:
            box.update("\n".join(["layout OK", *(f"[yellow]{n}[/yellow]" for n in result.notes)]))
        for name in INPUTS:
            self.query_one(f"#{name}", Input).set_class(name in result.bad_fields, "-invalid")
        for name in ("format", "grouped_gemm"):
            self.query_one(f"#{name}", Select).set_class(name in result.bad_fields, "-invalid")
        grid = self.query_one("#grid", StageGrid)
        grid.mark_invalid(result.bad_fields)
        from engine.planning.balance import format_cost

        cost = str(self.query_one("#cost", Select).value)
        grid.show_costs(result.cells, lambda c: format_cost(c, cost))  # type: ignore[arg-type]
        fits = self.query_one("#fits", Static)
        head = "[b]Will it fit?[/b] weights, grads and Adam per rank (no activations)"
        fits.update("\n".join([head, *result.memory]))
        fits.display = bool(result.memory)
        self.plan, self.job = result.plan, result.job
        layers = grid.read()
        self.query_one("#flags", Static).update(
            " ".join(f"{m}_pp_layers {json.dumps(v, separators=(',', ':'))}" for m, v in (layers or {}).items())
        )
        self.query_one(PlanPreview).show(self.plan)

    # -- run ----------------------------------------------------------------------------
    def action_tab(self, tab: str) -> None:
        self.query_one("#tabs", TabbedContent).active = "preview-tab" if tab == "preview" else tab

    def action_back(self) -> None:
        if self._is_converting():
            self.action_cancel()
            return
        tabs = self.query_one("#tabs", TabbedContent)
        order = ["source", "layout", "preview-tab", "run"]
        i = order.index(tabs.active) if tabs.active in order else 0
        tabs.active = order[max(0, i - 1)]

    def _is_converting(self) -> bool:
        return any(w.group == "run" and w.is_running for w in self.workers)

    def action_run(self) -> None:
        if self.plan is None or self.job is None:
            self.notify("Fix the problems shown at the bottom first", severity="error")
            return
        if self._is_converting():
            return
        self._cancel = False
        self.action_tab("run")
        panel = self.query_one(RunPanel)
        panel.reset([(label_of(f), f.nbytes) for f in self.plan.files])
        panel.query_one("#ranks").focus()  # off any text field, so q and escape reach their bindings
        self.convert(self.plan, self.job, panel)

    def action_cancel(self) -> None:
        self._cancel = True

    @work(thread=True, exclusive=True, group="run")
    def convert(self, plan: Plan, job: Job, panel: RunPanel) -> None:
        """Relay the engine's events to the panel (widgets are touched only on the UI thread)."""
        import resource

        from engine.errors import ConvertError
        from engine.events import FileDone, FileStarted, Finished, Progress
        from engine.run.execute import execute

        call = self._from_worker
        last = 0.0
        try:
            events = execute(plan, job.out_dir, overwrite=job.overwrite)
            for ev in events:
                if self._cancel:
                    events.close()
                    call(panel.abort, "cancelled; nothing was written")
                    return
                if isinstance(ev, FileStarted):
                    call(panel.file_started, ev.index, ev.path)
                elif isinstance(ev, Progress):
                    now = time.monotonic()
                    if now - last > 0.05 or ev.done_bytes == ev.total_bytes:  # the screen needs ~20 updates/s
                        last = now
                        call(panel.progress, ev.done_bytes, ev.total_bytes)
                elif isinstance(ev, FileDone):
                    call(panel.file_done, ev.index, ev.path)
                elif isinstance(ev, Finished):
                    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
                    speed = rate(ev.total_bytes / max(ev.seconds, 1e-9))
                    call(panel.progress, ev.total_bytes, ev.total_bytes)
                    call(
                        panel.finish,
                        f"[green]done[/green]: {size(ev.total_bytes)} in {ev.seconds:.1f} s ({speed}), "
                        f"peak memory {peak:.0f} MB -> {ev.out_dir}   ctrl+t verifies it against the source",
                    )
                    self.finished_job = job
        except ConvertError as e:
            call(panel.abort, str(e))
        call(self.replan)  # the output dir may be there now: say so before the next Run

    def action_verify(self) -> None:
        if self.finished_job is None or self.info is None:
            self.notify("Run a conversion first", severity="error")
            return
        self.action_tab("run")
        panel = self.query_one(RunPanel)
        panel.query_one("#log", RichLog).write("verifying: reading both sides tensor by tensor…")
        self._verify(self.info, self.finished_job, panel)

    @work(thread=True, exclusive=True, group="verify")
    def _verify(self, info: ModelInfo, job: Job, panel: RunPanel) -> None:
        from engine.errors import ConvertError
        from engine.run.verify import verify_job

        try:
            ok, summary = verify_job(info, job)
        except ConvertError as e:
            self._from_worker(panel.fail, f"verify: {e}")
            return
        color = "green" if ok else "red"
        self._from_worker(panel.finish, f"[{color}]verify: {summary}[/{color}]")

    # -- save / command line / help ----------------------------------------------------
    def action_save(self) -> None:
        import tomli_w

        from engine.job import job_to_dict

        if self.job is None:
            self.notify("Fix the problems shown at the bottom first", severity="error")
            return
        out = Path(self.job.out_dir)
        path = out.parent / f"{out.name}.job.toml"
        path.write_text(tomli_w.dumps(job_to_dict(self.job)))
        self.notify(f"saved {path}; replay with: mmtui --replay {path}")

    def action_command_line(self) -> None:
        from engine.job import job_to_argv

        if self.job is None:
            self.notify("Fix the problems shown at the bottom first", severity="error")
            return
        line = shlex.join(["mm-convert", *job_to_argv(self.job)])
        self.app.copy_to_clipboard(line)
        self.app.push_screen(TextScreen(line + "\n\n(copied to the clipboard where the terminal allows)", "mm-convert"))

    def action_open(self) -> None:
        """Pick the model directory from a tree (also what `mmtui` without an argument shows first)."""
        typed = Path(self._value("hf_dir")).expanduser() if self._value("hf_dir") else None
        root = Path.cwd()
        if typed and typed.is_dir():  # start beside the open model, to pick a sibling
            root = typed.parent if is_model_dir(typed) else typed

        def chosen(path: Path | None) -> None:
            if path is not None:
                self.query_one("#hf_dir", Input).value = str(path)
                self.open_model(path)

        self.app.push_screen(PickDirScreen(root), chosen)

    def action_help(self) -> None:
        self.app.push_screen(help_screen())
