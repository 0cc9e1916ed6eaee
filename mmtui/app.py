"""The Textual app. One factory (`make_app`) serves the console script and the tests."""

from __future__ import annotations

from pathlib import Path

from textual.app import App
from textual.binding import Binding

from .screens.confirm import ConfirmScreen
from .screens.workbench import WorkbenchScreen


class MmtuiApp(App[None]):
    CSS_PATH = "app.tcss"
    TITLE = "mmtui"
    SUB_TITLE = "HF -> Megatron / MindSpeed"
    BINDINGS = [
        Binding("q", "request_quit", "Quit"),
        Binding("ctrl+q", "request_quit", "Quit", show=False, priority=True),  # Textual's own quits unasked
    ]

    def __init__(self, hf_dir: Path | None = None, out_dir: Path | None = None) -> None:
        super().__init__()
        self.hf_dir = hf_dir
        self.out_dir = out_dir

    def on_mount(self) -> None:
        self.push_screen(WorkbenchScreen(self.hf_dir, self.out_dir))

    def _converting(self) -> bool:
        return any(w.group == "run" and w.is_running for w in self.workers)

    def action_request_quit(self) -> None:
        """Quit at once when idle; while converting, ask first, then cancel cleanly (nothing partial left)."""
        if not self._converting():
            self.exit()
            return

        async def answered(yes: bool | None) -> None:
            if not yes:
                return
            for screen in self.screen_stack:
                if isinstance(screen, WorkbenchScreen):
                    screen.action_cancel()
            await self.workers.wait_for_complete()
            self.exit()

        question = "A conversion is running. Quit and discard it? Nothing partial is kept."
        self.push_screen(ConfirmScreen(question), answered)


def make_app(hf_dir: str | Path | None = None, *, demo: bool = False, out_dir: Path | None = None) -> MmtuiApp:
    if demo:
        from .demo import make_demo_checkpoint

        hf_dir = make_demo_checkpoint()
    return MmtuiApp(Path(hf_dir) if hf_dir else None, out_dir)


def run_app(hf_dir: str | None = None, *, demo: bool = False) -> None:
    make_app(hf_dir, demo=demo).run()
