"""The Textual app. One factory (`make_app`) serves the console script and the tests."""

from __future__ import annotations

import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

from textual.app import App
from textual.binding import Binding
from textual.worker import WorkerFailed

from .screens.confirm import ConfirmScreen
from .screens.workbench import WorkbenchScreen

QUIT_QUESTION = "A conversion is running. Quit and discard it? Nothing partial is kept."


class MmtuiApp(App[None]):
    CSS_PATH = "app.tcss"
    TITLE = "mmtui"
    SUB_TITLE = "Hugging Face ↔ Megatron / MindSpeed checkpoints"  # the screen's own names its direction
    BINDINGS = [
        Binding("q", "request_quit", "Quit", show=False),
        # shown: it works in a text field too (Textual's own ctrl+q quits unasked)
        Binding("ctrl+q", "request_quit", "Quit", priority=True),
    ]

    def __init__(self, hf_dir: Path | None = None, out_dir: Path | None = None) -> None:
        super().__init__()
        self.hf_dir = hf_dir
        self.out_dir = out_dir
        self.crashed = False
        self.crash_log: Path | None = None

    def _handle_exception(self, error: Exception) -> None:
        """Every unhandled error (in a handler or a worker) ends here: keep its traceback in a file, since
        the copy Textual prints scrolls away, then let Textual close the app with return code 1."""
        if not self.crashed:
            self.crashed = True
            self.crash_log = write_crash_log(error)
        super()._handle_exception(error)

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

        self.push_screen(ConfirmScreen(QUIT_QUESTION), answered)


def make_app(hf_dir: str | Path | None = None, *, demo: bool = False, out_dir: Path | None = None) -> MmtuiApp:
    if demo:
        from .demo import make_demo_checkpoint

        hf_dir = make_demo_checkpoint()
    return MmtuiApp(Path(hf_dir) if hf_dir else None, out_dir)


def write_crash_log(error: BaseException) -> Path | None:
    """The traceback in `$TMPDIR/mmtui-crash-<time>-<pid>.log`, or None where it cannot be written."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    try:
        fd, name = tempfile.mkstemp(prefix=f"mmtui-crash-{stamp}-{os.getpid()}-", suffix=".log")
        with os.fdopen(fd, "w") as f:
            f.write(f"mmtui crashed: {sys.argv}\npython {sys.version}\n\n")
            f.write("".join(traceback.format_exception(error)))
            if isinstance(error, WorkerFailed):  # the error the worker raised, with its own traceback
                f.write("\n" + "".join(traceback.format_exception(error.error)))
    except OSError:
        return None
    return Path(name)


def exit_code(app: MmtuiApp) -> int:
    """What the process should exit with once the app has closed; says where a crash's traceback is."""
    if app.crashed:
        where = f"the traceback is in {app.crash_log}" if app.crash_log else "the traceback is above"
        print(f"mmtui stopped on an unexpected error (a bug, please report it): {where}", file=sys.stderr)
        return 1
    return app.return_code or 0


def run_app(hf_dir: str | None = None, *, demo: bool = False) -> None:
    app = make_app(hf_dir, demo=demo)
    app.run()
    code = exit_code(app)
    if code:
        sys.exit(code)
