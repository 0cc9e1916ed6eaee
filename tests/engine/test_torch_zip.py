"""The streaming writer's files are real torch checkpoints and valid zips, zip64 included."""

from __future__ import annotations

import os
import struct
import zipfile
from pathlib import Path

import pytest
import torch

import engine.formats.torch_zip as tz
from engine.formats.torch_zip import StreamingCheckpointWriter


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "bf16": torch.randn(5, 7, generator=g).to(torch.bfloat16),
        "f32": torch.randn(3, generator=g),
        "f16": torch.randn(2, 3, 4, generator=g).half(),
        "i64": torch.arange(11),
        "i8": torch.arange(-3, 3, dtype=torch.int8),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.empty(0, 4),
    }


def _write(path: Path, tensors: dict[str, torch.Tensor], chunks: int = 2) -> None:
    with StreamingCheckpointWriter(path, archive_name=path.stem) as w:
        obj: dict[str, object] = {}
        for c in range(chunks):
            obj[f"model{c}"] = {k: w.add_tensor(t) for k, t in tensors.items()}
        obj["checkpoint_version"] = 3.0
        w.finish(obj)


def _assert_same(loaded: dict, tensors: dict[str, torch.Tensor], chunks: int = 2) -> None:
    assert set(loaded) == {*(f"model{c}" for c in range(chunks)), "checkpoint_version"}
    assert loaded["checkpoint_version"] == 3.0
    for c in range(chunks):
        got = loaded[f"model{c}"]
        assert list(got) == list(tensors)
        for k, t in tensors.items():
            assert got[k].dtype == t.dtype and torch.equal(got[k], t), k


def _data_offsets(path: Path) -> list[tuple[str, int]]:
    """(record name, offset of its first data byte) from the local headers."""
    out = []
    with zipfile.ZipFile(path) as z, open(path, "rb") as f:
        for info in z.infolist():
            f.seek(info.header_offset)
            head = f.read(30)
            name_len, extra_len = struct.unpack("<HH", head[26:30])
            out.append((info.filename, info.header_offset + 30 + name_len + extra_len))
    return out


def test_loads_with_weights_only_and_mmap(tmp_path: Path) -> None:
    path = tmp_path / "model_optim_rng.pt"
    tensors = _tensors()
    _write(path, tensors)
    _assert_same(torch.load(path, weights_only=True), tensors)
    _assert_same(torch.load(path, weights_only=True, mmap=True), tensors)


def test_valid_zip_with_torch_record_names_and_aligned_data(tmp_path: Path) -> None:
    ours, theirs = tmp_path / "ours.pt", tmp_path / "theirs.pt"
    tensors = _tensors()
    _write(ours, tensors)
    torch.save({"model0": tensors, "model1": dict(tensors), "checkpoint_version": 3.0}, theirs)
    with zipfile.ZipFile(ours) as z:
        assert z.testzip() is None  # every CRC matches
        names = set(z.namelist())
    with zipfile.ZipFile(theirs) as z:
        # torch.save stores each storage once; we write each tensor's own record, so
        # our data records are a superset of numbered keys; the metadata records match
        torch_meta = {n.removeprefix("theirs/") for n in z.namelist() if "/data/" not in n}
    assert {n.removeprefix("ours/") for n in names if "/data/" not in n} == torch_meta
    for name, offset in _data_offsets(ours):
        if "/data/" in name:
            assert offset % 64 == 0, (name, offset)


def test_zip64_sizes_and_offsets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past the 4 GiB mark every size and offset moves to zip64 fields; lower the mark to test it."""
    monkeypatch.setattr(tz, "ZIP32_LIMIT", 100)
    path = tmp_path / "big.pt"
    tensors = _tensors()
    _write(path, tensors)
    with zipfile.ZipFile(path) as z:
        assert z.testzip() is None
        assert any(i.file_size >= 100 for i in z.infolist())
    with open(path, "rb") as f:
        tail = f.read()[-200:]
    assert struct.pack("<I", 0x06064B50) in tail  # zip64 end of central directory record
    _assert_same(torch.load(path, weights_only=True), tensors)
    for name, offset in _data_offsets(path):
        if "/data/" in name:
            assert offset % 64 == 0, (name, offset)


def test_spans_equal_bytes(tmp_path: Path) -> None:
    """Bytes copied from ranges of another file give the same tensor as bytes in memory."""
    t = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    raw = t.numpy().tobytes()
    src = tmp_path / "src.bin"
    src.write_bytes(b"x" * 13 + raw)
    path = tmp_path / "spans.pt"
    fd = os.open(src, os.O_RDONLY)
    try:
        with StreamingCheckpointWriter(path, archive_name="spans") as w:
            row = 6 * 4
            spans = [(fd, 13, 2 * row), (fd, 13 + 2 * row, 2 * row)]
            obj = {"a": w.add_spans(spans, "float32", (4, 6)), "b": w.add_bytes(raw, torch.float32, (4, 6))}
            obj["c"] = w.add_chunks([raw[:5], raw[5:40], b"", raw[40:]], len(raw), "float32", (4, 6))
            w.finish(obj)
    finally:
        os.close(fd)
    loaded = torch.load(path, weights_only=True)
    assert torch.equal(loaded["a"], t) and torch.equal(loaded["b"], t) and torch.equal(loaded["c"], t)
    with zipfile.ZipFile(path) as z:
        assert z.testzip() is None  # every record's CRC, chunked or copied, is right


def test_wrong_byte_count_is_a_bug(tmp_path: Path) -> None:
    with StreamingCheckpointWriter(tmp_path / "x.pt") as w, pytest.raises(ValueError, match="not a float32 tensor"):
        w.add_bytes(b"\0" * 10, "float32", (3,))
    with StreamingCheckpointWriter(tmp_path / "y.pt") as w, pytest.raises(ValueError, match="8 bytes were given"):
        w.add_chunks([b"\0" * 8], 12, "float32", (3,))


def test_span_crc_mapped_and_read_agree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Spans crossing page and window boundaries give zlib's CRC both ways."""
    import mmap
    import zlib

    monkeypatch.setattr(tz, "_CHUNK", 3 * mmap.ALLOCATIONGRANULARITY)
    monkeypatch.setattr(tz, "_CRC_CHUNK", 1000)
    data = os.urandom(10 * mmap.ALLOCATIONGRANULARITY + 123)
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    fd = os.open(src, os.O_RDONLY)
    try:
        spans = [(fd, 5, 7 * mmap.ALLOCATIONGRANULARITY), (fd, 17, 3), (fd, len(data) - 999, 999)]
        want = zlib.crc32(b"".join(data[o : o + n] for _, o, n in spans))
        assert tz._crc_spans_mapped(spans) == tz._crc_spans_read(spans) == want
    finally:
        os.close(fd)
