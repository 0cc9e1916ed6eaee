"""A job split over processes as users run it: Slurm array tasks, torchrun ranks, `--cfg.part`.

Three processes at once write the bytes one process writes; a part that is not run, or is
killed, leaves no target and a list of what is missing, and running it again finishes the job.
The environment of each scheduler names the part; `--cfg.part` overrides it or switches it off.
"""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from engine.errors import ConvertError
from engine.run.parts import Part
from mmtui.part_env import Chosen, choose, detect
from tests.test_cli import BIN

LAYOUT = [
    "--cfg.parallel_config.llm_pp_layers", "[[2,2]]", "--cfg.parallel_config.vit_pp_layers", "[[3,0]]",
    "--cfg.parallel_config.tp_size", "2",
]  # fmt: skip
SCHEDULER = ("SLURM_", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_", "TORCHELASTIC_", "GROUP_")
SYNTAX = "expected i/N with 0 <= i < N (0-based, as SLURM_ARRAY_TASK_ID and torchrun's RANK), or none"


def _env(**extra: str) -> dict[str, str]:
    """This process's environment without any scheduler's variables (the suite may run under Slurm)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(SCHEDULER)}
    return env | extra


def _argv(hf: Path, out: Path, *extra: str) -> list[str]:
    return [str(BIN / "mm-convert"), "Qwen2VLConverter", "hf_to_mm", "--cfg.mm_dir", str(out),
            "--cfg.hf_config.hf_dir", str(hf), *LAYOUT, *extra]  # fmt: skip


def _run(argv: list[str], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, env=_env(**env), timeout=300)


def _array(i: int, n: int) -> dict[str, str]:
    return {"SLURM_ARRAY_TASK_ID": str(i), "SLURM_ARRAY_TASK_COUNT": str(n), "SLURM_ARRAY_TASK_MIN": "0",
            "SLURM_ARRAY_TASK_MAX": str(n - 1), "SLURM_ARRAY_TASK_STEP": "1"}  # fmt: skip


def _tree(root: Path) -> dict[str, tuple[bytes | None, int]]:
    return {
        str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None, p.stat().st_mode & 0o777)
        for p in sorted(root.rglob("*"))
    }


@pytest.fixture(scope="module")
def one(qwen2vl_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The single run's files: what every split run must write."""
    out = tmp_path_factory.mktemp("one") / "mm"
    r = _run(_argv(qwen2vl_dir, out))
    assert r.returncode == 0, r.stderr
    assert len([p for p in out.rglob("*.pt")]) == 4
    return _tree(out)


def test_three_array_tasks_at_once_write_the_bytes_of_one_run(qwen2vl_dir: Path, one: dict, tmp_path: Path) -> None:
    out = tmp_path / "mm"
    procs = [
        subprocess.Popen(
            _argv(qwen2vl_dir, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(**_array(i, 3))
        )
        for i in range(3)
    ]
    results = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    for i, (code, stdout, stderr) in enumerate(results):
        assert code == 0, stderr
        assert stderr.splitlines()[0] == (
            f"note: part {i}/3 (from SLURM_ARRAY_TASK_ID={i} of 3; --cfg.part none runs the whole job here)"
        )
        assert stdout.startswith(f"part {i}/3: wrote ")
    last = [i for i, (_, stdout, _) in enumerate(results) if "the last to finish" in stdout]
    assert len(last) == 1, [r[1] for r in results]
    assert _tree(out) == one
    assert os.listdir(tmp_path) == ["mm"]  # no lock, no shared directory


@pytest.fixture
def job_file(qwen2vl_dir: Path, tmp_path: Path) -> Path:
    job = tmp_path / "job.toml"
    job.write_text(
        f'converter = "Qwen2VLConverter"\ncommand = "hf_to_mm"\n[cfg]\nmm_dir = "{tmp_path / "mm"}"\n'
        f'[cfg.hf_config]\nhf_dir = "{qwen2vl_dir}"\n'
        "[cfg.parallel_config]\ntp_size = 2\nllm_pp_layers = [[2, 2]]\nvit_pp_layers = [[3, 0]]\n"
    )
    return job


def _replay(job: Path, *extra: str, **env: str) -> subprocess.CompletedProcess:
    return _run([str(BIN / "mmtui"), "--replay", str(job), *extra], **env)


def _shared(tmp_path: Path) -> Path:
    (shared,) = tmp_path.glob(".mm.mmtui-parts-*")
    return shared


def test_a_part_not_run_leaves_no_target_and_its_run_finishes_the_job(job_file: Path, one: dict, tmp_path: Path):
    out = tmp_path / "mm"
    for i in (0, 2):
        r = _replay(job_file, "--part", f"{i}/3")
        assert r.returncode == 0, r.stderr
    assert not out.exists()
    shared = _shared(tmp_path)
    assert "of part 1/3 are still missing" in r.stdout and f"(listed in {shared / 'missing.txt'})" in r.stdout
    listed = (shared / "missing.txt").read_text().splitlines()
    assert listed[0].startswith("# ") and listed[1:] and all(line.startswith("part 1/3 ") for line in listed[1:])
    r = _replay(job_file, "--part=1/3")
    assert r.returncode == 0, r.stderr
    assert "the last to finish: checked every part's files and put" in r.stdout
    assert _tree(out) == one
    assert sorted(os.listdir(tmp_path)) == ["job.toml", "mm"]


def test_a_killed_part_run_again_finishes_the_job(job_file: Path, one: dict, tmp_path: Path) -> None:
    out = tmp_path / "mm"
    for i in (0, 2):
        assert _replay(job_file, "--part", f"{i}/3").returncode == 0
    shared = _shared(tmp_path)
    proc = subprocess.Popen([str(BIN / "mmtui"), "--replay", str(job_file), "--part", "1/3"], env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 60
    while proc.poll() is None and not (shared / "staging" / "1-of-3").exists() and time.monotonic() < deadline:
        time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)  # while it writes, or (on a fast machine) just after it finished
    proc.wait(timeout=60)
    if out.exists():
        assert proc.returncode == 0 and not shared.exists()
    else:
        assert proc.returncode == -signal.SIGKILL
        r = _replay(job_file, "--part", "1/3")
        assert r.returncode == 0, r.stderr
    assert _tree(out) == one
    assert sorted(os.listdir(tmp_path)) == ["job.toml", "mm"]


def test_torchrun_ranks_are_parts(job_file: Path, one: dict, tmp_path: Path) -> None:
    """The README's recipe on one node: `torchrun ... -m mmtui --replay job.toml`."""
    argv = [str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "3", "-m", "mmtui", "--replay", str(job_file)]
    r = _run(argv)
    assert r.returncode == 0, r.stderr
    for i in range(3):
        assert f"note: part {i}/3 (from RANK={i} of WORLD_SIZE=3; --cfg.part none runs the whole job here)" in r.stderr
    assert _tree(tmp_path / "mm") == one


def test_part_none_runs_the_whole_job_in_a_slurm_array_task(job_file: Path, one: dict, tmp_path: Path) -> None:
    r = _replay(job_file, "--part", "none", **_array(1, 3))
    assert r.returncode == 0, r.stderr
    assert "part" not in r.stderr
    assert _tree(tmp_path / "mm") == one


def _in_process(main, argv: list[str], capsys, monkeypatch, **env: str) -> tuple[int, str]:
    """(exit status, stderr) of a command line run here, in this environment (scheduler variables removed)."""
    for k in list(os.environ):
        if k.startswith(SCHEDULER):
            monkeypatch.delenv(k)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(SystemExit) as e:
        main(argv)
    return e.value.code, capsys.readouterr().err


@pytest.mark.parametrize("value", ["0/0", "3/2", "x"])
def test_a_bad_part_is_one_line(qwen2vl_dir: Path, tmp_path: Path, value: str, capsys, monkeypatch) -> None:
    from mmtui.convert_cli import main

    argv = _argv(qwen2vl_dir, tmp_path / "mm", "--cfg.part", value)[1:]
    assert _in_process(main, argv, capsys, monkeypatch) == (2, f"mm-convert: error: cfg.part = {value!r}: {SYNTAX}\n")
    assert os.listdir(tmp_path) == []


def test_a_bad_environment_is_one_line(job_file: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    from mmtui.__main__ import main

    argv = ["--replay", str(job_file)]
    assert _in_process(main, argv, capsys, monkeypatch, SLURM_ARRAY_TASK_ID="x", SLURM_ARRAY_TASK_COUNT="3") == (
        2, "mmtui: error: environment SLURM_ARRAY_TASK_ID='x': expected a whole number\n"
    )  # fmt: skip
    assert _in_process(main, [*argv, "--part", "3/3"], capsys, monkeypatch) == (
        2, f"mmtui: error: cfg.part = '3/3': {SYNTAX}\n"
    )  # fmt: skip
    assert os.listdir(tmp_path) == ["job.toml"]


def test_parts_of_two_jobs_on_one_target(qwen2vl_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "mm"
    assert _run(_argv(qwen2vl_dir, out, "--cfg.part", "0/2")).returncode == 0
    (shared,) = tmp_path.glob(".mm.mmtui-parts-*")
    lock = shared / "locks" / "part-1-of-2.lock"
    lock.write_text("part 1/2 pid 7 on node3\n")
    fd = os.open(lock, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # part 1 of that job is running (on another node)
    other = ["--cfg.parallel_config.tp_size", "1", "--cfg.part", "0/2"]  # another job: TP 1
    try:
        r = _run(_argv(qwen2vl_dir, out, *other))
    finally:
        os.close(fd)
    assert (r.returncode, r.stderr.splitlines()[-1]) == (
        2, f"mm-convert: error: mm_dir {out}: another conversion split into parts is writing it (part 1/2 pid 7 on "
        "node3); wait for it to finish or choose another directory",
    )  # fmt: skip
    r = _run(_argv(qwen2vl_dir, out, *other))  # that part is gone: its job's directory is debris
    assert r.returncode == 0, r.stderr
    assert f"note: removed the shared directory {shared.name} (" in r.stderr
    assert not shared.exists()


def test_convert_ckpt_takes_part(tiny_llms: dict[str, Path], tmp_path: Path, capsys, monkeypatch) -> None:
    from mmtui.convert_ckpt_cli import main

    argv = ["--load-dir", str(tiny_llms["llama"]), "--save-dir", str(tmp_path / "mm"), "--model-type-hf", "llama2",
            "--print-job"]  # fmt: skip
    main([*argv, "--part", "1/2"])
    assert "  part: 1/2\n" in capsys.readouterr().out
    assert _in_process(main, [*argv, "--part", "2/2"], capsys, monkeypatch) == (
        2, f"convert-ckpt: error: argument --part: '2/2': {SYNTAX}\n"
    )  # fmt: skip


# ---- the environment ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "part", "source"),
    [
        ({}, None, ""),
        (_array(2, 8), Part(2, 8), "from SLURM_ARRAY_TASK_ID=2 of 8"),
        ({"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "4", "SLURM_ARRAY_TASK_MAX": "7"}, Part(1, 4),
         "from SLURM_ARRAY_TASK_ID=5 of 4"),  # --array=4-7, an older Slurm without COUNT
        ({"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_MAX": "7",
          "SLURM_ARRAY_TASK_STEP": "2", "SLURM_ARRAY_TASK_COUNT": "4"}, Part(2, 4),
         "from SLURM_ARRAY_TASK_ID=5 of 4"),  # --array=1-7:2
        (_array(0, 1), None, ""),  # one task: the whole job
        ({"SLURM_PROCID": "3", "SLURM_NTASKS": "4"}, Part(3, 4), "from SLURM_PROCID=3 of SLURM_NTASKS=4"),
        ({"SLURM_PROCID": "1", "SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "2"}, Part(1, 2),
         "from SLURM_PROCID=1 of SLURM_STEP_NUM_TASKS=2"),  # srun -n 2 in a larger allocation
        ({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}, None, ""),
        ({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}, Part(5, 8), "from RANK=5 of WORLD_SIZE=8"),
        ({"RANK": "5", "WORLD_SIZE": "8", "SLURM_PROCID": "2", "SLURM_NTASKS": "4"}, Part(5, 8),
         "from RANK=5 of WORLD_SIZE=8"),  # srun + torchrun: RANK counts every node's processes
        ({**_array(1, 4), "SLURM_PROCID": "1", "SLURM_NTASKS": "2"}, Part(3, 8),
         "from SLURM_ARRAY_TASK_ID=1 of 4, SLURM_PROCID=1 of SLURM_NTASKS=2"),  # srun -n 2 in each array task
    ],
)  # fmt: skip
def test_detect(env: dict[str, str], part: Part | None, source: str) -> None:
    assert detect(env) == Chosen(part, source)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"SLURM_ARRAY_TASK_ID": "x", "SLURM_ARRAY_TASK_COUNT": "3"},
         "environment SLURM_ARRAY_TASK_ID='x': expected a whole number"),
        ({"SLURM_ARRAY_TASK_ID": "2"}, "environment SLURM_ARRAY_TASK_ID=2 without SLURM_ARRAY_TASK_COUNT or "
         "SLURM_ARRAY_TASK_MAX: cannot tell how many parts; give --cfg.part i/N"),
        ({"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_MAX": "7",
          "SLURM_ARRAY_TASK_COUNT": "3"},  # --array=1,3,7
         "environment SLURM_ARRAY_TASK_ID=7: not task 6 of a 3-task array from 1 in steps of 1 (use --array=0-2); "
         "give --cfg.part i/N"),
        ({"RANK": "4", "WORLD_SIZE": "4"}, "environment RANK=4 is not below WORLD_SIZE=4; give --cfg.part i/N"),
        ({"RANK": "-1", "WORLD_SIZE": "4"}, "environment RANK='-1': expected a whole number >= 0"),
    ],
)  # fmt: skip
def test_detect_refuses(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConvertError) as e:
        detect(env)
    assert str(e.value) == message


def test_the_command_line_overrides_or_switches_off_the_environment() -> None:
    env = _array(2, 8)
    assert choose(None, env) == Chosen(Part(2, 8), "from SLURM_ARRAY_TASK_ID=2 of 8")
    assert choose("1/3", env) == Chosen(Part(1, 3), "from --cfg.part")
    assert choose("none", env) == Chosen(None, "")
    assert choose("off", env) == Chosen(None, "")
    assert choose("0/1", env) == Chosen(None, "")  # one part: the whole job, as no part
    with pytest.raises(ConvertError, match=r"^cfg.part = '8/8': expected i/N"):
        choose("8/8", env)
