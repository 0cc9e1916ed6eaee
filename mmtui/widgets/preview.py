"""The plan before a byte is written: one row per output file; enter lists a file's tensors, and the
highlighted tensor's sources and transform show in full below (they do not fit in a column).

A filter narrows both lists. It matches a file's name, a tensor's key as written, and the names of
the tensors it is made from, so the names of either side find it (`lm_head` and `output_layer`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.markup import escape
from textual import on
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import DataTable, Input, Static

from .format import count, size

if TYPE_CHECKING:
    from engine.planning.plan import Entry, OutputFile, Plan


def matches(needle: str, f: OutputFile, e: Entry) -> bool:
    """Whether a tensor is one the filter asks for (a filter naming its file takes all of the file)."""
    return not needle or needle in f.label.lower() or needle in e.key.lower() or any(
        needle in s.lower() for s in e.sources
    )  # fmt: skip


class PlanPreview(Vertical):
    DEFAULT_CSS = """
    PlanPreview { height: 1fr; }
    PlanPreview #filter { height: 1; padding: 0 1; }
    PlanPreview #preview { height: 1fr; min-height: 4; border: round $primary; }
    PlanPreview #tensors { height: 1fr; border: round $secondary; display: none; }
    PlanPreview #tensor-detail { height: auto; max-height: 4; padding: 0 1; display: none; }
    PlanPreview.shown #tensors, PlanPreview.shown #tensor-detail { display: block; }
    """

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.plan: Plan | None = None
        self._file: OutputFile | None = None
        self._entries: list[Entry] = []  # the rows of the tensor list
        self._rows: list[tuple[str, str, str, str, str]] = []  # each file's row, counted once per plan
        self._texts: list[str] | None = None  # each file's names for the filter, made at its first use

    def compose(self) -> ComposeResult:
        yield Input(id="filter", placeholder="filter: a file name or a tensor name, either side's", compact=True)
        yield DataTable(id="preview", cursor_type="row", zebra_stripes=True)
        yield DataTable(id="tensors", cursor_type="row")
        yield Static("", id="tensor-detail")

    def on_mount(self) -> None:
        self.query_one("#preview", DataTable).add_columns("output file", "tensors", "params", "bytes", "share")
        self.query_one("#tensors", DataTable).add_columns("key", "shape", "dtype", "bytes")

    @property
    def needle(self) -> str:
        return self.query_one("#filter", Input).value.strip().lower()

    def show(self, plan: Plan | None) -> None:
        """A 671B plan at EP 64 has 8,192 files and 640,000 tensors: their sums are taken here, once, and
        the filter searches one string per file, so a keystroke does not walk every tensor again."""
        self.plan, self._texts = plan, None
        files = plan.files if plan is not None else []
        sums = [(len(f.entries), f.numel, f.nbytes) for f in files]
        biggest = max((b for _, _, b in sums), default=1) or 1
        self._rows = [
            (f.label, str(n), count(numel), size(nbytes), f"{100 * nbytes / biggest:5.1f}%")
            for f, (n, numel, nbytes) in zip(files, sums, strict=True)
        ]
        self._fill()

    def _matching(self, needle: str) -> list[int]:
        """The files `matches` finds something in (a NUL between names: a needle never spans two)."""
        assert self.plan is not None
        if self._texts is None:
            self._texts = [
                "\0".join([f.label, *(e.key for e in f.entries), *(p.source for e in f.entries for p in e.pieces)])
                .lower()
                for f in self.plan.files
            ]
        return [i for i, text in enumerate(self._texts) if needle in text]

    @on(Input.Changed, "#filter")
    def _filter_changed(self) -> None:
        self._fill()

    def _fill(self) -> None:
        table = self.query_one("#preview", DataTable)
        table.clear()
        self.remove_class("shown")
        if self.plan is None:
            table.border_title = "no plan: see the problems below"
            return
        needle = self.needle
        for i in self._matching(needle) if needle else range(len(self._rows)):
            table.add_row(*self._rows[i], key=str(i))
        files = len(self.plan.files)
        plural = "" if files == 1 else "s"
        if not needle:
            table.border_title = f"{files} output file{plural} · enter lists a file's tensors"
        elif table.row_count:
            table.border_title = f"{table.row_count} of {files} file{plural} match {escape(repr(needle))}"
        else:
            table.border_title = f"no match: no file or tensor name holds {escape(repr(needle))}"

    @on(DataTable.RowSelected, "#preview")
    def _show_tensors(self, event: DataTable.RowSelected) -> None:
        if self.plan is None or event.row_key.value is None:
            return
        f = self._file = self.plan.files[int(event.row_key.value)]
        needle = self.needle
        table = self.query_one("#tensors", DataTable)
        table.clear()
        self._entries = []
        for name, chunk in zip(f.chunk_names, f.chunks, strict=True):
            for e in chunk:
                if not matches(needle, f, e):
                    continue
                key = e.key if len(f.chunks) == 1 else f"{name}: {e.key}"
                table.add_row(key, str(list(e.disk_shape)), e.dtype, size(e.nbytes))
                self._entries.append(e)
        shown = f"{len(self._entries)} of {len(f.entries)}" if needle else str(len(f.entries))
        table.border_title = escape(f"{f.path}: {shown} tensors")
        self.add_class("shown")
        self._detail(0)

    @on(DataTable.RowHighlighted, "#tensors")
    def _highlighted(self, event: DataTable.RowHighlighted) -> None:
        self._detail(event.cursor_row)

    def _detail(self, row: int) -> None:
        box = self.query_one("#tensor-detail", Static)
        if not 0 <= row < len(self._entries):
            box.update("")
            return
        e = self._entries[row]
        what = f"{list(e.disk_shape)} {e.dtype} {size(e.nbytes)}"
        box.update(escape(f"{e.key}\n  {what} · from {', '.join(e.sources)} · {e.transform}"))
