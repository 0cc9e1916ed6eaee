"""The target: never an input, one owner, no debris, links followed or refused, space checked first.

Each test builds the failing situation first (issue 16's recipes), then checks that the
run refuses it in one line before anything is written, or cleans up after itself.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from engine.errors import ConvertError, WriteError
from engine.events import Notice
from engine.job import HfConfig, HfToMmConfig, Job, LoraConfig, MmToHfConfig, ResplitConfig, prepare
from engine.layout import ParallelConfig
from engine.run import target as target_mod
from engine.run.execute import execute, run
from engine.run.target import claim
from tests.fixtures.tmpfs import fill, mount_tmpfs

PC = ParallelConfig(tp_size=1, llm_pp_layers=[[4]], vit_pp_layers=[[3]])


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _hf_copy(qwen2vl_dir: Path, dest: Path) -> Path:
    shutil.copytree(qwen2vl_dir, dest)
    return dest


def _to_mm(hf: Path, out: Path, overwrite: bool = False) -> Job:
    cfg = HfToMmConfig(mm_dir=out, hf_config=HfConfig(hf_dir=hf), parallel_config=PC, overwrite=overwrite)
    return Job(converter="Qwen2VLConverter", command="hf_to_mm", cfg=cfg)


def _convert(job: Job) -> None:
    _, plan = prepare(job)
    run(plan, job.out_dir, overwrite=job.overwrite, field=job.out_field)


# -- 1. an input is never the target, inside it, or around it -------------------------------------


@pytest.mark.parametrize("where", ["same", "target_holds_input", "target_inside_input"])
def test_overwrite_never_deletes_the_hf_dir(qwen2vl_dir: Path, tmp_path: Path, where: str) -> None:
    work = tmp_path / "w"
    hf = _hf_copy(qwen2vl_dir, work / "hf")
    before = _files(hf)
    out = {"same": hf, "target_holds_input": work, "target_inside_input": hf / "mm"}[where]
    how = {"same": "is", "target_holds_input": "contains", "target_inside_input": "lies inside"}[where]
    with pytest.raises(ConvertError, match=f"mm_dir {out}: {how} the input hf_config.hf_dir {hf}; "):
        _convert(_to_mm(hf, out, overwrite=True))
    assert _files(hf) == before
    assert not (hf / "mm").exists()


def test_a_new_directory_inside_an_input_is_allowed_without_overwrite(qwen2vl_dir: Path, tmp_path: Path) -> None:
    """Nothing is replaced or read there (MindSpeed-LLM's way back writes <hf_dir>/mg2hf); with overwrite it is
    refused, above."""
    hf = _hf_copy(qwen2vl_dir, tmp_path / "hf")
    before = _files(hf)
    _convert(_to_mm(hf, hf / "mg"))
    assert sorted(p.name for p in (hf / "mg").iterdir()) == ["latest_checkpointed_iteration.txt", "release"]
    assert {k: v for k, v in _files(hf).items() if not k.startswith("mg/")} == before


def test_every_input_counts(qwen2vl_dir: Path, tmp_path: Path) -> None:
    hf = _hf_copy(qwen2vl_dir, tmp_path / "hf")
    mm = tmp_path / "mm"
    _convert(_to_mm(hf, mm))
    mm_before = _files(mm)
    back = MmToHfConfig(save_hf_dir=mm, mm_dir=mm, hf_config=HfConfig(hf_dir=hf), parallel_config=PC, overwrite=True)
    with pytest.raises(ConvertError, match=f"save_hf_dir {mm}: is the input mm_dir {mm}; "):
        prepare(Job(converter="Qwen2VLConverter", command="mm_to_hf", cfg=back))
    back = back.model_copy(update={"save_hf_dir": hf})
    with pytest.raises(ConvertError, match=f"save_hf_dir {hf}: is the input hf_config.hf_dir {hf}; "):
        prepare(Job(converter="Qwen2VLConverter", command="mm_to_hf", cfg=back))
    cut = ResplitConfig(
        source_dir=mm, target_dir=mm, hf_config=HfConfig(hf_dir=hf), source_parallel_config=PC,
        target_parallel_config=PC, overwrite=True,
    )  # fmt: skip
    with pytest.raises(ConvertError, match=f"target_dir {mm}: is the input source_dir {mm}; "):
        prepare(Job(converter="Qwen2VLConverter", command="resplit", cfg=cut))
    adapter = tmp_path / "out" / "adapter"
    adapter.mkdir(parents=True)
    job = _to_mm(hf, tmp_path / "out", overwrite=True)
    job.cfg.lora = LoraConfig(adapter_dir=adapter)
    with pytest.raises(ConvertError, match=f"contains the input lora.adapter_dir {adapter}; "):
        prepare(job)
    assert adapter.is_dir() and _files(mm) == mm_before


def test_the_executor_refuses_a_target_holding_a_file_it_reads(qwen2vl_dir: Path, tmp_path: Path) -> None:
    """Without the job's directories (a plan run directly), every file the plan reads still counts."""
    hf = _hf_copy(qwen2vl_dir, tmp_path / "hf")
    before = _files(hf)
    _, plan = prepare(_to_mm(hf, tmp_path / "unused"))
    plan.inputs = []
    with pytest.raises(ConvertError, match=f"mm_dir {tmp_path}: contains the input file {hf}/"):
        run(plan, tmp_path, overwrite=True)
    assert _files(hf) == before


# -- 2. one owner per target -------------------------------------------------------------------------


def test_a_second_run_stops_at_the_lock_naming_the_first(qwen2vl_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    _, plan = prepare(_to_mm(qwen2vl_dir, out))
    for overwrite in (False, True):
        busy = rf"another conversion is writing it \(pid {os.getpid()} on "
        with claim(out, overwrite), pytest.raises(ConvertError, match=busy):
            run(plan, out, overwrite=overwrite)
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    run(plan, out)  # the lock went with its owner
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_the_rename_never_replaces_a_directory_that_appeared(qwen2vl_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    _, plan = prepare(_to_mm(qwen2vl_dir, out))
    events = execute(plan, out)
    for ev in events:
        if type(ev).__name__ == "FileStarted":
            out.mkdir()
            (out / "theirs.txt").write_text("not yours")
            break
    with pytest.raises(ConvertError, match=f"mm_dir {out}: was filled by something else while converting"):
        for _ in events:
            pass
    assert _files(out) == {"theirs.txt": b"not yours"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_overwrite_swaps_in_one_step_and_leaves_nothing(qwen2vl_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    _convert(_to_mm(qwen2vl_dir, out, overwrite=True))
    assert sorted(p.name for p in out.iterdir()) == ["latest_checkpointed_iteration.txt", "release"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# -- 3. no debris ---------------------------------------------------------------------------------------


def test_debris_of_a_killed_run_is_removed_by_the_next(qwen2vl_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    for name in (".out.mmtui-tmp-0badc0de", ".out.mmtui-tmp-old-12345678"):
        (tmp_path / name / "release").mkdir(parents=True)
        (tmp_path / name / "release" / "half.pt").write_bytes(b"x" * 1000)
    (tmp_path / ".out.mmtui-lock").write_text("pid 999999 on elsewhere\n")  # its flock died with it
    (tmp_path / ".other.mmtui-tmp-11111111").mkdir()  # another target's: not ours to remove
    _, plan = prepare(_to_mm(qwen2vl_dir, out))
    notes = [ev.text for ev in execute(plan, out) if isinstance(ev, Notice)]
    assert notes == [f"removed 2 temporary directories (0.0 MB) left by an earlier run to {out} that did not finish"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.mmtui-tmp-11111111", "out"]


def test_a_failed_run_leaves_nothing(qwen2vl_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    _, plan = prepare(_to_mm(qwen2vl_dir, out))

    def boom(*_a, **_k):
        raise RuntimeError("a bug")

    monkeypatch.setattr("engine.run.execute._fsync_tree", boom)
    with pytest.raises(RuntimeError):
        run(plan, out)
    assert list(tmp_path.iterdir()) == []


def test_dangling_link_and_loop_are_refused_before_any_work(qwen2vl_dir: Path, tmp_path: Path) -> None:
    dangling, loop = tmp_path / "dangling", tmp_path / "loop"
    dangling.symlink_to(tmp_path / "nowhere")
    loop.symlink_to(loop)
    _, plan = prepare(_to_mm(qwen2vl_dir, tmp_path / "x"))
    with pytest.raises(ConvertError, match=f"mm_dir {dangling}: is a symlink to {tmp_path}/nowhere, which does not"):
        run(plan, dangling)
    with pytest.raises(ConvertError, match=f"mm_dir {loop}: is a symlink loop; give a directory path"):
        prepare(_to_mm(qwen2vl_dir, loop))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dangling", "loop"]


def test_a_link_to_an_empty_directory_is_followed(qwen2vl_dir: Path, tmp_path: Path) -> None:
    """The link stays a link and the directory it names receives the checkpoint."""
    real = tmp_path / "big" / "ckpt"
    real.mkdir(parents=True)
    link = tmp_path / "ckpt"
    link.symlink_to(real)
    _convert(_to_mm(qwen2vl_dir, link))
    assert link.is_symlink() and link.resolve() == real
    assert sorted(p.name for p in real.iterdir()) == ["latest_checkpointed_iteration.txt", "release"]
    assert sorted(p.name for p in real.parent.iterdir()) == ["ckpt"]


def test_a_parent_that_is_a_file_is_one_line(qwen2vl_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConvertError, match=f"mm_dir {tmp_path}/f/out: {tmp_path}/f is a file, not a directory"):
        prepare(_to_mm(qwen2vl_dir, tmp_path / "f" / "out"))


# -- 6./7. the disk: space first, a full disk or a read-only target is one line ------------------------------


def test_a_plan_that_cannot_fit_is_refused_first(
    qwen2vl_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    _, plan = prepare(_to_mm(qwen2vl_dir, out))
    monkeypatch.setattr(target_mod, "free_bytes", lambda _p: 1000)
    with pytest.raises(ConvertError, match=f"mm_dir {out}: needs .* MB but its filesystem has 0.0 MB free; ") as e:
        run(plan, out)
    assert type(e.value) is ConvertError  # refused before writing: bad input, exit 2
    assert list(tmp_path.iterdir()) == []
    out.mkdir()
    (out / "old").write_text("x")
    with pytest.raises(ConvertError, match=r"\(the old checkpoint is kept until the new one is complete\)"):
        run(plan, out, overwrite=True)
    assert target_mod.space_warning(plan.nbytes, out) is not None
    monkeypatch.setattr(target_mod, "free_bytes", lambda _p: 1 << 40)
    assert target_mod.space_warning(plan.nbytes, out) is None


def test_a_disk_that_fills_during_the_run_is_one_line(
    qwen2vl_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    _, plan = prepare(_to_mm(qwen2vl_dir, out))
    real_write = os.write

    def full(fd: int, data) -> int:
        if len(data) > 4096:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(WriteError, match=r": no space left on the device \(the conversion needs .* MB, .* free\)$"):
        run(plan, out)
    assert list(tmp_path.iterdir()) == []


def test_a_real_full_disk(qwen2vl_dir: Path, small_fs: Path) -> None:
    """A 2 MB tmpfs: the plan fits at first, then another writer fills the disk."""
    out = small_fs / "out"
    _, plan = prepare(_to_mm(qwen2vl_dir, out))
    assert plan.nbytes < 1 << 20
    events = execute(plan, out)
    next(events)  # the claim is taken and space checked; now someone else fills the disk
    fill(small_fs)
    with pytest.raises(WriteError, match=r"no space left on the device \(the conversion needs"):
        for _ in events:
            pass
    events.close()
    assert sorted(p.name for p in small_fs.iterdir()) == ["hog"]


def test_a_read_only_target_is_one_line(qwen2vl_dir: Path, tmp_path: Path) -> None:
    mnt = tmp_path / "ro"
    if os.geteuid() != 0 or not mount_tmpfs(mnt, "size=1m", "ro"):
        pytest.skip("needs root and tmpfs mounts")
    try:
        _, plan = prepare(_to_mm(qwen2vl_dir, mnt / "out"))
        with pytest.raises(WriteError, match=f"mm_dir {mnt}/out: cannot write in {mnt} \\(Read-only file system\\)"):
            run(plan, mnt / "out")
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_a_directory_appearing_at_the_rename_is_not_replaced(
    qwen2vl_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The window between the last look and the rename: RENAME_NOREPLACE refuses, the newcomer stays."""
    out = tmp_path / "out"
    _, plan = prepare(_to_mm(qwen2vl_dir, out))
    real = target_mod.rename2

    def newcomer_first(src: Path, dst: Path, flags: int) -> bool:
        if flags == target_mod.RENAME_NOREPLACE and not dst.exists():
            dst.mkdir()
            (dst / "theirs.txt").write_text("not yours")
        return real(src, dst, flags)

    monkeypatch.setattr(target_mod, "rename2", newcomer_first)
    with pytest.raises(ConvertError, match=f"mm_dir {out}: appeared while converting; it was not replaced"):
        run(plan, out)
    assert _files(out) == {"theirs.txt": b"not yours"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
