"""One conversion split over processes or nodes: part i of N writes its share of the plan's files.

No cluster code: every part builds the same plan (it is data, deterministic), takes the same
share of it (largest file first to the least loaded part, ties to the lower index), and writes
into one shared directory beside the target, named from the job, so parts on any node of a
shared filesystem find each other's files without talking:

    .NAME.mmtui-parts-KEY/   KEY: a hash of the job's description and its plan's files
        out/                 the checkpoint being built; renamed to NAME when complete
        staging/I-of-N/      a part's files while written; moved into out/ when whole and synced
        locks/part-I-of-N.lock   held (flock) by the live part I of N
        missing.txt          which files are still missing, and whose share they are

A file under out/ is always whole (written in staging, synced, renamed), so a part killed at
any moment leaves nothing that looks done, and its rerun writes only what is missing. Each part
ends by taking the target's lock (briefly; a part waits for another part's) and counting the
files under out/: the part that finds none missing checks them all (sizes, zip directories and
safetensors headers against the plan), adds the small files (tracker, index, config), and
renames out/ into place with the single run's `Claim.commit`. As every part moves its files in
before it looks, the last one to finish always sees the set complete: exactly one part renames.

The shared directory belongs to the job, not to a pid: it is debris only when no part holds a
part lock in it (`target.clear_debris`), so a single run or a part of another job to the same
target stops while parts of this one are alive, and removes the directory once none is.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import heapq
import json
import os
import re
import shutil
import socket
import time
import zipfile
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator

from ..errors import ConvertError, WriteError
from ..events import Event, Finished, Notice, PartDone
from ..formats.dcp_writer import METADATA_NAME
from ..formats.safetensors_writer import header_bytes
from ..planning.check import check_plan
from ..planning.mtp import check_copies
from ..planning.plan import OutputFile, Plan
from .execute import FILE_MODE, _read_files, write_files
from .target import (
    DIR_MODE,
    PARTS_TAG,
    WRITE_ERRNOS,
    Claim,
    check_inputs,
    check_space,
    check_target,
    clear_debris,
    fsync_path,
    resolve_target,
    target_lock,
    write_error,
)

PART_SYNTAX = "i/N with 0 <= i < N (0-based, as SLURM_ARRAY_TASK_ID and torchrun's RANK), or none"
OFF = ("none", "off")
LOCK_WAIT = 3600.0  # seconds a part waits for another part's check-and-rename (60,000 files: about a minute)
_PART = re.compile(r"\s*(\d+)\s*/\s*(\d+)\s*", re.ASCII)
_RECORD = re.compile(r"[^/]+/data/\d+")  # a tensor's record in a torch zip: "<archive>/data/<n>"


@dataclass(frozen=True, slots=True)
class Part:
    index: int  # 0-based
    count: int

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def parse_part(text: str) -> Part | None:
    """'2/8' -> Part(2, 8); 'none' or 'off' -> None (the whole job in this process); ValueError otherwise."""
    if text.strip().lower() in OFF:
        return None
    m = _PART.fullmatch(text)
    if m is None or not 0 <= int(m[1]) < int(m[2]):
        raise ValueError(f"expected {PART_SYNTAX}")
    return Part(int(m[1]), int(m[2]))


def _valid_part(value: str | None) -> str | None:
    if value is not None:
        parse_part(value)
    return value


# the `part` field of every command's configuration (engine/job.py)
PartText = Annotated[str | None, AfterValidator(_valid_part)]


def shares(sizes: list[int], count: int) -> list[list[int]]:
    """File indices per part, balanced by bytes: largest first to the least loaded part (ties: lower
    file index first, lower part first), each share in file order. The same on every node."""
    heap = [(0, k) for k in range(count)]
    out: list[list[int]] = [[] for _ in range(count)]
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        load, k = heapq.heappop(heap)
        out[k].append(i)
        heapq.heappush(heap, (load + sizes[i], k))
    return [sorted(s) for s in out]


def describe(job: Any) -> str:
    """A job (engine.job.Job) as canonical JSON: every field but `part`, paths made absolute."""
    data = job.model_dump(mode="python")
    data.get("cfg", {}).pop("part", None)
    return json.dumps(_canonical(data), sort_keys=True, separators=(",", ":"), default=str)


def _canonical(value: Any) -> Any:
    if isinstance(value, Path):
        return os.path.abspath(value)
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_canonical(v) for v in value]
    return value


def job_key(description: str, plan: Plan) -> str:
    """What names the shared directory: the job, and the files its plan writes (so parts of one job
    made by different versions, or of a job whose inputs changed, do not mix)."""
    h = hashlib.sha256(description.encode())
    for f in plan.files:
        h.update(f"\n{f.path} {f.kind} {f.nbytes}".encode())
    for rel in sorted(plan.texts) + sorted(plan.copies):
        h.update(f"\n{rel}".encode())
    return h.hexdigest()[:16]


def control_dir(target: Path, key: str) -> Path:
    return target.parent / f".{target.name}{PARTS_TAG}{key}"


def file_problem(out: Path, f: OutputFile) -> str | None:
    """Why the file under `out` is not the plan's whole file (None when it is): read from its zip directory
    or safetensors header, never its data."""
    path = out / f.path
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        return "missing"
    if f.kind == "safetensors":
        head = header_bytes([(e.key, e.dtype, e.shape, e.nbytes) for e in f.entries], f.metadata)
        if size != len(head) + f.nbytes:
            return f"{size} bytes, expected {len(head) + f.nbytes}"
        with open(path, "rb") as fh:
            if fh.read(len(head)) != head:
                return "its header is not the plan's"
        return None
    if f.kind.startswith("torch_dist"):  # common.pt and .metadata are small: present (renamed in whole) is done
        from ..formats.torch_dist_writer import KIND, data_size

        want = data_size(f) if f.kind == KIND else size
        return None if size == want else f"{size} bytes, expected {want}"
    if f.kind == "dcp":
        if not (path.parent / METADATA_NAME).is_file():
            return f"no {METADATA_NAME} beside it"
        return None if size >= f.nbytes else f"{size} bytes, fewer than its tensors' {f.nbytes}"
    try:
        with zipfile.ZipFile(path) as z:
            records = [i for i in z.infolist() if _RECORD.fullmatch(i.filename)]
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        return f"not a whole zip file ({e})"
    if len(records) != len(f.entries) or sum(r.file_size for r in records) != f.nbytes:
        return (
            f"{len(records)} tensor records of {sum(r.file_size for r in records)} bytes, "
            f"expected {len(f.entries)} of {f.nbytes}"
        )
    if any(r.header_offset + r.file_size > size for r in records):
        return "a record ends past the end of the file"
    return None


def _write_text(path: Path, text: str) -> None:
    """Atomically (a reader sees the old text or the new)."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def record_missing(control: Path, plan: Plan, part: Part) -> tuple[dict[int, int], Path]:
    """Write `missing.txt` (each missing file with the part whose share it is); (part -> files missing, its path)."""
    out = control / "out"
    owner = {i: k for k, share in enumerate(shares([f.nbytes for f in plan.files], part.count)) for i in share}
    missing = [i for i, f in enumerate(plan.files) if not (out / f.path).is_file()]
    lines = [f"# {len(missing)} of {len(plan.files)} files missing; rerun the parts named (of {part.count})"]
    lines += [f"part {owner[i]}/{part.count} {plan.files[i].path}" for i in missing]
    path = control / "missing.txt"
    _write_text(path, "\n".join(lines) + "\n")
    return dict(sorted(Counter(owner[i] for i in missing).items())), path


def _part_lock(control: Path, part: Part, field: str, target: Path) -> int:
    """Hold the lock of part i/N (two processes given the same part would write the same files)."""
    path = control / "locks" / f"part-{part.index}-of-{part.count}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o640)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if not isinstance(e, BlockingIOError):
            raise WriteError(
                f"{field} {target}: cannot lock {path} ({e.strerror}); parts need a filesystem with flock"
            ) from None
        try:
            owner = path.read_text().strip()
        except OSError:
            owner = "another process"
        raise ConvertError(
            f"{field} {target}: part {part} of this conversion is already running ({owner}); give each "
            "process its own part"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"part {part} pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    return fd


def _mkdir(path: Path) -> None:
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=DIR_MODE)
        os.chmod(path, DIR_MODE)


def execute_part(
    plan: Plan,
    out_dir: Path | str,
    part: Part,
    key: str,
    *,
    overwrite: bool = False,
    field: str = "mm_dir",
    inputs: Mapping[str, Path] | None = None,
    description: str = "",
) -> Iterator[Event]:
    """Write part `part` of the plan into the job's shared directory; the part that completes it renames it
    into place (then the last event is Finished, else PartDone). `key`: `job_key` of the job, the same
    in every part; `description`: the job as text, kept beside the files for a person to read."""
    problems = check_plan(plan)
    if problems:
        raise AssertionError("plan check failed:\n" + "\n".join(problems))  # a bug, not bad input
    target = resolve_target(Path(out_dir), field)
    read = [("file", Path(p)) for p in sorted(_read_files(plan))]
    check_inputs(target, [*(inputs or {}).items(), *plan.inputs, *read], field, overwrite)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise write_error(e, target.parent, plan.nbytes, target.parent) from None
    mine = shares([f.nbytes for f in plan.files], part.count)[part.index]
    if not mine:  # more parts than files: the parts that write files complete the job without this one
        yield Notice(f"part {part}: nothing to write: the plan has {len(plan.files)} files for {part.count} parts")
        yield PartDone((part.index, part.count), 0, 0, 0.0, {}, None)
        return
    control = control_dir(target, key)
    out = control / "out"
    who = f"part {part} of job {key}, "
    with target_lock(target, field, who, LOCK_WAIT):
        notes = clear_debris(target, field, keep=control)
        check_target(target, overwrite, field)
        for d in (control, out, control / "locks", control / "staging"):
            _mkdir(d)
        if description and not (control / "job.json").exists():
            _write_text(control / "job.json", description + "\n")
        lock_fd = _part_lock(control, part, field, target)
    try:
        for note in notes:
            yield Notice(note)
        start = time.perf_counter()
        todo = [i for i in mine if file_problem(out, plan.files[i]) is not None]
        nbytes = sum(plan.files[i].nbytes for i in todo)
        if len(todo) < len(mine):
            yield Notice(
                f"part {part}: {len(mine) - len(todo)} of its {len(mine)} files were written by an earlier run"
            )
        stage = control / "staging" / f"{part.index}-of-{part.count}"
        shutil.rmtree(stage, ignore_errors=True)  # a killed run's half files: this part's alone (its lock)
        _mkdir(stage)
        check_space(nbytes, target, field, overwrite)
        check_copies(plan)  # every part checks, so no part writes on a wrong source
        try:
            yield from write_files(plan, out, todo, stage=stage)
        except OSError as e:
            if not out.is_dir() and target.is_dir():
                yield PartDone((part.index, part.count), 0, 0, time.perf_counter() - start, {}, None, True)
                return
            if e.errno not in WRITE_ERRNOS:
                raise
            raise write_error(e, e.filename or target, nbytes, target.parent) from None
        shutil.rmtree(stage, ignore_errors=True)
        yield from _finish(plan, target, control, part, who, overwrite, field, len(todo), nbytes, start)
    except BaseException:
        if out.is_dir():  # failed or stopped: say what is left to do, for the rerun
            with contextlib.suppress(OSError):
                record_missing(control, plan, part)
        raise
    finally:
        os.close(lock_fd)


def _finish(
    plan: Plan, target: Path, control: Path, part: Part, who: str, overwrite: bool, field: str,
    files: int, nbytes: int, start: float,
) -> Iterator[Event]:  # fmt: skip
    """Under the target's lock: count the files; the part that finds them all checks them and renames."""
    out = control / "out"
    with target_lock(target, field, who, LOCK_WAIT) as (fd, lock_path):
        if not out.is_dir():  # another part completed the job between our last write and now
            yield PartDone((part.index, part.count), files, nbytes, time.perf_counter() - start, {}, None, True)
            return
        waiting, record = record_missing(control, plan, part)
        if waiting:
            yield PartDone((part.index, part.count), files, nbytes, time.perf_counter() - start, waiting, record)
            return
        bad = [(f.path, p) for f in plan.files if (p := file_problem(out, f)) is not None]
        if bad:
            for path, _ in bad:
                with contextlib.suppress(OSError):
                    os.unlink(out / path)
            waiting, record = record_missing(control, plan, part)
            raise WriteError(
                f"{out}: {len(bad)} of {len(plan.files)} files are not whole ({bad[0][0]}: {bad[0][1]}); they "
                f"were removed: rerun part{'s' if len(waiting) > 1 else ''} "
                f"{', '.join(f'{k}/{part.count}' for k in waiting)} (listed in {record})"
            )
        check_target(target, overwrite, field)
        yield PartDone((part.index, part.count), files, nbytes, time.perf_counter() - start, {}, record)
        try:
            for rel, text in plan.texts.items():
                (out / rel).write_text(text)
                os.chmod(out / rel, FILE_MODE)
            for rel, src in plan.copies.items():
                shutil.copyfile(src, out / rel)
                os.chmod(out / rel, FILE_MODE)
            for rel in [*plan.texts, *plan.copies]:
                fsync_path(out / rel)
            for dirpath, _, _ in os.walk(out, topdown=False):
                fsync_path(Path(dirpath))
        except OSError as e:
            if e.errno not in WRITE_ERRNOS:
                raise
            raise write_error(e, e.filename or target, 0, target.parent) from None
        (control / "missing.txt").unlink(missing_ok=True)
        Claim(target, field, overwrite, fd, lock_path, tmp=out).commit()
        shutil.rmtree(control, ignore_errors=True)
    yield Finished(target, plan.nbytes, time.perf_counter() - start)
