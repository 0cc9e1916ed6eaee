"""The command line around the target: inputs never lost, one owner, batch logs, Ctrl-C at any moment."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from engine.run.target import claim
from tests.test_cli import BIN, LAYOUT, hf_to_mm


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _one_line(r: subprocess.CompletedProcess, code: int = 2) -> str:
    assert r.returncode == code, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    return lines[0]


def test_overwrite_refuses_a_target_holding_the_input(qwen2vl_dir: Path, tmp_path: Path) -> None:
    """Issue 16's recipe: --cfg.mm_dir w --cfg.hf_config.hf_dir w/hf --cfg.overwrite true deleted w/hf."""
    hf = tmp_path / "w" / "hf"
    shutil.copytree(qwen2vl_dir, hf)
    before = _files(tmp_path / "w")
    line = _one_line(hf_to_mm(hf, tmp_path / "w", "--cfg.overwrite", "true"))
    assert line == (
        f"mm-convert: error: mm_dir {tmp_path}/w: contains the input hf_config.hf_dir {hf}; an output may not "
        "overlap an input, even with overwrite: choose a directory outside every input"
    )
    assert _files(tmp_path / "w") == before


def test_a_held_target_is_refused_naming_its_owner(qwen2vl_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    with claim(out, overwrite=True):
        line = _one_line(hf_to_mm(qwen2vl_dir, out, "--cfg.overwrite", "true"))
    assert line.startswith(f"mm-convert: error: mm_dir {out}: another conversion is writing it (pid {os.getpid()} on ")
    assert list(tmp_path.iterdir()) == []


def test_two_runs_racing_to_one_target_have_one_winner(qwen2vl_dir: Path, tmp_path: Path) -> None:
    """Issue 16's recipe: two hf_to_mm with different TP into the same new directory both exited 0."""
    for trial in range(3):
        out = tmp_path / str(trial) / "mm"
        argv = [str(BIN / "mm-convert"), "Qwen2VLConverter", "hf_to_mm", "--cfg.mm_dir", str(out),
                "--cfg.hf_config.hf_dir", str(qwen2vl_dir), *LAYOUT, "--cfg.parallel_config.tp_size"]  # fmt: skip
        procs = {
            tp: subprocess.Popen([*argv, str(tp)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for tp in (1, 2)
        }
        results = {tp: (p.wait(timeout=300), p.stderr.read()) for tp, p in procs.items()}
        winners = [tp for tp, (rc, _) in results.items() if rc == 0]
        assert len(winners) == 1, results
        (loser,) = set(results) - set(winners)
        rc, err = results[loser]
        assert rc == 2 and len(err.strip().splitlines()) == 1, err
        assert "another conversion is writing it (pid " in err or "exists and is not empty" in err, err
        ranks = sorted(p.name for p in (out / "release").iterdir())
        assert len(ranks) == 2 * winners[0]
        assert sorted(p.name for p in out.parent.iterdir()) == ["mm"]


def test_a_batch_log_gets_one_summary_line(qwen2vl_dir: Path, tmp_path: Path) -> None:
    r = hf_to_mm(qwen2vl_dir, tmp_path / "out")
    assert r.returncode == 0, r.stderr
    (line,) = r.stdout.strip().splitlines()
    sizes = [p.stat().st_size for p in (tmp_path / "out").rglob("*") if p.is_file()]
    head = f"wrote {tmp_path}/out: {len(sizes)} files, {sum(sizes):,} bytes in "
    assert line.startswith(head) and " GB/s), peak memory " in line and line.endswith(" MB"), line


def test_ctrl_c_while_planning_is_the_cancel_line(
    qwen2vl_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from engine.job import load_job
    from mmtui import runner

    def interrupted(*_a, **_k):
        raise KeyboardInterrupt

    job = tmp_path / "job.toml"
    job.write_text(
        f'converter = "Qwen2VLConverter"\ncommand = "hf_to_mm"\n[cfg]\nmm_dir = "{tmp_path}/out"\n'
        f'[cfg.hf_config]\nhf_dir = "{qwen2vl_dir}"\n[cfg.parallel_config]\nllm_pp_layers = [[4]]\n'
        "vit_pp_layers = [[3]]\n"
    )
    monkeypatch.setattr(runner, "prepare", interrupted)
    with pytest.raises(SystemExit) as e:
        runner.run_job_cli(load_job(job), prog="mm-convert")
    assert e.value.code == 130
    assert capsys.readouterr().err == "mm-convert: cancelled; nothing was written\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.toml"]


@pytest.mark.parametrize("delay", [0.3, 0.6, 0.9, 1.2])
def test_ctrl_c_at_any_moment_is_one_line(qwen2vl_dir: Path, tmp_path: Path, delay: float) -> None:
    """From a process that takes Ctrl-C (a background job of a script ignores it)."""
    out = tmp_path / "a" / "b" / "mm"
    proc = subprocess.Popen(
        [str(BIN / "mm-convert"), "Qwen2VLConverter", "hf_to_mm", "--cfg.mm_dir", str(out),
         "--cfg.hf_config.hf_dir", str(qwen2vl_dir), *LAYOUT],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:  # it had finished
        assert sorted(p.name for p in out.iterdir()) == ["latest_checkpointed_iteration.txt", "release"]
        return
    assert proc.returncode in (130, -signal.SIGINT), err
    if proc.returncode == 130:
        assert err == "mm-convert: cancelled; nothing was written\n"
        assert list(tmp_path.iterdir()) == []  # not even the parents it would have made


def test_a_plan_larger_than_the_free_space_is_refused_before_writing(qwen2vl_dir: Path, tmp_path: Path) -> None:
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)]).returncode:
        pytest.skip("needs root and tmpfs mounts")
    try:
        line = _one_line(hf_to_mm(qwen2vl_dir, mnt / "out"))
        assert line.startswith(f"mm-convert: error: mm_dir {mnt}/out: needs 0.9 MB but its filesystem has 0.3 MB free")
        assert list(mnt.iterdir()) == []
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


def test_a_write_failure_exits_1(
    qwen2vl_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from engine.errors import WriteError
    from mmtui import runner

    def full(*_a, **_k):
        raise WriteError(f"{tmp_path}/out/release/mp_rank_00/model_optim_rng.pt: no space left on the device")

    monkeypatch.setattr(runner, "run_job", full)
    with pytest.raises(SystemExit) as e:
        runner.run_job_cli(None, prog="mm-convert")  # type: ignore[arg-type]
    assert e.value.code == 1
    assert capsys.readouterr().err.count("\n") == 1
