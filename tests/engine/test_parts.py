"""A job split into parts: the same bytes as one run, for every command; a part stopped mid-file leaves
nothing that looks done and its rerun finishes the job; the shared directory is the job's, not a pid's.

Parts run here in one process one after another (the engine's view: any order, any process); the
command-line tests (tests/test_parts.py) run them as concurrent processes.
"""

from __future__ import annotations

import fcntl
import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from engine.errors import ConvertError, WriteError
from engine.events import FileStarted, Finished, Notice, PartDone, Progress, Started
from engine.formats.safetensors_header import read_header
from engine.job import Job, load_job, prepare
from engine.layout import ParallelConfig
from engine.run.execute import execute, run
from engine.run.parts import Part, control_dir, describe, execute_part, file_problem, job_key, parse_part, shares
from tests.fixtures.tmpfs import fill

TP2_PP2 = ParallelConfig(tp_size=2, llm_pp_layers=[[1, 3]])


def _tree(root: Path) -> dict[str, tuple[bytes, int]]:
    """Every file and directory under root: bytes (None for a directory) and permission bits."""
    out = {}
    for p in sorted(root.rglob("*")):
        out[str(p.relative_to(root))] = (p.read_bytes() if p.is_file() else None, p.stat().st_mode & 0o777)
    return out


def _entries(parent: Path) -> list[str]:
    return sorted(os.listdir(parent))


def _adapter(hf: Path, out: Path, r: int = 2) -> Path:
    """A PEFT adapter on q_proj and v_proj of every layer, written by hand (PEFT's file format)."""
    header = {k: m for f in sorted(hf.glob("*.safetensors")) for k, m in read_header(f).items()}
    rng = np.random.default_rng(0)
    tensors = {}
    for key, meta in header.items():
        if key.endswith(("q_proj.weight", "v_proj.weight")):
            module = key.removesuffix(".weight")
            rows, cols = meta.shape
            tensors[f"base_model.model.{module}.lora_A.weight"] = rng.standard_normal((r, cols)).astype(np.float32)
            tensors[f"base_model.model.{module}.lora_B.weight"] = rng.standard_normal((rows, r)).astype(np.float32)
    out.mkdir(parents=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": r, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"]}
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


def _job(command: str, converter: str, **cfg) -> Job:
    return Job.model_validate({"converter": converter, "command": command, "cfg": cfg})


@pytest.fixture(scope="module")
def jobs(tiny_llms: dict[str, Path], qwen2vl_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Job]:
    """One job per command; the jobs that read a Megatron checkpoint read one written by a single run."""
    root = tmp_path_factory.mktemp("parts_inputs")
    hf = tiny_llms["llama"]
    adapter = _adapter(hf, root / "adapter")
    layout = TP2_PP2.model_dump()
    mm = root / "mm"
    run(prepare(_job("hf_to_mm", "LlamaConverter", mm_dir=mm, hf_config={"hf_dir": hf}, parallel_config=layout))[1], mm)
    lora_mm = root / "lora_mm"
    lora_job = _job("lora_hf_to_mm", "LlamaConverter", mm_dir=lora_mm, hf_config={"hf_dir": hf},
                    lora={"adapter_dir": adapter}, parallel_config=layout)  # fmt: skip
    run(prepare(lora_job)[1], lora_mm)
    vlm = {"tp_size": 2, "llm_pp_layers": [[2, 2]], "vit_pp_layers": [[3, 0]]}
    return {
        "hf_to_mm": _job(
            "hf_to_mm", "Qwen2VLConverter", mm_dir="x", hf_config={"hf_dir": qwen2vl_dir}, parallel_config=vlm
        ),
        "mm_to_hf": _job(
            "mm_to_hf", "LlamaConverter", save_hf_dir="x", mm_dir=mm, hf_config={"hf_dir": hf}, max_shard_size="20KB"
        ),
        "resplit": _job(
            "resplit",
            "LlamaConverter",
            source_dir=mm,
            target_dir="x",
            hf_config={"hf_dir": hf},
            target_parallel_config={"tp_size": 1, "llm_pp_layers": [[1, 1, 1, 1]]},
        ),
        "hf_to_dcp": _job("hf_to_dcp", "LlamaConverter", dcp_dir="x", hf_config={"hf_dir": hf}),
        "torch_dist": _job(
            "hf_to_mm", "LlamaConverter", mm_dir="x", hf_config={"hf_dir": hf}, parallel_config=layout,
            format="torch_dist",
        ),
        "merge_lora": _job(
            "merge_lora",
            "LlamaConverter",
            save_hf_dir="x",
            hf_config={"hf_dir": hf},
            lora={"adapter_dir": adapter},
            max_shard_size="20KB",
        ),
        "lora_hf_to_mm": lora_job,
        "lora_mm_to_hf": _job(
            "lora_mm_to_hf",
            "LlamaConverter",
            save_hf_dir="x",
            hf_config={"hf_dir": hf},
            lora={"adapter_dir": lora_mm, "parallel_config": layout},
        ),
    }


def _run_parts(plan, out: Path, count: int, key: str, order: list[int] | None = None, **kw) -> list[list]:
    """Each part's events, parts run one after another in `order`."""
    return [list(execute_part(plan, out, Part(i, count), key, **kw)) for i in order or range(count)]


ONE_FILE = ("hf_to_dcp", "lora_mm_to_hf")  # one data file (DCP; a PEFT adapter): one part writes it
COMMANDS = ["hf_to_mm", "mm_to_hf", "resplit", "hf_to_dcp", "merge_lora", "lora_hf_to_mm", "lora_mm_to_hf", "torch_dist"]


@pytest.mark.parametrize("command", COMMANDS)
def test_three_parts_write_the_bytes_of_one_run(jobs: dict[str, Job], tmp_path: Path, command: str) -> None:
    job = jobs[command]
    _, plan = prepare(job, check_out=False)
    run(plan, tmp_path / "one")
    assert len(plan.files) >= (1 if command in ONE_FILE else 3), "too few files to split"
    key = job_key(describe(job), plan)
    events = _run_parts(plan, tmp_path / "split", 3, key, order=[2, 0, 1])
    assert _tree(tmp_path / "split") == _tree(tmp_path / "one")
    assert _entries(tmp_path) == ["one", "split"]  # no lock, no shared directory, no staging left
    want = shares([f.nbytes for f in plan.files], 3)
    finished = [i for i, evs in enumerate(events) if isinstance(evs[-1], Finished)]
    assert finished == [max(n for n, k in enumerate([2, 0, 1]) if want[k])]  # the last to write, alone, renamed
    assert all(isinstance(evs[-1], PartDone) for n, evs in enumerate(events) if n not in finished)
    written = [next((e.files for e in evs if isinstance(e, Started)), 0) for evs in events]
    assert written == [len(want[k]) for k in (2, 0, 1)]
    if want[1]:  # part 2 ran first: 0 and 1 missing, then 1
        assert [evs[-1].waiting for evs in events[:2]] == [{0: len(want[0]), 1: len(want[1])}, {1: len(want[1])}]


def test_shares_are_largest_first_to_the_least_loaded_part() -> None:
    # by hand: 10 -> p0; 7 (#1) -> p1; 7 (#2) -> p2; 3 (#3) -> p1 (p1, p2 tie at 7: lower part);
    # 3 (#4) -> p2; 1 -> p0 (all at 10)
    assert shares([10, 7, 7, 3, 3, 1], 3) == [[0, 5], [1, 3], [2, 4]]
    assert shares([4, 4], 3) == [[0], [1], []]  # more parts than files: some write nothing
    assert shares([], 2) == [[], []]
    sizes = [random.Random(7).randrange(1, 1000) for _ in range(200)]
    got = shares(sizes, 7)
    assert sorted(i for s in got for i in s) == list(range(200))  # every file once
    loads = [sum(sizes[i] for i in s) for s in got]
    assert max(loads) - min(loads) <= max(sizes)
    assert got == shares(list(sizes), 7)  # the same on every node


@pytest.mark.parametrize(
    ("text", "want"), [("0/1", Part(0, 1)), ("2/8", Part(2, 8)), (" 7 / 8 ", Part(7, 8)), ("none", None), ("OFF", None)]
)
def test_parse_part(text: str, want: Part | None) -> None:
    assert parse_part(text) == want


@pytest.mark.parametrize("text", ["0/0", "3/2", "2/2", "x", "1", "-1/2", "1/2/3", "", "1.0/2", "²/3"])
def test_parse_part_refuses(text: str) -> None:
    with pytest.raises(ValueError, match=r"^expected i/N with 0 <= i < N \(0-based"):
        parse_part(text)


def test_bad_part_in_a_job_file_is_one_line(tmp_path: Path) -> None:
    job = tmp_path / "job.toml"
    job.write_text('converter = "Qwen2VLConverter"\ncommand = "hf_to_mm"\n[cfg]\nmm_dir = "o"\npart = "3/2"\n'
                   '[cfg.hf_config]\nhf_dir = "h"\n[cfg.parallel_config]\nllm_pp_layers = [[4]]\n')  # fmt: skip
    with pytest.raises(ConvertError) as e:
        load_job(job)
    assert str(e.value) == (
        f"{job}: cfg.part = '3/2': expected i/N with 0 <= i < N (0-based, as SLURM_ARRAY_TASK_ID and torchrun's "
        "RANK), or none"
    )


def test_the_key_is_the_job_not_the_part(jobs: dict[str, Job], tmp_path: Path, monkeypatch) -> None:
    job = jobs["hf_to_mm"]
    _, plan = prepare(job, check_out=False)
    key = job_key(describe(job), plan)
    cfg = job.cfg.model_copy(update={"part": "1/3"})
    assert job_key(describe(job.model_copy(update={"cfg": cfg})), plan) == key
    monkeypatch.chdir(tmp_path)  # the relative "x" now names another directory: another job
    assert job_key(describe(job), plan) != key
    other = job.cfg.model_copy(update={"overwrite": True})
    assert job_key(describe(job.model_copy(update={"cfg": other})), plan) != key


@pytest.fixture(scope="module")
def vlm(jobs: dict[str, Job]):
    job = jobs["hf_to_mm"]
    _, plan = prepare(job, check_out=False)
    return plan, job_key(describe(job), plan)


@pytest.fixture(scope="module")
def vlm_one(vlm, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("vlm_one") / "one"
    run(vlm[0], out)
    return _tree(out)


def test_a_part_stopped_mid_file_is_finished_by_its_rerun(vlm, vlm_one: dict, tmp_path: Path) -> None:
    plan, key = vlm
    out = tmp_path / "mm"
    want = shares([f.nbytes for f in plan.files], 3)
    stopped = execute_part(plan, out, Part(1, 3), key)
    for e in stopped:
        if isinstance(e, Progress):  # one tensor of its first file written
            break
    stopped.close()  # as a cancel does; SIGKILL: tests/test_parts.py
    control = control_dir(out.resolve(), key)
    staged = [p for p in (control / "staging").rglob("*") if p.is_file()]
    assert staged, "the half file stays in the part's staging directory"
    assert not [p for p in (control / "out").rglob("*") if p.is_file()]  # nothing that looks done
    _run_parts(plan, out, 3, key, order=[0, 2])
    assert not out.exists()
    missing = (control / "missing.txt").read_text().splitlines()
    assert missing == [f"# {len(want[1])} of {len(plan.files)} files missing; rerun the parts named (of 3)"] + [
        f"part 1/3 {plan.files[i].path}" for i in want[1]
    ]
    (last,) = _run_parts(plan, out, 3, key, order=[1])
    assert isinstance(last[-1], Finished)
    assert _tree(out) == vlm_one
    assert _entries(tmp_path) == ["mm"]


def test_a_file_that_is_not_whole_is_removed_and_rewritten(vlm, vlm_one: dict, tmp_path: Path) -> None:
    plan, key = vlm
    out = tmp_path / "mm"
    _run_parts(plan, out, 3, key, order=[0, 1])
    control = control_dir(out.resolve(), key)
    i = shares([f.nbytes for f in plan.files], 3)[0][0]
    damaged = control / "out" / plan.files[i].path
    os.truncate(damaged, damaged.stat().st_size - 100)  # the zip's central directory cut off
    with pytest.raises(WriteError) as e:
        _run_parts(plan, out, 3, key, order=[2])
    assert str(e.value).startswith(
        f"{control / 'out'}: 1 of {len(plan.files)} files are not whole ({plan.files[i].path}: not a whole zip file"
    )
    assert str(e.value).endswith(f"they were removed: rerun part 0/3 (listed in {control / 'missing.txt'})")
    assert not damaged.exists() and not out.exists()
    (rerun,) = _run_parts(plan, out, 3, key, order=[0])
    assert next(e for e in rerun if isinstance(e, Started)).files == 1  # the damaged file alone
    assert _tree(out) == vlm_one


def test_parts_of_another_count_reuse_the_files_done(vlm, vlm_one: dict, tmp_path: Path) -> None:
    plan, key = vlm
    out = tmp_path / "mm"
    _run_parts(plan, out, 2, key, order=[0])
    events = _run_parts(plan, out, 3, key)
    written = [next(e for e in evs if isinstance(e, Started)).files for evs in events]
    assert sum(written) == len(plan.files) - len(shares([f.nbytes for f in plan.files], 2)[0])
    assert _tree(out) == vlm_one


def _live(plan, out: Path, part: Part, key: str):
    """A part paused after it started writing: it holds its part lock, as a running process does."""
    gen = execute_part(plan, out, part, key)
    for e in gen:
        if isinstance(e, Started):
            return gen
    raise AssertionError("the part wrote nothing")


def test_a_single_run_waits_for_live_parts_and_clears_dead_ones(vlm, vlm_one: dict, tmp_path: Path) -> None:
    plan, key = vlm
    out = tmp_path / "mm"
    live = _live(plan, out, Part(1, 3), key)
    control = control_dir(out.resolve(), key)
    with pytest.raises(ConvertError) as e:
        run(plan, out)
    assert str(e.value) == (
        f"mm_dir {out.resolve()}: another conversion split into parts is writing it (part 1/3 pid {os.getpid()} on "
        f"{os.uname().nodename}); wait for it to finish or choose another directory"
    )
    assert control.is_dir()
    live.close()  # the part is gone: its directory is debris now
    notes = [e.text for e in execute(plan, out) if isinstance(e, Notice)]
    assert len(notes) == 1 and notes[0].startswith(f"removed the shared directory {control.name} (")
    assert _tree(out) == vlm_one
    assert _entries(tmp_path) == ["mm"]


def test_parts_of_two_jobs_on_one_target(vlm, jobs: dict[str, Job], tmp_path: Path) -> None:
    plan, key = vlm
    out = tmp_path / "mm"
    live = _live(plan, out, Part(0, 2), key)
    with pytest.raises(ConvertError, match=r"another conversion split into parts is writing it \(part 0/2 pid "):
        list(execute_part(plan, out, Part(0, 2), "another-job"))
    with pytest.raises(ConvertError, match=r"part 0/2 of this conversion is already running \(part 0/2 pid "):
        list(execute_part(plan, out, Part(0, 2), key))
    live.close()
    events = list(execute_part(plan, out, Part(0, 2), "another-job"))
    assert next(e.text for e in events if isinstance(e, Notice)).startswith(
        f"removed the shared directory {control_dir(out.resolve(), key).name} ("
    )
    assert _entries(tmp_path) == [".mm.mmtui-parts-another-job"]


def test_a_single_run_holding_the_target_stops_a_part(vlm, tmp_path: Path) -> None:
    plan, key = vlm
    out = tmp_path / "mm"
    single = execute(plan, out)
    next(single)  # Started: it owns the target's lock until it ends
    with pytest.raises(ConvertError, match=r"another conversion is writing it \(pid \d+ on "):
        list(execute_part(plan, out, Part(0, 2), key))
    single.close()
    assert _entries(tmp_path) == []


def test_overwrite_replaces_the_old_checkpoint_only_when_complete(vlm, vlm_one: dict, tmp_path: Path) -> None:
    plan, key = vlm
    out = tmp_path / "mm"
    out.mkdir()
    (out / "old").write_text("old")
    with pytest.raises(ConvertError, match="exists and is not empty"):
        list(execute_part(plan, out, Part(0, 2), key))
    _run_parts(plan, out, 2, key, order=[1], overwrite=True)
    assert (out / "old").read_text() == "old"
    _run_parts(plan, out, 2, key, order=[0], overwrite=True)
    assert _tree(out) == vlm_one
    assert _entries(tmp_path) == ["mm"]


def test_a_held_part_lock_file_is_what_makes_a_part_live(vlm, tmp_path: Path) -> None:
    """Liveness is the lock, not the file: a lock file left by a killed part does not block anyone."""
    plan, key = vlm
    out = tmp_path / "mm"
    _run_parts(plan, out, 3, key, order=[0])
    lock = control_dir(out.resolve(), key) / "locks" / "part-1-of-3.lock"
    lock.write_text("part 1/3 pid 1 on elsewhere\n")  # what a SIGKILLed part leaves
    fd = os.open(lock, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(ConvertError, match=r"\(part 1/3 pid 1 on elsewhere\)"):
            run(plan, out)
    finally:
        os.close(fd)
    assert isinstance(_run_parts(plan, out, 3, key, order=[1, 2])[-1][-1], Finished)


def test_a_file_that_reads_back_wrong_is_not_moved_in(vlm, vlm_one: dict, tmp_path: Path, monkeypatch) -> None:
    """Each part reads its rank files back against their CRC-32s before they count as written."""
    import engine.run.execute

    plan, key = vlm
    out = tmp_path / "mm"
    monkeypatch.setattr(engine.run.execute, "read_back_problem", lambda path: "record x reads back with CRC-32 0")
    with pytest.raises(WriteError, match=r"record x reads back with CRC-32 0: the disk did not keep what was written"):
        _run_parts(plan, out, 3, key, order=[0])
    assert not [p for p in (control_dir(out.resolve(), key) / "out").rglob("*") if p.is_file()]
    monkeypatch.undo()
    _run_parts(plan, out, 3, key)
    assert _tree(out) == vlm_one


def test_a_full_disk_stops_one_part_in_one_line_and_its_rerun_finishes(vlm, vlm_one: dict, small_fs: Path) -> None:
    """Another writer fills the disk while part 1 of 2 writes: one line, nothing half in out/, the part named as
    missing; with space again its rerun completes the checkpoint byte for byte."""
    plan, key = vlm
    assert plan.nbytes < 1 << 20  # the 2 MB disk holds it
    out = small_fs / "mm"
    _run_parts(plan, out, 2, key, order=[0])
    events = execute_part(plan, out, Part(1, 2), key)
    for e in events:
        if isinstance(e, FileStarted):  # space was checked; now the disk fills
            break
    hog = fill(small_fs)
    with pytest.raises(WriteError, match=r"no space left on the device \(the conversion needs") as err:
        for _ in events:
            pass
    events.close()
    assert "\n" not in str(err.value)
    control = control_dir(out.resolve(), key)
    assert not out.exists()
    assert all(file_problem(control / "out", f) is None for f in (plan.files[i] for i in shares(
        [f.nbytes for f in plan.files], 2)[0]))  # fmt: skip
    missing = (control / "missing.txt").read_text().splitlines()
    assert missing[1:] and all(line.startswith("part 1/2 ") for line in missing[1:])
    hog.unlink()
    (last,) = _run_parts(plan, out, 2, key, order=[1])
    assert isinstance(last[-1], Finished)
    assert _tree(out) == vlm_one
    assert sorted(p.name for p in small_fs.iterdir()) == ["mm"]
