"""Which part of a split job this process is: `--cfg.part i/N`, or the scheduler's environment.

A Slurm array task is part (ID - MIN) / STEP of its COUNT tasks; a task of a Slurm step is part
SLURM_PROCID of SLURM_NTASKS (SLURM_STEP_NUM_TASKS when srun gives it); a torchrun process is part
RANK of WORLD_SIZE. An array task that runs several processes (srun or torchrun inside each task)
is split again: part a * n + r of A * n. torchrun's RANK already counts every node's processes, so
under srun + torchrun RANK wins over SLURM_PROCID. One part in all is the whole job, as no part.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from engine.errors import ConvertError
from engine.run.parts import Part, parse_part


@dataclass(frozen=True)
class Chosen:
    part: Part | None
    source: str  # how it was chosen, for the line printed before the run


def _int(env: Mapping[str, str], name: str) -> int | None:
    text = env.get(name)
    if text is None or text.strip() == "":
        return None
    try:
        value = int(text)
    except ValueError:
        raise ConvertError(f"environment {name}={text!r}: expected a whole number") from None
    if value < 0:
        raise ConvertError(f"environment {name}={text!r}: expected a whole number >= 0")
    return value


def _array(env: Mapping[str, str]) -> tuple[int, int, str] | None:
    task = _int(env, "SLURM_ARRAY_TASK_ID")
    if task is None:
        return None
    low, high = _int(env, "SLURM_ARRAY_TASK_MIN"), _int(env, "SLURM_ARRAY_TASK_MAX")
    step = _int(env, "SLURM_ARRAY_TASK_STEP") or 1
    count = _int(env, "SLURM_ARRAY_TASK_COUNT")
    low = 0 if low is None else low
    if count is None and high is not None:
        count = (high - low) // step + 1
    if count is None:
        raise ConvertError(
            f"environment SLURM_ARRAY_TASK_ID={task} without SLURM_ARRAY_TASK_COUNT or SLURM_ARRAY_TASK_MAX: "
            "cannot tell how many parts; give --cfg.part i/N"
        )
    index, off = divmod(task - low, step)
    if off or not 0 <= index < count:
        raise ConvertError(
            f"environment SLURM_ARRAY_TASK_ID={task}: not task {task - low} of a {count}-task array from "
            f"{low} in steps of {step} (use --array=0-{count - 1}); give --cfg.part i/N"
        )
    return index, count, f"SLURM_ARRAY_TASK_ID={task} of {count}"


def _ranked(env: Mapping[str, str], rank_name: str, size_names: tuple[str, ...]) -> tuple[int, int, str] | None:
    rank = _int(env, rank_name)
    size_name = next((n for n in size_names if env.get(n, "").strip()), None)
    if rank is None or size_name is None:
        return None
    size = _int(env, size_name)
    assert size is not None
    if not rank < size:
        raise ConvertError(f"environment {rank_name}={rank} is not below {size_name}={size}; give --cfg.part i/N")
    return rank, size, f"{rank_name}={rank} of {size_name}={size}"


def detect(env: Mapping[str, str]) -> Chosen:
    """The part the environment gives, or none."""
    outer = _array(env)
    inner = _ranked(env, "RANK", ("WORLD_SIZE",)) or _ranked(
        env, "SLURM_PROCID", ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS")
    )
    if outer and inner and inner[1] > 1:
        index, count = outer[0] * inner[1] + inner[0], outer[1] * inner[1]
        found: tuple[int, int, str] | None = (index, count, f"{outer[2]}, {inner[2]}")
    else:
        found = outer or inner
    if found is None or found[1] <= 1:
        return Chosen(None, "")
    return Chosen(Part(found[0], found[1]), f"from {found[2]}")


def choose(given: str | None, env: Mapping[str, str]) -> Chosen:
    """`--cfg.part` when given (i/N, or none/off for the whole job), else the environment's."""
    if given is None:
        return detect(env)
    try:
        part = parse_part(given)
    except ValueError as e:
        raise ConvertError(f"cfg.part = {given!r}: {e}") from None
    if part is not None and part.count == 1:
        return Chosen(None, "")
    return Chosen(part, "from --cfg.part" if part else "")
