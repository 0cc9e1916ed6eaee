"""Headless execution of a job with a rich progress bar (`mm-convert`, `mmtui --replay`).

Exit codes: 0 success, 2 bad input (one line on stderr, nothing written), 1 the output
could not be written (full disk, read-only target), 128+n stopped by signal n (Ctrl-C,
SIGTERM, SIGHUP; the temporary output is removed, the target is as it was).
"""

from __future__ import annotations

import contextlib
import os
import re
import resource
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

from engine.errors import ConvertError
from engine.events import FileDone, Finished, Notice, PartDone, Progress, Started
from engine.job import Job, prepare
from engine.run.execute import execute
from engine.run.parts import describe, execute_part, job_key

from .part_env import Chosen, choose

_TRAIN_FLAGS = re.compile(r"--lora-r \d+ --lora-alpha \S+(?: --lora-use-rslora)?")


class Stopped(BaseException):
    """A termination signal, raised in the main thread so every `finally` on the way out runs."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """SIGTERM and SIGHUP (a batch scheduler's kill, a closed terminal) clean up as Ctrl-C does."""

    def raise_stopped(signum: int, _frame: object) -> None:
        raise Stopped(signum)

    old = {s: signal.signal(s, raise_stopped) for s in (signal.SIGTERM, signal.SIGHUP)}
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:  # Ctrl-C raises from here on, so cleanup runs
        old[signal.SIGINT] = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def summary_line(finished: Finished) -> str:
    """One line for a batch log: target, files, bytes on disk, seconds, GB/s, peak memory."""
    sizes = [p.stat().st_size for p in Path(finished.out_dir).rglob("*") if p.is_file()]
    files, on_disk = len(sizes), sum(sizes)
    gbps = on_disk / max(finished.seconds, 1e-9) / 1e9
    return (
        f"wrote {finished.out_dir}: {files} files, {on_disk:,} bytes in {finished.seconds:.1f} s "
        f"({gbps:.2f} GB/s), peak memory {peak_rss_mb():.0f} MB"
    )


def part_line(done: PartDone, out_dir: Path, finished: bool) -> str:
    """What a part did and what is left, for a batch log."""
    index, count = done.part
    gbps = done.total_bytes / max(done.seconds, 1e-9) / 1e9
    files = f"{done.files} file{'' if done.files == 1 else 's'}"
    head = f"part {index}/{count}: wrote {files}, {done.total_bytes:,} bytes in {done.seconds:.1f} s ({gbps:.2f} GB/s)"
    if done.completed_by_other:
        return f"{head}; another part had completed {out_dir} meanwhile"
    if finished:
        return f"{head}; the last to finish: checked every part's files and put {out_dir} in place"
    if not done.waiting:
        return f"{head}; nothing else to do for this part"
    parts = ", ".join(f"{k}/{count}" for k in done.waiting)
    missing = sum(done.waiting.values())
    return (
        f"{head}; {missing} files of part{'s' if len(done.waiting) > 1 else ''} {parts} are still missing "
        f"(listed in {done.record}): the last part to finish puts {out_dir} in place; a part that failed "
        "finishes the job when run again alone"
    )


@contextlib.contextmanager
def _kept_note(chosen: Chosen) -> Iterator[None]:
    """A part stopped or failed: what it finished stays for its rerun (the target is untouched either way)."""
    try:
        yield
    except BaseException:
        if chosen.part is not None:
            print(
                f"note: part {chosen.part} did not finish; the files it completed are kept beside the target "
                "for its rerun, which writes only the rest",
                file=sys.stderr,
            )
        raise


def run_job(job: Job, *, quiet: bool = False) -> Finished | None:
    """Prepare and execute (this process's part of it, when split); progress on stderr when it is a terminal
    (or when not quiet). None when this part is done and others are still missing."""
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, TextColumn, TimeRemainingColumn, TransferSpeedColumn
    from rich.progress import Progress as Bar

    chosen = choose(job.cfg.part, os.environ)
    if chosen.part is not None:  # printed before planning: a Slurm log says at once which part this is
        print(f"note: part {chosen.part} ({chosen.source}; --cfg.part none runs the whole job here)", file=sys.stderr)
    _, plan = prepare(job)
    console = Console(stderr=True)
    finished: Finished | None = None
    done: PartDone | None = None
    if chosen.part is None:
        events = execute(plan, job.out_dir, overwrite=job.overwrite, field=job.out_field)
    else:
        key = job_key(describe(job), plan)
        events = execute_part(
            plan, job.out_dir, chosen.part, key, overwrite=job.overwrite, field=job.out_field,
            description=describe(job),
        )  # fmt: skip
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Bar(*columns, console=console, disable=quiet, transient=False) as bar, _kept_note(chosen):
        task = bar.add_task("converting", total=plan.nbytes)
        for event in events:
            if isinstance(event, PartDone):
                done = event
            elif isinstance(event, Notice):
                print(f"note: {event.text}", file=sys.stderr)
            elif isinstance(event, Started):
                bar.update(task, total=event.total_bytes)
            elif isinstance(event, Progress):
                bar.update(task, completed=event.done_bytes, description=Path(event.path).parent.name)
            elif isinstance(event, FileDone):
                bar.console.log(f"wrote {event.path}") if not quiet else None
            elif isinstance(event, Finished):
                finished = event
    if done is not None:
        print(part_line(done, job.out_dir, finished is not None), flush=True)
        if finished is None:
            return None
    assert finished is not None
    for note in plan.notes:  # after success only: a failed run says one line
        print(f"note: {note}", file=sys.stderr)
    if not quiet and done is None:
        gbps = finished.total_bytes / max(finished.seconds, 1e-9) / 1e9
        console.print(
            f"[green]done[/]: {len(plan.files)} files, {finished.total_bytes / 1e9:.2f} GB in "
            f"{finished.seconds:.1f} s ({gbps:.2f} GB/s) -> {finished.out_dir}"
        )
    if not sys.stdout.isatty() and done is None:
        flags = next((m.group(0) for n in plan.notes if (m := _TRAIN_FLAGS.search(n))), None)
        print(summary_line(finished) + (f"; train on with {flags}" if flags else ""), flush=True)
    return finished


def run_job_cli(job: Job, *, prog: str) -> None:
    """Run and exit with the documented status; bad input is one line, not a traceback."""
    with guarded(prog):
        run_job(job, quiet=not sys.stderr.isatty())


@contextlib.contextmanager
def guarded(prog: str) -> Iterator[None]:
    """The documented exits around anything that may plan or write: one line, never a traceback."""
    try:
        with stop_on_signals():
            yield
    except ConvertError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print(f"{prog}: cancelled; nothing was written", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)
    except Stopped as e:
        print(f"{prog}: cancelled; nothing was written", file=sys.stderr)
        sys.exit(128 + e.signum)
