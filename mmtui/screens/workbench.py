"""One screen: inspect the model, edit the layout with live validation, preview every rank, run, save.

It only calls the engine (inspect / layout_problems / build_plan / execute) and shows what
comes back; the engine and torch are imported in a worker, so the screen appears at once.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from textual import on, work
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Input, Label, ProgressBar, Static

if TYPE_CHECKING:
    from engine.hf_source import ModelInfo
    from engine.plan import Plan


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


class WorkbenchScreen(Screen[None]):
    BINDINGS = [
        ("ctrl+r", "run", "Run"),
        ("ctrl+s", "save", "Save TOML"),
        ("escape", "cancel", "Cancel run"),
    ]

    def __init__(self, hf_dir: Path | None, out_dir: Path | None = None) -> None:
        super().__init__()
        self.hf_dir = hf_dir
        self.out_dir = out_dir
        self.info: ModelInfo | None = None
        self.plan: Plan | None = None
        self._cancel = False

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal(id="top"):
            yield Static("Inspecting…", id="summary")
            with Vertical(id="form"):
                for name, label, value in (
                    ("hf_dir", "HF dir", str(self.hf_dir or "")),
                    ("tp", "TP", "1"),
                    ("llm", "LLM layers", ""),
                    ("vit", "ViT layers", ""),
                    ("out", "Output dir", str(self.out_dir or "")),
                ):
                    with Horizontal(classes="row"):
                        yield Label(label)
                        yield Input(value=value, id=name)
                yield Static("", id="problems")
        yield DataTable(id="preview", cursor_type="row", zebra_stripes=True)
        yield DataTable(id="tensors", cursor_type="row")
        with Horizontal(id="bottom"):
            yield ProgressBar(id="bar", show_eta=True)
            yield Static("", id="status")
        yield Footer()

    def on_mount(self) -> None:
        preview = self.query_one("#preview", DataTable)
        preview.add_columns("rank dir", "tensors", "params", "bytes", "share")
        self.query_one("#tensors", DataTable).add_columns("key", "shape", "dtype", "bytes", "sources", "transform")
        if self.hf_dir:
            self.inspect(self.hf_dir)

    # -- inspect ---------------------------------------------------------------------
    @work(thread=True, exclusive=True, group="inspect", exit_on_error=False)
    def inspect(self, hf_dir: Path) -> None:
        from engine.errors import ConvertError
        from engine.hf_source import inspect_hf

        try:
            info = inspect_hf(hf_dir)
        except ConvertError as e:
            self.app.call_from_thread(self._show_problems, [str(e)])
            return
        self.app.call_from_thread(self._inspected, info)

    def _inspected(self, info: ModelInfo) -> None:
        self.info = info
        f = info.fields
        lines = [
            f"[b]{info.preset.title}[/b]  {info.hf_dir.name}",
            f"LLM: {f['llm_layers']} layers, hidden {f['hidden_size']}, heads {f['llm_heads']}/{f['llm_kv_heads']} KV",
            f"     vocab {f['vocab_size']}, tied {bool(f['tie_word_embeddings'])}",
            f"ViT: {f['vit_layers']} layers, {f['vit_heads']} heads",
            f"{len(info.tensors)} tensors, {_gb(info.total_bytes)} in {len(info.files)} file(s)",
        ]
        self.query_one("#summary", Static).update("\n".join(lines))
        llm, vit = self.query_one("#llm", Input), self.query_one("#vit", Input)
        if not llm.value:
            llm.value = json.dumps([[f["llm_layers"]]])
        if not vit.value:
            vit.value = json.dumps([[f["vit_layers"]]])
        out = self.query_one("#out", Input)
        if not out.value:
            out.value = str(info.hf_dir.parent / f"{info.hf_dir.name}-mm")
        self.replan()

    # -- layout + preview ---------------------------------------------------------------
    @on(Input.Changed)
    def _changed(self, event: Input.Changed) -> None:
        if event.input.id == "hf_dir":
            return
        self.replan()

    @on(Input.Submitted, "#hf_dir")
    def _new_dir(self, event: Input.Submitted) -> None:
        self.inspect(Path(event.value).expanduser())

    def parallel_config(self):
        from engine.layout import ParallelConfig

        return ParallelConfig(
            tp_size=int(self.query_one("#tp", Input).value),
            llm_pp_layers=json.loads(self.query_one("#llm", Input).value),
            vit_pp_layers=json.loads(self.query_one("#vit", Input).value),
        )

    def replan(self) -> None:
        if self.info is None:
            return
        from pydantic import ValidationError

        from engine.errors import ConvertError
        from engine.layout import layout_problems
        from engine.plan import build_plan

        self.plan = None
        try:
            layout = self.parallel_config()
        except (ValueError, ValidationError):
            self._show_problems(["TP is a positive integer; layer lists look like [[1,3]] (one list per VPP chunk)"])
            return
        problems = layout_problems(layout, self.info)
        if problems:
            self._show_problems(problems)
            return
        try:
            self.plan = build_plan(self.info, layout)
        except ConvertError as e:
            self._show_problems([str(e)])
            return
        self._show_problems([])
        self._fill_preview(self.plan)

    def _show_problems(self, problems: list[str]) -> None:
        box = self.query_one("#problems", Static)
        box.set_class(not problems, "ok")
        box.update("\n".join(problems) if problems else "layout OK")
        if problems:
            self.query_one("#preview", DataTable).clear()

    def _fill_preview(self, plan: Plan) -> None:
        table = self.query_one("#preview", DataTable)
        table.clear()
        biggest = max((f.nbytes for f in plan.files), default=1) or 1
        for i, f in enumerate(plan.files):
            share = f"{100 * f.nbytes / biggest:5.1f}%"
            table.add_row(f.dir_name, str(len(f.entries)), f"{f.numel:,}", _gb(f.nbytes), share, key=str(i))

    @on(DataTable.RowSelected, "#preview")
    def _show_tensors(self, event: DataTable.RowSelected) -> None:
        if self.plan is None or event.row_key.value is None:
            return
        f = self.plan.files[int(event.row_key.value)]
        table = self.query_one("#tensors", DataTable)
        table.clear()
        for name, chunk in zip(f.chunk_names, f.chunks, strict=True):
            for e in chunk:
                key = e.key if len(f.chunks) == 1 else f"{name}: {e.key}"
                table.add_row(key, str(list(e.shape)), e.dtype, _gb(e.nbytes), ", ".join(e.sources), e.transform)
        table.add_class("shown")

    # -- run / save ---------------------------------------------------------------------
    def action_run(self) -> None:
        if self.plan is None:
            self.notify("Fix the layout first", severity="error")
            return
        self._cancel = False
        self.convert(self.plan, Path(self.query_one("#out", Input).value).expanduser())

    def action_cancel(self) -> None:
        self._cancel = True

    @work(thread=True, exclusive=True, group="run", exit_on_error=False)
    def convert(self, plan: Plan, out: Path) -> None:
        from engine.errors import ConvertError
        from engine.events import Finished, Progress, Started
        from engine.execute import execute

        bar = self.query_one("#bar", ProgressBar)
        status = self.query_one("#status", Static)
        try:
            events = execute(plan, out)
            for ev in events:
                if self._cancel:
                    events.close()
                    self.app.call_from_thread(status.update, "cancelled; nothing was written")
                    return
                if isinstance(ev, Started):
                    self.app.call_from_thread(bar.update, total=ev.total_bytes, progress=0)
                elif isinstance(ev, Progress):
                    self.app.call_from_thread(bar.update, progress=ev.done_bytes)
                    self.app.call_from_thread(status.update, ev.path)
                elif isinstance(ev, Finished):
                    rate = ev.total_bytes / max(ev.seconds, 1e-9) / 1e9
                    msg = f"done: {_gb(ev.total_bytes)} in {ev.seconds:.1f} s ({rate:.2f} GB/s) -> {ev.out_dir}"
                    self.app.call_from_thread(status.update, msg)
        except ConvertError as e:
            self.app.call_from_thread(status.update, f"[red]{e}[/red]")

    def job(self):
        from engine.job import HfConfig, HfToMmConfig, Job

        assert self.info is not None
        cfg = HfToMmConfig(
            mm_dir=Path(self.query_one("#out", Input).value),
            hf_config=HfConfig(hf_dir=self.info.hf_dir),
            parallel_config=self.parallel_config(),
        )
        return Job(converter=self.info.preset.converter, command="hf_to_mm", cfg=cfg)

    def action_save(self) -> None:
        import tomli_w

        from engine.job import job_to_dict

        if self.plan is None:
            self.notify("Fix the layout first", severity="error")
            return
        job = self.job()
        path = Path(job.cfg.mm_dir).parent / f"{Path(job.cfg.mm_dir).name}.job.toml"
        path.write_text(tomli_w.dumps(job_to_dict(job)))
        self.notify(f"saved {path}; replay with: mmtui --replay {path}")
