"""The output directory: one owner from the check to the rename, no debris, never an input.

A run claims its target before anything else: it takes an exclusive `flock` on a lock
file beside the target (`.NAME.mmtui-lock`, holding the owner's pid and host), so a
second run to the same target stops at once with one line naming the first. The lock
dies with its process, so a run killed with SIGKILL leaves a lock that the next run takes
over; whoever holds the lock knows that every `.NAME.mmtui-tmp-*` sibling is debris of an
owner that is gone, and removes it.

The new content is built in a temporary sibling and renamed into place with Linux's
`renameat2`: `RENAME_NOREPLACE` for a new target (a directory that appeared meanwhile
is never replaced), `RENAME_EXCHANGE` for an overwrite (the old content moves to the
temporary name in the same atomic step and is removed after). Where `renameat2` is
missing, plain renames under the lock do the same for every mmtui run.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import shutil
import socket
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConvertError, WriteError

TMP_TAG = ".mmtui-tmp-"
LOCK_TAG = ".mmtui-lock"
PARTS_TAG = ".mmtui-parts-"  # the shared directory of a job split into parts (engine/run/parts.py)
DIR_MODE = 0o750  # MindSpeed-MM's modes: checkpoints often live on shared filesystems
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}
SLACK = 1 << 20  # bytes beyond the plan's own for directories, trackers and zip records


def _libc_renameat2():
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_renameat2 = _libc_renameat2()
_AT_FDCWD = -100
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2


def rename2(src: Path, dst: Path, flags: int) -> bool:
    """renameat2(src, dst, flags); False when this system or filesystem cannot do it (the caller falls back)."""
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    if err == errno.EEXIST:
        raise FileExistsError(err, os.strerror(err), str(dst))
    raise OSError(err, os.strerror(err), str(dst))


def resolve_target(out_dir: Path, field: str) -> Path:
    """The real directory to write: a symlink to a directory is followed (the link keeps pointing at the
    new content); a dangling link, a link loop, a file or a parent that is a file is refused."""
    out_dir = Path(os.path.abspath(out_dir))
    if out_dir.is_symlink():
        try:
            real = out_dir.resolve(strict=True)
        except RuntimeError:
            raise ConvertError(f"{field} {out_dir}: is a symlink loop; give a directory path") from None
        except OSError:
            dest = os.readlink(out_dir)
            raise ConvertError(
                f"{field} {out_dir}: is a symlink to {dest}, which does not exist; create it or give another path"
            ) from None
        if not real.is_dir():
            raise ConvertError(f"{field} {out_dir}: is a symlink to {real}, which is not a directory")
        return real
    parent = out_dir.parent
    while not parent.exists() and not parent.is_symlink() and parent != parent.parent:
        parent = parent.parent
    if parent.exists() and not parent.is_dir():
        raise ConvertError(f"{field} {out_dir}: {parent} is a file, not a directory; give a path in a directory")
    if parent.is_symlink() and not parent.exists():
        raise ConvertError(f"{field} {out_dir}: {parent} is a dangling symlink; give a path in a directory")
    return Path(os.path.realpath(out_dir))


def check_target(out_dir: Path, overwrite: bool, field: str = "mm_dir") -> None:
    """Refuse an existing, non-empty target unless asked to overwrite (cheap; repeated under the lock)."""
    real = resolve_target(out_dir, field)
    if real.exists() and not real.is_dir():
        raise ConvertError(f"{field} {out_dir}: is a file; give a directory path")
    if real.is_dir() and not overwrite and _non_empty(real):
        raise ConvertError(
            f"{field} {out_dir}: exists and is not empty; choose a new directory or set overwrite "
            "(--cfg.overwrite true)"
        )


def _non_empty(path: Path) -> bool:
    with os.scandir(path) as it:
        return any(True for _ in it)


def check_inputs(out_dir: Path, inputs: Iterable[tuple[str, Path]], field: str, overwrite: bool = True) -> None:
    """A target may not be an input or hold one (an overwrite would delete it, a write would change what is
    read), nor, with `overwrite`, lie inside one. Without `overwrite` a new directory inside an input replaces
    nothing and is read by nothing: MindSpeed-LLM's documented way back writes `<hf_dir>/mg2hf`."""
    target = Path(os.path.realpath(out_dir))
    for name, path in inputs:
        src = Path(os.path.realpath(path))
        if target == src:
            how = "is"
        elif src.is_relative_to(target):
            how = "contains"
        elif target.is_relative_to(src) and overwrite:
            how = "lies inside"
        else:
            continue
        raise ConvertError(
            f"{field} {out_dir}: {how} the input {name} {path}; an output may not overlap an input, even with "
            "overwrite: choose a directory outside every input"
        )


@dataclass
class Claim:
    """What a run owns: the lock, the temporary sibling it writes, and what it found left behind."""

    target: Path  # the real directory to create or replace
    field: str
    overwrite: bool
    lock_fd: int
    lock_path: Path
    tmp: Path | None = None
    notes: list[str] = field(default_factory=list)
    committed: bool = False

    def make_tmp(self) -> Path:
        tmp = self.target.parent / f".{self.target.name}{TMP_TAG}{uuid.uuid4().hex[:8]}"
        tmp.mkdir(mode=DIR_MODE)
        os.chmod(tmp, DIR_MODE)
        self.tmp = tmp
        return tmp

    def commit(self) -> None:
        """Rename the complete temporary directory into place; never over a directory that appeared meanwhile."""
        assert self.tmp is not None
        tmp, target = self.tmp, self.target
        if target.is_dir() and not target.is_symlink():
            if not self.overwrite:
                try:  # an empty directory was accepted at the check; anything written into it since stays
                    target.rmdir()
                except OSError:
                    raise ConvertError(
                        f"{self.field} {target}: was filled by something else while converting; the new "
                        f"checkpoint was not put in its place"
                    ) from None
            elif rename2(tmp, target, RENAME_EXCHANGE):  # old content now under the temporary name
                self.tmp, self.committed = None, True
                fsync_path(target.parent)
                shutil.rmtree(tmp, ignore_errors=True)
                return
            else:  # no renameat2: move the old aside under a name a later run recognises as debris
                old = target.parent / f".{target.name}{TMP_TAG}old-{uuid.uuid4().hex[:8]}"
                target.rename(old)
                tmp.rename(target)
                self.tmp, self.committed = None, True
                fsync_path(target.parent)
                shutil.rmtree(old, ignore_errors=True)
                return
        try:
            placed = rename2(tmp, target, RENAME_NOREPLACE)
        except FileExistsError:
            placed = False
        if not placed:
            if target.exists():
                raise ConvertError(f"{self.field} {target}: appeared while converting; it was not replaced")
            tmp.rename(target)
        self.tmp, self.committed = None, True
        fsync_path(target.parent)

    def abandon(self) -> None:
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None


def _owner_text(lock_path: Path) -> str:
    try:
        text = lock_path.read_text().strip()
    except OSError:
        text = ""
    return text or "another process"


def _take_lock(lock_path: Path, field: str, target: Path, who: str = "", wait: float = 0) -> int:
    """An exclusive flock on the lock file, checked to still be the file at that path (not one a finishing
    owner just unlinked). `who` is written in it for the next one to read; with `wait`, a lock held by a
    part of a split job (held for seconds, to check and rename) is waited for up to `wait` seconds."""
    start = time.monotonic()
    pause = 0.01
    for _ in range(1_000_000):
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            owner, waited = _owner_text(lock_path), time.monotonic() - start
            if waited < wait and (owner.startswith("part ") or (owner == "another process" and waited < 2)):
                time.sleep(pause)  # "another process": its text is being written; look again
                pause = min(0.5, pause * 2)
                continue
            raise ConvertError(
                f"{field} {target}: another conversion is writing it ({owner}); "
                "wait for it to finish or choose another directory"
            ) from None
        except OSError:
            os.close(fd)
            raise
        try:
            same = os.stat(lock_path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{who}pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
            return fd
        os.close(fd)  # the owner finished and removed it between our open and our lock: try again
    raise ConvertError(f"{field} {target}: could not take the lock {lock_path}")  # pragma: no cover


def _leftovers(target: Path) -> list[Path]:
    prefix = f".{target.name}{TMP_TAG}"
    with os.scandir(target.parent) as it:
        return [Path(e.path) for e in it if e.name.startswith(prefix)]


def parts_dirs(target: Path) -> list[Path]:
    """The shared directories of split jobs to this target (one per job)."""
    prefix = f".{target.name}{PARTS_TAG}"
    with os.scandir(target.parent) as it:
        return sorted(Path(e.path) for e in it if e.name.startswith(prefix))


def live_part(control: Path) -> str | None:
    """Who holds a part lock in a split job's directory ("part 1/3 pid 42 on node7"), or None: the job's
    directory belongs to its live parts, not to a pid; with none alive it is debris. Only asked under
    the target's lock, which every part holds while it takes its own, so the probe races with nobody."""
    locks = control / "locks"
    try:
        names = sorted(os.listdir(locks))
    except OSError:
        return None
    for name in names:
        path = locks / name
        try:  # for writing: NFS emulates flock with POSIX locks, which want it for an exclusive lock
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return _owner_text(path)
        except OSError:  # no flock here: no part could hold one either
            continue
        finally:
            os.close(fd)
    return None


def clear_debris(target: Path, field: str, keep: Path | None = None) -> list[str]:
    """Under the target's lock: remove what owners that are gone left, refuse a split job whose parts live.

    Every `.NAME.mmtui-tmp-*` is debris (a live single run would hold the lock); a split job's
    directory is debris only when none of its parts holds its part lock. `keep`: the caller's own job.
    """
    notes = []
    for control in parts_dirs(target):
        if control == keep:
            continue
        owner = live_part(control)
        if owner is not None:
            raise ConvertError(
                f"{field} {target}: another conversion split into parts is writing it ({owner}); "
                "wait for it to finish or choose another directory"
            )
        freed = _tree_bytes(control)
        shutil.rmtree(control, ignore_errors=True)
        notes.append(
            f"removed the shared directory {control.name} ({_gb(freed)}) of a conversion split into parts whose "
            "parts are no longer running"
        )
    stale = _leftovers(target)
    if stale:
        freed = sum(_tree_bytes(p) for p in stale)
        for p in stale:
            shutil.rmtree(p, ignore_errors=True)
        notes.append(
            f"removed {len(stale)} temporary director{'y' if len(stale) == 1 else 'ies'} "
            f"({_gb(freed)}) left by an earlier run to {target} that did not finish"
        )
    return notes


def _tree_bytes(path: Path) -> int:
    total = 0
    for dirpath, _, names in os.walk(path):
        for n in names:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, n)).st_size
    return total


@contextlib.contextmanager
def claim(
    out_dir: Path, overwrite: bool, field: str = "mm_dir", inputs: Iterable[tuple[str, Path]] = ()
) -> Iterator[Claim]:
    """Own `out_dir` for the duration: lock, clear debris of owners that are gone, re-check the target.

    On leaving, the lock file is removed and the temporary directory too unless committed.
    """
    target = resolve_target(Path(out_dir), field)
    check_inputs(target, inputs, field, overwrite)
    parent = target.parent
    made = [p for p in (parent, *parent.parents) if not p.exists()]  # removed again unless the run commits
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WriteError(f"{field} {out_dir}: cannot create {parent} ({e.strerror})") from None
    lock_path = parent / f".{target.name}{LOCK_TAG}"
    try:
        fd = _take_lock(lock_path, field, target)
    except (PermissionError, OSError) as e:
        if isinstance(e, ConvertError):
            raise
        raise WriteError(f"{field} {out_dir}: cannot write in {parent} ({e.strerror})") from None
    c = Claim(target, field, overwrite, fd, lock_path)
    try:
        c.notes += clear_debris(target, field)
        check_target(target, overwrite, field)
        yield c
    finally:
        c.abandon()
        with contextlib.suppress(OSError):
            os.unlink(lock_path)  # while still holding it: a waiting run re-checks the inode
        os.close(fd)
        for d in made if not c.committed else ():
            with contextlib.suppress(OSError):
                d.rmdir()  # only if still empty


@contextlib.contextmanager
def target_lock(target: Path, field: str, who: str = "", wait: float = 0) -> Iterator[tuple[int, Path]]:
    """The target's lock alone, as (fd, path): what a part of a split job holds while it checks or renames.
    Removed on leaving while still held, as `claim` does."""
    lock_path = target.parent / f".{target.name}{LOCK_TAG}"
    try:
        fd = _take_lock(lock_path, field, target, who, wait)
    except ConvertError:
        raise
    except OSError as e:
        raise WriteError(f"{field} {target}: cannot write in {target.parent} ({e.strerror})") from None
    try:
        yield fd, lock_path
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock_path)
        os.close(fd)


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def check_space(needed: int, target: Path, field: str, overwrite: bool) -> None:
    """Refuse a plan that cannot fit on the target's filesystem before a byte is written."""
    where = target if target.is_dir() else target.parent
    free = free_bytes(where)
    if needed + SLACK > free:
        kept = " (the old checkpoint is kept until the new one is complete)" if overwrite and target.exists() else ""
        raise ConvertError(
            f"{field} {target}: needs {_gb(needed)} but its filesystem has {_gb(free)} free{kept}; "
            "free some space or choose another filesystem"
        )


def space_warning(needed: int, out_dir: Path) -> str | None:
    """For a preview: the same comparison as check_space, as text, or None when it fits."""
    path = Path(os.path.abspath(out_dir))
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        free = free_bytes(path)
    except OSError:
        return None
    if needed + SLACK > free:
        return f"needs {_gb(needed)}, {_gb(free)} free on {path}"
    return None


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def write_error(e: OSError, path: Path | str, needed: int, free_at: Path) -> WriteError:
    """A failed write as one line: the path, and for a full disk the bytes needed and free."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        try:
            free = _gb(free_bytes(free_at))
        except OSError:
            free = "?"
        return WriteError(f"{path}: no space left on the device (the conversion needs {_gb(needed)}, {free} free)")
    return WriteError(f"{path}: cannot write ({e.strerror})")


def fsync_path(path: Path) -> None:
    """Make a file's data, or a directory's entries, durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
