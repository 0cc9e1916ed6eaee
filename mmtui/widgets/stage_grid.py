"""The per-stage layout editor: one row per (chunk, stage), one input per module, a cost bar.

It holds numbers only; the screen asks the engine for validation and costs and hands them
back through `show_costs` and `mark_invalid`.

The numbers live in this object, not in its cells: `read()` never queries a widget. A new
layout (another model, another PP) replaces the numbers at once and rebuilds the cells
afterwards, so whatever runs while the cells are being replaced (a planning result, an
edit elsewhere) reads the layout the user asked for, and never a half-built grid.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator

from textual import on
from textual.app import ComposeResult
from textual.containers import Horizontal, VerticalScroll
from textual.widget import Widget
from textual.widgets import Input, Label, Static

from .format import bar

BAR_WIDTH = 20

Layers = dict[str, list[list[int]]]


def cell_id(module: str, chunk: int, stage: int) -> str:
    return f"cell-{module}-{chunk}-{stage}"


class StageGrid(VerticalScroll):
    """Layer counts per module for every (chunk, stage) cell, chunk-major like the layout lists."""

    DEFAULT_CSS = """
    StageGrid { height: 1fr; border: round $primary; padding: 0 1; }
    StageGrid .head { height: 1; text-style: bold; }
    StageGrid .cell-row { height: 1; }
    StageGrid .where { width: 12; }
    StageGrid Input { width: 8; margin-right: 2; }
    StageGrid Input.-invalid { background: $error 30%; }
    StageGrid .head Label.mod { width: 10; }
    StageGrid .cost, StageGrid .cost-head { width: 1fr; }
    """

    def __init__(self, modules: list[tuple[str, str]], layers: Layers, **kw) -> None:
        super().__init__(**kw)
        self._lock = asyncio.Lock()  # one rebuild of the cells at a time
        self._version = self._built = 0
        self._costs: tuple[list[list[int]] | None, Callable[[int], str]] = (None, str)
        self._invalid: set[str] = set()
        self._set(modules, layers, {})

    def _set(self, modules: list[tuple[str, str]], layers: Layers, sizes: dict[str, int]) -> None:
        self.modules = modules  # (name, short title)
        self.sizes = sizes  # module -> how many layers the model has
        self.counts = layers  # the shape (chunks x stages) the cells are built for
        self._text = {
            cell_id(name, c, s): str(n) for name, _ in modules for c, chunk in enumerate(layers[name])
            for s, n in enumerate(chunk)
        }  # fmt: skip
        self._cells: dict[Input, tuple[str, str]] = {}  # cell -> (id, module), of the current build only
        self._cost_boxes: dict[tuple[int, int], Static] = {}
        self._costs = (None, str)
        self._past: dict[tuple[int, int], str] = {}
        self._invalid = set()

    @property
    def pp(self) -> int:
        return len(next(iter(self.counts.values()))[0])

    @property
    def vpp(self) -> int:
        return len(next(iter(self.counts.values())))

    # -- building the cells -------------------------------------------------------------
    def _rows(self) -> Iterator[Widget]:
        yield Horizontal(
            Label("stage", classes="where"),
            *(Label(title, classes="mod") for _, title in self.modules),
            Label("cost", classes="cost-head"),
            classes="head",
        )
        for c in range(self.vpp):
            for s in range(self.pp):
                cells = []
                for name, _ in self.modules:
                    key = cell_id(name, c, s)
                    cell = Input(self._text[key], id=key, restrict=r"\d*", compact=True)
                    cell.set_class(name in self._invalid, "-invalid")
                    self._cells[cell] = (key, name)
                    cells.append(cell)
                box = self._cost_boxes[(c, s)] = Static(self._cost_text(c, s), id=f"cost-{c}-{s}", classes="cost")
                where = Label(f"{s}" if self.vpp == 1 else f"{s} · chunk {c}", classes="where")
                yield Horizontal(where, *cells, box, classes="cell-row")

    def compose(self) -> ComposeResult:
        yield from self._rows()

    def set_layout(
        self, modules: list[tuple[str, str]], layers: Layers, sizes: dict[str, int] | None = None
    ) -> Awaitable[None]:
        """Take a new layout now (`read()` returns it from here on); await the result to have its cells.
        `sizes` (each module's layer count) lets a cell say that its layers are past the model's last."""
        self._set(modules, layers, sizes or {})
        self._version += 1
        return self._rebuild()

    async def _rebuild(self) -> None:
        async with self._lock:
            if self._built == self._version:  # a later call already built the newest layout
                return
            version = self._version
            await self.remove_children()
            self._cells, self._cost_boxes = {}, {}
            await self.mount_all(list(self._rows()))
            self.call_after_refresh(self._refresh_costs)  # the bars take the room the numbers leave
            self._built = version

    # -- the numbers ----------------------------------------------------------------------
    @on(Input.Changed)
    def _typed(self, event: Input.Changed) -> None:
        if event.input in self._cells:  # not a cell of a grid being replaced
            self._text[self._cells[event.input][0]] = event.value  # the event goes on to the screen, which plans again

    def read(self) -> Layers | None:
        """The counts as typed, or None while a cell is empty."""
        out: Layers = {}
        for name, _ in self.modules:
            chunks = []
            for c in range(self.vpp):
                row = []
                for s in range(self.pp):
                    text = self._text[cell_id(name, c, s)]
                    if not text.isdigit():
                        return None
                    row.append(int(text))
                chunks.append(row)
            out[name] = chunks
        return out

    # -- what the engine said about them ------------------------------------------------------
    def _cost_text(self, c: int, s: int) -> str:
        cells = self._costs[0]
        if cells is None:
            return ""
        from engine.planning.balance import stage_costs

        top = max(stage_costs(cells)) or 1
        longest = max(len(self._numbers(c2, s2)) for c2 in range(self.vpp) for s2 in range(self.pp))
        box = self._cost_boxes.get((c, s))
        room = box.size.width - longest - 1 if box is not None and box.size.width else BAR_WIDTH
        return f"{bar(cells[c][s] / top, max(4, min(BAR_WIDTH, room)))} {self._numbers(c, s)}"  # one bar width

    def _numbers(self, c: int, s: int) -> str:
        from engine.planning.balance import stage_costs

        cells, label = self._costs
        assert cells is not None
        text = label(cells[c][s])
        if self.vpp > 1 and c == self.vpp - 1:  # a stage runs all its chunks: its total, on its last chunk's row
            text += f" · stage {s}: {label(stage_costs(cells)[s])}"
        past = self._past.get((c, s))
        return text if past is None else f"{text} · {past}"

    def on_resize(self) -> None:
        self.call_after_refresh(self._refresh_costs)

    def _refresh_costs(self) -> None:
        for (c, s), box in self._cost_boxes.items():
            box.update(self._cost_text(c, s))

    def _past_end(self) -> dict[tuple[int, int], str]:
        """Cells counting layers the model does not have (they cost nothing: say why), chunk-major as
        the layers are placed."""
        layers, out = self.read(), {}
        for name, title in self.modules if layers is not None else ():
            if name not in self.sizes:
                continue
            pos = 0
            for c, chunk in enumerate(layers[name]):
                for s, n in enumerate(chunk):
                    if n and pos + n > self.sizes[name]:
                        out[(c, s)] = f"{title} has only {self.sizes[name]}"
                    pos += n
        return out

    def show_costs(self, cells: list[list[int]] | None, label: Callable[[int], str]) -> None:
        """Bars scaled to the most expensive stage (the sum of its chunks), so imbalance is visible."""
        if cells is not None and (len(cells) != self.vpp or any(len(chunk) != self.pp for chunk in cells)):
            cells = None  # costs of another layout than the one shown
        self._costs = (cells, label)
        self._past = self._past_end()
        for (c, s), box in self._cost_boxes.items():
            box.update(self._cost_text(c, s))

    def mark_invalid(self, modules: set[str]) -> None:
        self._invalid = set(modules)
        for cell, (_, module) in self._cells.items():
            cell.set_class(module in modules, "-invalid")
