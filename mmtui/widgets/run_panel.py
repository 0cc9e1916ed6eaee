"""Progress of a running conversion: overall bytes with throughput and ETA, the current file,
per-rank completion, and a log. It only displays engine events."""

from __future__ import annotations

import time

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import DataTable, ProgressBar, RichLog, Static

from .format import rate as speed
from .format import size


class RunPanel(Vertical):
    DEFAULT_CSS = """
    RunPanel { height: 1fr; }
    RunPanel #rate { height: 1; }
    RunPanel #current { height: 1; color: $text-muted; }
    RunPanel #ranks { height: auto; max-height: 60%; border: round $primary; }
    RunPanel #log { height: 1fr; min-height: 3; border: round $secondary; }
    RunPanel #status { height: auto; }
    """

    def compose(self) -> ComposeResult:
        yield ProgressBar(id="bar", total=1, show_eta=False)  # not indeterminate: that one animates
        yield Static("ready: ctrl+r starts the conversion", id="rate")
        yield Static("", id="current")
        yield DataTable(id="ranks", cursor_type="row", zebra_stripes=True)
        yield RichLog(id="log", max_lines=2000, markup=True, wrap=True)
        yield Static("", id="status")

    def on_mount(self) -> None:
        table = self.query_one("#ranks", DataTable)
        table.add_columns("output file", "bytes")
        table.add_column("done", key="done")

    def reset(self, files: list[tuple[str, int]]) -> None:
        """One row per output file, before the run starts."""
        table = self.query_one("#ranks", DataTable)
        table.clear()
        self._sizes = [n for _, n in files]
        self._start_bytes = [0] * len(files)
        self._current = -1
        self._done = 0
        for i, (name, nbytes) in enumerate(files):
            table.add_row(name, size(nbytes), "·", key=str(i))
        self.query_one("#bar", ProgressBar).update(total=sum(self._sizes) or 1, progress=0)
        self.query_one("#rate", Static).update(f"starting: 0 B of {size(sum(self._sizes))}")
        self.query_one("#current", Static).update("")
        self.query_one("#log", RichLog).clear()
        self.query_one("#status", Static).update("")
        self._t0 = time.monotonic()

    def file_started(self, index: int, path: str) -> None:
        self._current = index
        self._start_bytes[index] = self._done
        self.query_one("#current", Static).update(f"writing {path}")

    def progress(self, done: int, total: int) -> None:
        self._done = done
        self.query_one("#bar", ProgressBar).update(total=total, progress=done)
        elapsed = max(time.monotonic() - self._t0, 1e-6)
        rate = done / elapsed
        eta = (total - done) / rate if rate > 0 else 0.0
        self.query_one("#rate", Static).update(f"{size(done)} of {size(total)} · {speed(rate)} · ETA {eta:.0f} s")
        i = self._current
        if 0 <= i < len(self._sizes) and self._sizes[i]:
            share = min(1.0, (done - self._start_bytes[i]) / self._sizes[i])
            self.query_one("#ranks", DataTable).update_cell(str(i), "done", f"{100 * share:.0f}%")

    def file_done(self, index: int, path: str) -> None:
        self._current = -1
        self.query_one("#ranks", DataTable).update_cell(str(index), "done", "✓")
        self.query_one("#log", RichLog).write(f"wrote {path}")

    def finish(self, message: str) -> None:
        self.query_one("#current", Static).update("")
        self.query_one("#status", Static).update(message)
        self.query_one("#log", RichLog).write(message)

    def abort(self, message: str) -> None:
        """The conversion stopped (refused, failed or cancelled): nothing is being written any more, and
        the files it had written are discarded with the temporary directory."""
        self.query_one("#current", Static).update("")
        self.query_one("#rate", Static).update(f"stopped after {size(self._done)} of {size(sum(self._sizes))}")
        table = self.query_one("#ranks", DataTable)
        for i in range(len(self._sizes)):
            if table.get_cell(str(i), "done") != "·":
                table.update_cell(str(i), "done", "discarded")
        self.fail(message)

    def fail(self, message: str) -> None:
        self.query_one("#status", Static).update(f"[red]{message}[/red]")
        self.query_one("#log", RichLog).write(f"[red]{message}[/red]")
