"""The plan before a byte is written: one row per output file; enter lists a file's tensors, and the
highlighted tensor's sources and transform show in full below (they do not fit in a column).

A filter narrows both lists. It matches a file's name, a tensor's key as written, and the names of
the tensors it is made from, so the names of either side find it (`lm_head` and `output_layer`).

A torch_dist plan (Megatron-Core's distributed checkpoint) lists its `.distcp` files, one per rank, and
each file's chunks of the global tensors: the global name and shape, where the chunk starts and its shape;
then the small files around them (`.metadata`, `common.pt`, `metadata.json`).
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

DIST = "torch_dist"  # the kinds of a torch_dist plan's files begin so (engine/formats/torch_dist_writer.py)
FILE_COLUMNS = {False: ("output file", "tensors", "params", "bytes", "share")}
FILE_COLUMNS[True] = ("output file", "chunks", "params", "bytes", "share")
TENSOR_COLUMNS = {False: ("key", "shape", "dtype", "bytes")}
TENSOR_COLUMNS[True] = ("global tensor", "global shape", "offset", "chunk shape", "dtype", "bytes")
SMALL_FILES = {  # what the small files of a torch_dist checkpoint hold, for the one who selects them
    f"{DIST}_index": "torch DCP's index: where each chunk of each .distcp file lies",
    f"{DIST}_common": "what megatron-core keeps beside the tensors",
}


def label_of(f: OutputFile) -> str:
    """How a person names a file: a rank directory, an HF shard's path, a distributed checkpoint's file."""
    return f.label if f.kind in ("torch", "safetensors") else f.path.rsplit("/", 1)[-1]


def shape_text(shape: tuple[int, ...]) -> str:
    return f"({', '.join(map(str, shape))})"


def matches(needle: str, f: OutputFile, e: Entry) -> bool:
    """Whether a tensor is one the filter asks for (a filter naming its file takes all of the file)."""
    return not needle or needle in label_of(f).lower() or needle in e.key.lower() or any(
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
        self.dist = False  # the plan writes torch_dist
        self._file: OutputFile | None = None
        self._entries: list[Entry | str] = []  # the rows of the tensor list (a str: a byte entry's key)
        self._rows: list[tuple[str, str, str, str, str]] = []  # each file's row, counted once per plan
        self._texts: list[str] | None = None  # each file's names for the filter, made at its first use
        self._small: list[tuple[str, str]] = []  # a torch_dist plan's text files: (path, text)

    def compose(self) -> ComposeResult:
        yield Input(id="filter", placeholder="filter: a file name or a tensor name, either side's", compact=True)
        yield DataTable(id="preview", cursor_type="row", zebra_stripes=True)
        yield DataTable(id="tensors", cursor_type="row")
        yield Static("", id="tensor-detail")

    def on_mount(self) -> None:
        self.query_one("#preview", DataTable).add_columns(*FILE_COLUMNS[False])
        self.query_one("#tensors", DataTable).add_columns(*TENSOR_COLUMNS[False])

    @property
    def needle(self) -> str:
        return self.query_one("#filter", Input).value.strip().lower()

    def show(self, plan: Plan | None) -> None:
        """A 671B plan at EP 64 has 8,192 files and 640,000 tensors: their sums are taken here, once, and
        the filter searches one string per file, so a keystroke does not walk every tensor again."""
        self.plan, self._texts = plan, None
        files = plan.files if plan is not None else []
        dist = any(f.kind.startswith(DIST) for f in files)
        if dist != self.dist:
            self.dist = dist
            for table, columns in (("#preview", FILE_COLUMNS), ("#tensors", TENSOR_COLUMNS)):
                self.query_one(table, DataTable).clear(columns=True).add_columns(*columns[dist])
        sums = [(len(f.entries), f.numel, f.nbytes) for f in files]
        biggest = max((b for _, _, b in sums), default=1) or 1
        self._rows = [
            (label_of(f), str(n), count(numel), size(nbytes), f"{100 * nbytes / biggest:5.1f}%")
            if n or not dist
            else (label_of(f), "", "", "", "")  # common.pt, .metadata: small, made when written
            for f, (n, numel, nbytes) in zip(files, sums, strict=True)
        ]
        self._small = []
        if dist and plan is not None:  # metadata.json (the tracker is every Megatron checkpoint's)
            self._small = [(path, text) for path, text in plan.texts.items() if "/" in path]
            self._rows += [(p.rsplit("/", 1)[-1], "", "", size(len(t.encode())), "") for p, t in self._small]
        self._fill()

    def _matching(self, needle: str) -> list[int]:
        """The rows `matches` finds something in (a NUL between names: a needle never spans two)."""
        assert self.plan is not None
        if self._texts is None:
            self._texts = [self._names(f).lower() for f in self.plan.files]
            self._texts += [name.lower() for name, *_ in self._rows[len(self.plan.files) :]]
        return [i for i, text in enumerate(self._texts) if needle in text]

    def _names(self, f: OutputFile) -> str:
        names = [label_of(f), *(e.key for e in f.entries), *(p.source for e in f.entries for p in e.pieces)]
        if self.dist:  # the byte entries (modules' extra state) are names of the file too
            names += [k for keys in f.empty for k in keys]
        return "\0".join(names)

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
        files = len(self._rows)
        plural = "" if files == 1 else "s"
        what = "torch_dist (Megatron-Core): " if self.dist else ""
        if not needle:
            table.border_title = f"{what}{files} output file{plural} · enter lists a file's {self._things}"
        elif table.row_count:
            table.border_title = f"{table.row_count} of {files} file{plural} match {escape(repr(needle))}"
        else:
            table.border_title = f"no match: no file or tensor name holds {escape(repr(needle))}"

    @property
    def _things(self) -> str:
        return "chunks" if self.dist else "tensors"

    @on(DataTable.RowSelected, "#preview")
    def _show_tensors(self, event: DataTable.RowSelected) -> None:
        if self.plan is None or event.row_key.value is None:
            return
        i = int(event.row_key.value)
        table = self.query_one("#tensors", DataTable)
        table.clear()
        self._entries = []
        self.add_class("shown")
        if i >= len(self.plan.files):  # metadata.json
            path, text = self._small[i - len(self.plan.files)]
            self._file = None
            table.border_title = escape(f"{path}: megatron-core's checkpoint config (no tensors)")
            self.query_one("#tensor-detail", Static).update(escape(text))
            return
        f = self._file = self.plan.files[i]
        if f.kind in SMALL_FILES:
            table.border_title = escape(f"{f.path}: {SMALL_FILES[f.kind]} (no tensors)")
            self.query_one("#tensor-detail", Static).update(escape(self._small_detail(f)))
            return
        needle = self.needle
        for name, chunk in zip(f.chunk_names, f.chunks, strict=True):
            for e in chunk:
                if not matches(needle, f, e):
                    continue
                c = getattr(e, "chunk", None)
                if c is not None:  # a chunk of a torch_dist global tensor
                    table.add_row(
                        c.fqn, shape_text(c.global_shape), f"@{list(c.offset)}", shape_text(c.shape), e.dtype,
                        size(e.nbytes),
                    )  # fmt: skip
                else:
                    key = e.key if len(f.chunks) == 1 else f"{name}: {e.key}"
                    table.add_row(key, str(list(e.disk_shape)), e.dtype, size(e.nbytes))
                self._entries.append(e)
        if self.dist:  # the byte entries: each linear module's extra state, which megatron-core asks for
            label = label_of(f).lower()
            for key in (k for keys in f.empty for k in keys):
                if not needle or needle in label or needle in key.lower():
                    table.add_row(key, "", "", "", "bytes", size(self._extra_state_bytes))
                    self._entries.append(key)
        total = len(f.entries) + (sum(map(len, f.empty)) if self.dist else 0)
        shown = f"{len(self._entries)} of {total}" if needle else str(total)
        things = "chunks and byte entries" if self.dist else "tensors"
        table.border_title = escape(f"{f.path}: {shown} {things}")
        self._detail(0)

    @property
    def _extra_state_bytes(self) -> int:
        from engine.formats.torch_dist_writer import object_archive

        return len(object_archive())

    def _small_detail(self, f: OutputFile) -> str:
        assert self.plan is not None
        if f.kind == f"{DIST}_common":
            return ", ".join(f.head)
        data = [g for g in self.plan.files if g.kind == DIST]
        tensors = {e.chunk.fqn for g in data for e in g.entries if getattr(e, "chunk", None) is not None}
        chunks = sum(len(g.entries) for g in data)
        extra = sum(len(keys) for g in data for keys in g.empty)
        return f"{len(tensors)} global tensors in {chunks} chunks, {extra} byte entries, over {len(data)} .distcp files"

    @on(DataTable.RowHighlighted, "#tensors")
    def _highlighted(self, event: DataTable.RowHighlighted) -> None:
        self._detail(event.cursor_row)

    def _detail(self, row: int) -> None:
        box = self.query_one("#tensor-detail", Static)
        if not 0 <= row < len(self._entries):
            box.update("")
            return
        e = self._entries[row]
        if isinstance(e, str):
            box.update(escape(f"{e}\n  a byte entry: torch.save([None]), the module's extra state (no FP8)"))
            return
        c = getattr(e, "chunk", None)
        if c is not None:
            where = f"{c.fqn} {shape_text(c.global_shape)} @{list(c.offset)} {shape_text(c.shape)}"
            box.update(escape(f"{where}\n  {e.dtype} {size(e.nbytes)} · from {', '.join(e.sources)} · {e.transform}"))
            return
        what = f"{list(e.disk_shape)} {e.dtype} {size(e.nbytes)}"
        box.update(escape(f"{e.key}\n  {what} · from {', '.join(e.sources)} · {e.transform}"))
