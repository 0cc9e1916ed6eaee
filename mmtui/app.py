"""The Textual app. One factory (`make_app`) serves the console script and the tests."""

from __future__ import annotations

from pathlib import Path

from textual.app import App

from .screens.workbench import WorkbenchScreen


class MmtuiApp(App[None]):
    CSS_PATH = "app.tcss"
    TITLE = "mmtui"
    SUB_TITLE = "HF -> Megatron / MindSpeed"
    BINDINGS = [("q", "quit", "Quit")]

    def __init__(self, hf_dir: Path | None = None, out_dir: Path | None = None) -> None:
        super().__init__()
        self.hf_dir = hf_dir
        self.out_dir = out_dir

    def on_mount(self) -> None:
        self.push_screen(WorkbenchScreen(self.hf_dir, self.out_dir))


def make_app(hf_dir: str | Path | None = None, *, demo: bool = False, out_dir: Path | None = None) -> MmtuiApp:
    if demo:
        from .demo import make_demo_checkpoint

        hf_dir = make_demo_checkpoint()
    return MmtuiApp(Path(hf_dir) if hf_dir else None, out_dir)


def run_app(hf_dir: str | None = None, *, demo: bool = False) -> None:
    make_app(hf_dir, demo=demo).run()
