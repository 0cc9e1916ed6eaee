"""Hugging Face `.bin` weights (torch.save'd state dicts) are read like safetensors, and never run.

The `.bin` files are written here by torch.save itself, single and sharded as transformers
names them; the same weights in safetensors are the reference: every output must be the
same bytes (or, where the file names differ, the same tensors).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine.errors import ConvertError
from engine.job import HfConfig, HfToDcpConfig, HfToMmConfig, LoraConfig, MergeLoraConfig, MmToHfConfig
from engine.layout import ParallelConfig
from engine.run.verify import compare, identical, open_side
from engine.source.hf_source import inspect_hf
from tests.engine.test_llm_families import _convert
from tests.fixtures.tiny_lora import build_peft_adapter

PC = ParallelConfig(tp_size=2, llm_pp_layers=[[1, 3]])


def _state(hf: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(hf.glob("*.safetensors")) for k, v in load_file(f).items()}


def _as_bin(hf: Path, out: Path, shards: int) -> Path:
    """The same model with its weights as pytorch_model*.bin (torch.save, zip format)."""
    out.mkdir()
    for p in hf.iterdir():
        if not p.name.endswith((".safetensors", ".safetensors.index.json")):
            shutil.copy(p, out / p.name)
    state = _state(hf)
    keys = list(state)
    if shards == 1:
        torch.save(state, out / "pytorch_model.bin")
        return out
    parts = [keys[i::shards] for i in range(shards)]
    weight_map = {}
    for i, part in enumerate(parts):
        name = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        torch.save({k: state[k] for k in part}, out / name)
        weight_map |= dict.fromkeys(part, name)
    (out / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return out


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("shards", [1, 2])
def test_bin_converts_to_the_same_bytes_as_safetensors(tiny_llms: dict[str, Path], tmp_path: Path, shards: int):
    hf = tiny_llms["llama"]
    binary = _as_bin(hf, tmp_path / "bin", shards)
    a = _convert(hf, "hf_to_mm", HfToMmConfig(mm_dir=tmp_path / "a", hf_config=HfConfig(hf_dir=hf), parallel_config=PC))
    b = _convert(binary, "hf_to_mm", HfToMmConfig(mm_dir=tmp_path / "b", hf_config=HfConfig(hf_dir=binary),
                                                  parallel_config=PC))  # fmt: skip
    assert _files(a) == _files(b)
    # the way back writes safetensors, named as transformers names them, with the original tensors
    back = _convert(binary, "mm_to_hf", MmToHfConfig(save_hf_dir=tmp_path / "back", mm_dir=b,
                                                     hf_config=HfConfig(hf_dir=binary)))  # fmt: skip
    names = sorted(p.name for p in back.glob("*.safetensors"))
    assert names == (["model.safetensors"] if shards == 1 else
                     ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"])  # fmt: skip
    assert not list(back.glob("*.bin")) and not (back / "pytorch_model.bin.index.json").exists()
    if shards > 1:
        index = json.loads((back / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == set(_state(hf))
    got, want = _state(back), _state(hf)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    # verify sees the .bin directory as the same model
    info = inspect_hf(binary)
    assert identical(list(compare(open_side(binary, info, None, "A"), open_side(hf, info, None, "B"))))


def test_dcp_and_merge_from_bin(tiny_llms: dict[str, Path], tmp_path: Path) -> None:
    hf = tiny_llms["llama"]
    binary = _as_bin(hf, tmp_path / "bin", 2)
    a = _convert(hf, "hf_to_dcp", HfToDcpConfig(dcp_dir=tmp_path / "a", hf_config=HfConfig(hf_dir=hf)))
    b = _convert(binary, "hf_to_dcp", HfToDcpConfig(dcp_dir=tmp_path / "b", hf_config=HfConfig(hf_dir=binary)))
    assert _files(a) == _files(b)
    adapter = tmp_path / "adapter"
    build_peft_adapter(hf, adapter)
    m1 = _convert(hf, "merge_lora", MergeLoraConfig(save_hf_dir=tmp_path / "m1", hf_config=HfConfig(hf_dir=hf),
                                                    lora=LoraConfig(adapter_dir=adapter)))  # fmt: skip
    m2 = _convert(binary, "merge_lora", MergeLoraConfig(save_hf_dir=tmp_path / "m2",
                                                        hf_config=HfConfig(hf_dir=binary),
                                                        lora=LoraConfig(adapter_dir=adapter)))  # fmt: skip
    x, y = _state(m1), _state(m2)
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_that_would_run_a_command_is_refused_and_runs_nothing(tiny_llms: dict[str, Path], tmp_path: Path):
    hf = tiny_llms["llama"]
    binary = _as_bin(hf, tmp_path / "bin", 1)
    marker = tmp_path / "pwned"
    state = torch.load(binary / "pytorch_model.bin", weights_only=True)
    torch.save({**state, "evil": _Payload(marker)}, binary / "pytorch_model.bin")
    with pytest.raises(ConvertError, match=r"pytorch_model.bin: refusing to unpickle (posix|os)\.system"):
        inspect_hf(binary)
    assert not marker.exists()


def test_the_legacy_format_and_a_damaged_record_are_one_line(tiny_llms: dict[str, Path], tmp_path: Path) -> None:
    hf = tiny_llms["llama"]
    legacy = _as_bin(hf, tmp_path / "legacy", 1)
    torch.save(_state(hf), legacy / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    with pytest.raises(ConvertError, match=r"pytorch_model.bin: the legacy \(pre-zip\) torch.save format"):
        inspect_hf(legacy)
    damaged = _as_bin(hf, tmp_path / "damaged", 1)
    path = damaged / "pytorch_model.bin"
    meta = inspect_hf(damaged).tensors["model.layers.0.mlp.down_proj.weight"]
    raw = bytearray(path.read_bytes())
    raw[meta.begin + 5] ^= 0x40
    path.write_bytes(bytes(raw))
    with pytest.raises(ConvertError, match="is damaged"):
        _convert(damaged, "hf_to_mm", HfToMmConfig(mm_dir=tmp_path / "out", hf_config=HfConfig(hf_dir=damaged),
                                                   parallel_config=PC))  # fmt: skip
    assert not (tmp_path / "out").exists()
