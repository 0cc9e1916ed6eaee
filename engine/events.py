"""Progress events of a running conversion: plain data for the TUI and the headless runner."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class Started:
    total_bytes: int
    files: int


@dataclass(frozen=True, slots=True)
class FileStarted:
    index: int
    path: str
    nbytes: int


@dataclass(frozen=True, slots=True)
class Progress:
    done_bytes: int  # over the whole job
    total_bytes: int
    path: str  # current output file
    key: str  # tensor just written


@dataclass(frozen=True, slots=True)
class FileDone:
    index: int
    path: str


@dataclass(frozen=True, slots=True)
class Finished:
    out_dir: Path
    total_bytes: int
    seconds: float


@dataclass(frozen=True, slots=True)
class Notice:
    """Something the user should read that is not an error (debris of an earlier run was removed)."""

    text: str


@dataclass(frozen=True, slots=True)
class PartDone:
    """A part of a split job wrote its share (engine/run/parts.py); Finished follows when this part completed the job.

    `waiting`: the parts (of this part's count) that still have files to write, with how many;
    `completed_by_other`: another part completed the job meanwhile (nothing was left to do).
    """

    part: tuple[int, int]  # (index, count)
    files: int  # files this part wrote
    total_bytes: int
    seconds: float
    waiting: dict[int, int]  # part index -> files missing
    record: Path | None  # where the missing files are listed
    completed_by_other: bool = False


Event = Notice | Started | FileStarted | Progress | FileDone | Finished | PartDone
