"""Pick the model directory when `mmtui` starts without one (or on ctrl+o).

A directory tree (directories only) and a path box; a directory holding config.json is
a model, and choosing one dismisses the screen with it. Typing a path and pressing enter
works too, for paths far from the tree's root.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from textual import on
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import DirectoryTree, Input, Label, Static


class _Directories(DirectoryTree):
    def filter_paths(self, paths: Iterable[Path]) -> Iterable[Path]:
        return [p for p in paths if p.is_dir() and not p.name.startswith(".")]


def is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file()


class PickDirScreen(ModalScreen[Path | None]):
    BINDINGS = [("escape", "dismiss(None)", "Cancel")]
    DEFAULT_CSS = """
    PickDirScreen > Vertical { margin: 1 2; border: thick $primary; background: $surface; padding: 0 1; }
    PickDirScreen Label, PickDirScreen Input, PickDirScreen Static { width: 100%; }
    PickDirScreen _Directories { height: 1fr; }
    PickDirScreen #pick-hint { color: $text-muted; }
    """

    def __init__(self, root: Path) -> None:
        super().__init__()
        self.root = root

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label("[b]Open a model directory[/b] (config.json + *.safetensors)")
            yield Input(str(self.root), id="pick-path", placeholder="/path/to/Qwen2-VL-7B-Instruct")
            yield _Directories(self.root, id="pick-tree")
            yield Static("enter on a directory with config.json opens it · escape cancels", id="pick-hint")

    def on_mount(self) -> None:
        self.query_one("#pick-tree", DirectoryTree).focus()

    def _choose(self, path: Path) -> None:
        path = path.expanduser()
        if is_model_dir(path):
            self.dismiss(path)
            return
        hint = self.query_one("#pick-hint", Static)
        if path.is_dir():
            hint.update(f"[yellow]{path}: no config.json here; open a subdirectory[/yellow]")
        else:
            hint.update(f"[red]{path}: no such directory[/red]")

    @on(DirectoryTree.DirectorySelected)
    def _selected(self, event: DirectoryTree.DirectorySelected) -> None:
        self.query_one("#pick-path", Input).value = str(event.path)
        if is_model_dir(event.path):
            self.dismiss(event.path)

    @on(Input.Submitted, "#pick-path")
    def _typed(self, event: Input.Submitted) -> None:
        self._choose(Path(event.value.strip()))
