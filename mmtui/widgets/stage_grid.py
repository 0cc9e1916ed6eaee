"""The per-stage layout editor: one row per (chunk, stage), one input per module, a cost bar.

It holds numbers only; the screen asks the engine for validation and costs and hands them
back through `show_costs`.
"""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Horizontal, VerticalScroll
from textual.widgets import Input, Label, Static

from .format import bar

BAR_WIDTH = 20


def cell_id(module: str, chunk: int, stage: int) -> str:
    return f"cell-{module}-{chunk}-{stage}"


class StageGrid(VerticalScroll):
    """Layer counts per module for every (chunk, stage) cell, chunk-major like the layout lists."""

    DEFAULT_CSS = """
    StageGrid { height: 1fr; border: round $primary; padding: 0 1; }
    StageGrid .head { height: 1; text-style: bold; }
    StageGrid .cell-row { height: 1; }
    StageGrid .where { width: 12; }
    StageGrid Input { width: 8; height: 1; border: none; padding: 0; margin-right: 2; }
    StageGrid Input.-invalid { background: $error 30%; }
    StageGrid .head Label.mod { width: 10; }
    StageGrid .cost { width: 1fr; }
    """

    def __init__(self, modules: list[tuple[str, str]], layers: dict[str, list[list[int]]], **kw) -> None:
        super().__init__(**kw)
        self.modules = modules  # (name, short title)
        self.counts = layers

    @property
    def pp(self) -> int:
        return len(next(iter(self.counts.values()))[0])

    @property
    def vpp(self) -> int:
        return len(next(iter(self.counts.values())))

    def compose(self) -> ComposeResult:
        with Horizontal(classes="head"):
            yield Label("stage", classes="where")
            for _, title in self.modules:
                yield Label(title, classes="mod")
            yield Label("cost", classes="cost")
        for c in range(self.vpp):
            for s in range(self.pp):
                with Horizontal(classes="cell-row"):
                    yield Label(f"{s}" if self.vpp == 1 else f"{s} · chunk {c}", classes="where")
                    for name, _ in self.modules:
                        yield Input(str(self.counts[name][c][s]), id=cell_id(name, c, s), restrict=r"\d*")
                    yield Static("", id=f"cost-{c}-{s}", classes="cost")

    def read(self) -> dict[str, list[list[int]]] | None:
        """The counts as typed, or None while a cell is empty."""
        out: dict[str, list[list[int]]] = {}
        for name, _ in self.modules:
            chunks = []
            for c in range(self.vpp):
                row = []
                for s in range(self.pp):
                    text = self.query_one(f"#{cell_id(name, c, s)}", Input).value
                    if not text.isdigit():
                        return None
                    row.append(int(text))
                chunks.append(row)
            out[name] = chunks
        return out

    def show_costs(self, cells: list[list[int]] | None, label) -> None:
        """Bars scaled to the most expensive stage (the sum of its chunks), so imbalance is visible."""
        if cells is None or len(cells) != self.vpp or len(cells[0]) != self.pp:
            for st in self.query(".cost").results(Static):
                st.update("")
            return
        from engine.balance import stage_costs

        top = max(stage_costs(cells)) or 1
        for c, chunk in enumerate(cells):
            for s, cost in enumerate(chunk):
                for box in self.query(f"#cost-{c}-{s}").results(Static):  # none while the grid is replaced
                    box.update(f"{bar(cost / top, BAR_WIDTH)} {label(cost)}")

    def mark_invalid(self, modules: set[str]) -> None:
        for inp in self.query(Input).results(Input):
            module = (inp.id or "").split("-")[1]
            inp.set_class(module in modules, "-invalid")
