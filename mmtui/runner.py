"""Headless execution of a job with a rich progress bar (`mm-convert`, `mmtui --replay`).

Exit codes: 0 success, 2 bad input (one line on stderr, nothing written), 1 failure.
"""

from __future__ import annotations

import sys
from pathlib import Path

from engine.errors import ConvertError
from engine.events import FileDone, Finished, Progress, Started
from engine.execute import execute
from engine.job import Job, load_job, prepare


def run_job(job: Job, *, quiet: bool = False) -> Finished:
    """Prepare and execute; progress on stderr when it is a terminal (or when not quiet)."""
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, TextColumn, TimeRemainingColumn, TransferSpeedColumn
    from rich.progress import Progress as Bar

    _, plan = prepare(job)
    console = Console(stderr=True)
    finished: Finished | None = None
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Bar(*columns, console=console, disable=quiet, transient=False) as bar:
        task = bar.add_task("converting", total=plan.nbytes)
        for event in execute(plan, job.out_dir, overwrite=job.overwrite):
            if isinstance(event, Started):
                bar.update(task, total=event.total_bytes)
            elif isinstance(event, Progress):
                bar.update(task, completed=event.done_bytes, description=Path(event.path).parent.name)
            elif isinstance(event, FileDone):
                bar.console.log(f"wrote {event.path}") if not quiet else None
            elif isinstance(event, Finished):
                finished = event
    assert finished is not None
    if not quiet:
        gbps = finished.total_bytes / max(finished.seconds, 1e-9) / 1e9
        console.print(
            f"[green]done[/]: {len(plan.files)} files, {finished.total_bytes / 1e9:.2f} GB in "
            f"{finished.seconds:.1f} s ({gbps:.2f} GB/s) -> {finished.out_dir}"
        )
    return finished


def run_job_cli(job: Job, *, prog: str) -> None:
    """Run and exit with the documented status; bad input is one line, not a traceback."""
    try:
        run_job(job, quiet=not sys.stderr.isatty())
    except ConvertError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"{prog}: cancelled; nothing was written", file=sys.stderr)
        sys.exit(130)


def replay(path: str, *, prog: str = "mmtui") -> None:
    try:
        job = load_job(path)
    except ConvertError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)
    run_job_cli(job, prog=prog)
