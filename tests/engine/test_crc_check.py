"""Every rank-file record a conversion reads is checked against its CRC-32, once (issue 16 item 4).

A byte flipped inside a tensor's record used to go into the output with exit 0. Expected
CRCs here come from zlib over the bytes the zip module gives back, not from our reader.
"""

from __future__ import annotations

import os
import shutil
import zipfile
import zlib
from collections import Counter
from pathlib import Path

import pytest

import engine.formats.record_check as record_check
from engine.errors import ConvertError
from engine.formats.mm_source import read_rank_file
from engine.job import HfConfig, HfToMmConfig, Job, MmToHfConfig, ResplitConfig, prepare
from engine.layout import ParallelConfig
from engine.run.execute import run
from engine.run.out_file import fd_path
from engine.run.verify import compare, hf_side, mm_side
from engine.source.hf_source import TensorReader, inspect_hf
from tests.test_cli import _bad, mm_convert

TP2 = ParallelConfig(tp_size=2, llm_pp_layers=[[4]], vit_pp_layers=[[3]])
TP1 = ParallelConfig(tp_size=1, llm_pp_layers=[[4]], vit_pp_layers=[[3]])
QKV = "text_decoder.decoder.layers.0.self_attention.linear_qkv.weight"  # TP rows: copied whole rows
PROJ = "text_decoder.decoder.layers.0.self_attention.linear_proj.weight"  # TP cols: joined from mapped rows


@pytest.fixture(scope="module")
def mm_tp2(qwen2vl_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("crc") / "mm"
    cfg = HfToMmConfig(mm_dir=out, hf_config=HfConfig(hf_dir=qwen2vl_dir), parallel_config=TP2)
    run(prepare(Job(converter="Qwen2VLConverter", command="hf_to_mm", cfg=cfg))[1], out)
    return out


def _damage(mm: Path, rank: str, key: str, tmp_path: Path) -> tuple[Path, str, int, int]:
    """A copy of the checkpoint with one byte flipped inside `key`'s record: (rank file, record, crc before, after)."""
    copy = tmp_path / "mm"
    shutil.copytree(mm, copy)
    path = copy / "release" / rank / "model_optim_rng.pt"
    meta = read_rank_file(path)["model"][key]
    record = meta.record.name
    with zipfile.ZipFile(path) as z:
        good = zlib.crc32(z.read(record))
    data = bytearray(path.read_bytes())
    data[meta.begin + meta.nbytes // 2] ^= 0x40
    path.write_bytes(bytes(data))
    with zipfile.ZipFile(path) as z:
        start = meta.record.start
        bad = zlib.crc32(data[start : start + z.getinfo(record).file_size])
    return path, record, good, bad


def _check_message(msg: str, path: Path, record: str, good: int, bad: int) -> None:
    assert "\n" not in msg
    assert msg.startswith(f"{path}: record {record} is damaged"), msg
    assert f"CRC-32 {bad:08x}, the archive says {good:08x}" in msg, msg


@pytest.mark.parametrize("how", ["row_span", "read_rows_into", "mapped_rows", "read"])
def test_every_read_path_checks_the_record(mm_tp2: Path, tmp_path: Path, how: str) -> None:
    path, record, good, bad = _damage(mm_tp2, "mp_rank_01", PROJ, tmp_path)
    meta = read_rank_file(path)["model"][PROJ]
    reader = TensorReader()
    calls = {
        "row_span": lambda: reader.row_span(meta, 0, 1),
        "read_rows_into": lambda: reader.read_rows_into(meta, 0, 1, memoryview(bytearray(meta.nbytes // 64))),
        "mapped_rows": lambda: reader.mapped_rows(meta, 0, 1).__enter__(),
        "read": lambda: reader.read(meta),
    }
    try:
        with pytest.raises(ConvertError) as exc:
            calls[how]()
        _check_message(str(exc.value), path, record, good, bad)
        with pytest.raises(ConvertError):  # and again: a damaged record stays refused
            reader.row_span(meta, 1, 2)
    finally:
        reader.close()


@pytest.mark.parametrize(("rank", "key"), [("mp_rank_00", QKV), ("mp_rank_01", PROJ)])
def test_mm_to_hf_refuses_a_flipped_byte(qwen2vl_dir: Path, mm_tp2: Path, tmp_path: Path, rank: str, key: str) -> None:
    path, record, good, bad = _damage(mm_tp2, rank, key, tmp_path)
    back = tmp_path / "back"
    cfg = MmToHfConfig(save_hf_dir=back, mm_dir=tmp_path / "mm", hf_config=HfConfig(hf_dir=qwen2vl_dir),
                       parallel_config=TP2)  # fmt: skip
    _, plan = prepare(Job(converter="Qwen2VLConverter", command="mm_to_hf", cfg=cfg))
    with pytest.raises(ConvertError) as exc:
        run(plan, back)
    _check_message(str(exc.value), path, record, good, bad)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mm"]  # no target, no temporary sibling


def test_resplit_refuses_a_flipped_byte(qwen2vl_dir: Path, mm_tp2: Path, tmp_path: Path) -> None:
    path, record, good, bad = _damage(mm_tp2, "mp_rank_00", QKV, tmp_path)
    cfg = ResplitConfig(source_dir=tmp_path / "mm", target_dir=tmp_path / "tp1", hf_config=HfConfig(hf_dir=qwen2vl_dir),
                        source_parallel_config=TP2, target_parallel_config=TP1)  # fmt: skip
    _, plan = prepare(Job(converter="Qwen2VLConverter", command="resplit", cfg=cfg))
    with pytest.raises(ConvertError) as exc:
        run(plan, tmp_path / "tp1")
    _check_message(str(exc.value), path, record, good, bad)
    assert not (tmp_path / "tp1").exists()


def test_verify_refuses_a_flipped_byte(qwen2vl_dir: Path, mm_tp2: Path, tmp_path: Path) -> None:
    path, record, good, bad = _damage(mm_tp2, "mp_rank_01", PROJ, tmp_path)
    info = inspect_hf(qwen2vl_dir)
    with pytest.raises(ConvertError) as exc:
        list(compare(hf_side(info, "source"), mm_side(info, tmp_path / "mm", TP2, "output")))
    _check_message(str(exc.value), path, record, good, bad)


def test_a_damaged_data_pkl_is_refused_before_unpickling(mm_tp2: Path, tmp_path: Path) -> None:
    copy = tmp_path / "mm"
    shutil.copytree(mm_tp2, copy)
    path = copy / "release" / "mp_rank_00" / "model_optim_rng.pt"
    with zipfile.ZipFile(path) as z:
        info = z.getinfo("model_optim_rng/data.pkl")
        good = zlib.crc32(z.read(info.filename))
    data = bytearray(path.read_bytes())
    at = data.index(b"text_decoder.decoder.layers.0")  # a key inside the pickle
    data[at] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ConvertError) as exc:
        read_rank_file(path)
    msg = str(exc.value)
    assert msg.startswith(f"{path}: record model_optim_rng/data.pkl is damaged") and f"says {good:08x}" in msg, msg


def test_the_cli_says_one_line_and_writes_nothing(qwen2vl_dir: Path, mm_tp2: Path, tmp_path: Path) -> None:
    path, record, good, bad = _damage(mm_tp2, "mp_rank_01", PROJ, tmp_path)
    r = mm_convert(
        "Qwen2VLConverter", "mm_to_hf", "--cfg.save_hf_dir", str(tmp_path / "back"), "--cfg.mm_dir",
        str(tmp_path / "mm"), "--cfg.hf_config.hf_dir", str(qwen2vl_dir), "--cfg.parallel_config.tp_size", "2",
        "--cfg.parallel_config.llm_pp_layers", "[[4]]", "--cfg.parallel_config.vit_pp_layers", "[[3]]",
    )  # fmt: skip
    _bad(r, str(path), f"record {record} is damaged", f"CRC-32 {bad:08x}, the archive says {good:08x}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mm"]


def test_each_record_read_is_checked_once(
    qwen2vl_dir: Path, mm_tp2: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Several writer threads share the source records (gate/up and q/k/v of one rank record feed several
    outputs): each record is summed exactly once, and every record a piece reads is among them."""
    summed: Counter[tuple[str, int]] = Counter()
    real = record_check.crc_of

    def counting(fd: int, start: int, size: int) -> int:
        summed[(fd_path(fd), start)] += 1
        return real(fd, start, size)

    monkeypatch.setattr(record_check, "crc_of", counting)
    cfg = MmToHfConfig(save_hf_dir=tmp_path / "back", mm_dir=mm_tp2, hf_config=HfConfig(hf_dir=qwen2vl_dir),
                       parallel_config=TP2)  # fmt: skip
    _, plan = prepare(Job(converter="Qwen2VLConverter", command="mm_to_hf", cfg=cfg))
    read = {plan.sources[p.source].record for f in plan.files for e in f.entries for p in e.pieces}
    assert None not in read and len(read) > 50
    run(plan, tmp_path / "back")
    assert max(summed.values()) == 1
    assert {(os.path.realpath(r.file), r.start) for r in read} <= set(summed)
    assert (tmp_path / "back" / "model.safetensors").read_bytes() == (qwen2vl_dir / "model.safetensors").read_bytes()


def test_our_own_files_pass_the_check(mm_tp2: Path) -> None:
    """The writer's records (CRC in a data descriptor after the data) carry the CRC zlib computes."""
    for path in sorted(mm_tp2.glob("release/*/model_optim_rng.pt")):
        with zipfile.ZipFile(path) as z:
            assert z.testzip() is None
        reader = TensorReader()
        try:
            for meta in read_rank_file(path)["model"].values():
                reader.row_span(meta, 0, 0)
                assert meta.record.checked
        finally:
            reader.close()


def test_a_file_cut_short_after_planning_is_a_clear_error(mm_tp2: Path, tmp_path: Path) -> None:
    """The check reads with pread: a rank file truncated between planning and reading is one line, not SIGBUS."""
    copy = tmp_path / "mm"
    shutil.copytree(mm_tp2, copy)
    path = copy / "release" / "mp_rank_00" / "model_optim_rng.pt"
    meta = read_rank_file(path)["model"][QKV]
    os.truncate(path, meta.begin + 10)
    reader = TensorReader()
    try:
        with pytest.raises(ConvertError) as exc:
            reader.row_span(meta, 0, 1)
    finally:
        reader.close()
    assert str(exc.value).startswith(f"{os.path.realpath(path)}: unexpected end of file at byte {meta.begin + 10}")


def test_a_whole_record_copied_into_a_rank_file_is_checked_with_the_writers_sum(
    qwen2vl_dir: Path, mm_tp2: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A re-cut at the same TP copies each rank tensor whole; the torch zip writer sums those bytes for its own
    record, and that sum is the source record's check: the bytes are not read a second time, and a flipped
    byte is still refused."""
    path, record, good, bad = _damage(mm_tp2, "mp_rank_00", QKV, tmp_path)
    summed: list[int] = []
    real = record_check.crc_of
    monkeypatch.setattr(record_check, "crc_of", lambda fd, start, size: summed.append(start) or real(fd, start, size))
    same_tp = ParallelConfig(tp_size=2, llm_pp_layers=[[1, 3]], vit_pp_layers=[[3, 0]])
    cfg = ResplitConfig(source_dir=tmp_path / "mm", target_dir=tmp_path / "pp2", hf_config=HfConfig(hf_dir=qwen2vl_dir),
                        source_parallel_config=TP2, target_parallel_config=same_tp)  # fmt: skip
    _, plan = prepare(Job(converter="Qwen2VLConverter", command="resplit", cfg=cfg))
    with pytest.raises(ConvertError) as exc:
        run(plan, tmp_path / "pp2")
    _check_message(str(exc.value), path, record, good, bad)
    assert not (tmp_path / "pp2").exists()
    summed.clear()
    cfg = cfg.model_copy(update={"source_dir": mm_tp2, "target_dir": tmp_path / "good"})
    _, plan = prepare(Job(converter="Qwen2VLConverter", command="resplit", cfg=cfg))
    tensors = [m for m in plan.sources.values() if m.record is not None]
    run(plan, tmp_path / "good")
    assert all(m.record.checked for m in tensors if any(p.source == m.name for f in plan.files for e in f.entries
                                                         for p in e.pieces))  # fmt: skip
    assert len(summed) < len({m.record.start for m in tensors}) / 2  # most were confirmed by the copy's sum


def test_a_written_file_is_read_back_against_its_crcs(tmp_path: Path) -> None:
    """What a part of a split job checks before moving a file among the finished ones."""
    import torch

    path = tmp_path / "model_optim_rng.pt"
    torch.save({"model": {"w": torch.arange(64, dtype=torch.float32)}}, path)
    assert record_check.read_back_problem(path) is None
    with zipfile.ZipFile(path) as z:
        (info,) = [i for i in z.infolist() if i.filename.endswith("/data/0")]
    with open(path, "r+b") as fh:  # one byte of the tensor's record, found from the local header
        fh.seek(info.header_offset + 26)
        name_len, extra_len = (int.from_bytes(fh.read(2), "little") for _ in range(2))
        at = info.header_offset + 30 + name_len + extra_len + 9
        fh.seek(at)
        byte = fh.read(1)
        fh.seek(at)
        fh.write(bytes([byte[0] ^ 0x10]))
    problem = record_check.read_back_problem(path)
    assert problem is not None and problem.startswith(f"record {info.filename} reads back with CRC-32 ")
    assert problem.endswith(f"its directory says {info.CRC:08x}")
