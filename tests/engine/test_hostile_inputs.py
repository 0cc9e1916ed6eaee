"""Hostile inputs (issue 16 items 4-6): each is built here, fails first today, and must give one line.

Safetensors headers are also handed to the safetensors library itself: what it refuses,
we refuse (and duplicate keys too, which it lets through, last one winning).
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import os
import pickle
import shutil
import struct
import threading
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from engine.errors import ConvertError
from engine.formats.mm_source import open_checkpoint, read_rank_file
from engine.formats.safetensors_header import MAX_TENSORS, read_header, read_metadata
from engine.job import HfConfig, HfToMmConfig, Job, MmToHfConfig, prepare
from engine.layout import ParallelConfig
from engine.source.hf_source import inspect_hf

# ---------------------------------------------------------------------------------------
# helpers


def _one_line(exc: pytest.ExceptionInfo[ConvertError], *needles: str) -> str:
    msg = str(exc.value)
    assert "\n" not in msg, msg
    for n in needles:
        assert n in msg, msg
    return msg


def _within(seconds: float, fn: Callable[[], object]) -> BaseException | None:
    """Run fn on a daemon thread; fail (instead of hanging the suite) if it blocks; return what it raised."""
    out: list[BaseException | None] = []

    def run() -> None:
        try:
            fn()
            out.append(None)
        except BaseException as e:  # handed back to the test
            out.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert out, f"still blocked after {seconds} s"
    return out[0]


def _raw_safetensors(path: Path, header: bytes | dict, data: bytes) -> Path:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


def _linked_copy(src: Path, dst: Path) -> Path:
    """A model directory of links to `src`'s files (links to regular files are read)."""
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).symlink_to(p)
    return dst


def _with_config(src: Path, dst: Path, edit: Callable[[dict], None]) -> Path:
    _linked_copy(src, dst)
    cfg = json.loads((src / "config.json").read_text())
    edit(cfg)
    (dst / "config.json").unlink()
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


# ---------------------------------------------------------------------------------------
# safetensors headers

A = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}
B = {"dtype": "F32", "shape": [4], "data_offsets": [16, 32]}


def _entry(base: dict, **kw: object) -> dict:
    return {**base, **kw}


HEADERS = {
    # name: (header, data bytes, what the one line must say)
    "shifted": ({"a": _entry(A, data_offsets=[4, 20]), "b": _entry(B, data_offsets=[20, 36])}, 32,
                ["tensor 'a' data_offsets [4, 20] leaves bytes 0..4 at the start of the data to no tensor"]),
    "shifted_into_header": ({"a": _entry(A, data_offsets=[-8, 8]), "b": B}, 32,
                            ["tensor 'a' has data_offsets [-8, 8]", "0 <= begin <= end"]),
    "overlap": ({"a": A, "b": _entry(B, data_offsets=[8, 24])}, 24,
                ["tensor 'b' data_offsets [8, 24] overlaps the bytes 8..16 of tensor 'a'"]),
    "float_dim": ({"a": _entry(A, shape=[256.7]), "b": B}, 32, ["tensor 'a' has shape [256.7]; dims are whole"]),
    "float_whole_dim": ({"a": _entry(A, shape=[2.0, 2]), "b": B}, 32, ["tensor 'a' has shape [2.0, 2]"]),
    "negative_dims": ({"a": _entry(A, shape=[-1, -64]), "b": B}, 32, ["tensor 'a' has shape [-1, -64]"]),
    "bool_dim": ({"a": _entry(A, shape=[True, 4]), "b": B}, 32, ["tensor 'a' has shape [True, 4]"]),
    "string_dim": ({"a": _entry(A, shape=["2", 2]), "b": B}, 32, ["tensor 'a' has shape ['2', 2]"]),
    "float_offsets": ({"a": _entry(A, data_offsets=[-1e7, 16]), "b": B}, 32,
                      ["tensor 'a' has data_offsets [-10000000.0, 16]"]),
    "three_offsets": ({"a": _entry(A, data_offsets=[0, 8, 16]), "b": B}, 32, ["has data_offsets [0, 8, 16]"]),
    "bytes_not_shape": ({"a": _entry(A, data_offsets=[0, 12]), "b": _entry(B, data_offsets=[12, 28])}, 28,
                        ["tensor 'a' is F32 [2, 2], 16 bytes, but its data_offsets [0, 12] hold 12"]),
    "trailing_bytes": ({"a": A, "b": B}, 40, ["8 bytes after the last tensor belong to no tensor"]),
    "past_the_end": ({"a": A, "b": B}, 24, ["tensor 'b' ends at data byte 32 but the file holds 24 bytes"]),
    "entry_not_object": ({"a": [1, 2], "b": B}, 32, ["header entry for tensor 'a' is [1, 2]; expected an object"]),
    "no_offsets": ({"a": {"dtype": "F32", "shape": [2, 2]}, "b": B}, 32, ["expected an object with dtype, shape"]),
    "metadata_not_strings": ({"__metadata__": {"format": 1}, "a": A, "b": B}, 32,
                             ["__metadata__ is {'format': 1}; expected an object of strings to strings"]),
    "duplicate_key": (b'{"a":' + json.dumps(A).encode() + b',"b":' + json.dumps(B).encode() + b',"a":'
                      + json.dumps(_entry(A, data_offsets=[16, 32])).encode() + b"}", 32,
                      ["safetensors header has the key 'a' twice"]),
    "deeply_nested": (b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}", 0, ["nests brackets too deeply"]),
    "not_utf8": (b'{"\xff":1}', 0, ["safetensors header is not UTF-8 text"]),
    "not_an_object": (b"[1, 2]", 0, ["safetensors header is not a JSON object"]),
}  # fmt: skip


@pytest.mark.parametrize("case", list(HEADERS))
def test_hostile_safetensors_header_is_one_line(tmp_path: Path, case: str) -> None:
    header, nbytes, needles = HEADERS[case]
    path = _raw_safetensors(tmp_path / "model.safetensors", header, bytes(range(256))[:nbytes].ljust(nbytes, b"\0"))
    with pytest.raises(ConvertError) as exc:
        read_header(path)
    _one_line(exc, str(path), *needles)
    if case != "duplicate_key":  # the library keeps the last of two equal keys; everything else it refuses too
        with pytest.raises(Exception), safe_open(str(path), "pt") as f:  # noqa: B017
            f.keys()


def test_a_valid_header_in_any_order_with_empty_tensors_is_read(tmp_path: Path) -> None:
    """The offsets, not the JSON order, give the data order; zero-size tensors sit anywhere."""
    empty = {"dtype": "BF16", "shape": [0, 3], "data_offsets": [16, 16]}
    header = {"b": B, "__metadata__": {"format": "pt"}, "e": empty, "a": A}
    data = bytes(range(32))
    path = _raw_safetensors(tmp_path / "x.safetensors", header, data)
    metas = read_header(path)
    assert read_metadata(path) == {"format": "pt"}
    start = 8 + len(json.dumps(header).encode())
    assert {k: (m.dtype, m.shape, m.begin, m.nbytes) for k, m in metas.items()} == {
        "a": ("float32", (2, 2), start, 16),
        "b": ("float32", (4,), start + 16, 16),
        "e": ("bfloat16", (0, 3), start + 16, 0),
    }
    with safe_open(str(path), "pt") as f:  # the library agrees it is a valid file
        assert sorted(f.keys()) == ["a", "b", "e"]


def test_header_over_the_limit_says_so(tmp_path: Path) -> None:
    path = tmp_path / "big.safetensors"
    path.write_bytes(struct.pack("<Q", 150_000_000) + b"{}")
    with pytest.raises(ConvertError) as exc:
        read_header(path)
    msg = _one_line(exc, "header of 150000000 bytes is larger than the 100 MB limit")
    assert "truncated" not in msg


def test_a_95_mb_header_of_junk_entries_is_refused_before_parsing(tmp_path: Path) -> None:
    """1.6 M zero-size entries: each valid alone; counted (not parsed) and refused."""
    n = 1_600_000
    body = b",".join(b'"j%07d":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}' % i for i in range(n))
    path = _raw_safetensors(tmp_path / "junk.safetensors", b"{" + body + b"}", b"")
    assert path.stat().st_size > 95_000_000
    del body
    with pytest.raises(ConvertError) as exc:
        read_header(path)
    _one_line(exc, str(path), f"a file may name at most {MAX_TENSORS} tensors")


# ---------------------------------------------------------------------------------------
# config.json and the index


@pytest.mark.parametrize(
    ("value", "shown"), [("four", "'four'"), ([4], "[4]"), (4.5, "4.5"), ("4", "'4'"), (True, "True"), (0, "0")]
)
def test_layer_count_must_be_a_whole_number(qwen2vl_dir: Path, tmp_path: Path, value: object, shown: str) -> None:
    hf = _with_config(qwen2vl_dir, tmp_path / "hf", lambda c: c.__setitem__("num_hidden_layers", value))
    with pytest.raises(ConvertError) as exc:
        inspect_hf(hf)
    _one_line(exc, f"{hf}/config.json", f"num_hidden_layers = {shown}; expected a whole number > 0")


def test_zero_heads_and_a_string_flag(qwen2vl_dir: Path, tmp_path: Path) -> None:
    hf = _with_config(qwen2vl_dir, tmp_path / "a", lambda c: c.__setitem__("num_attention_heads", 0))
    with pytest.raises(ConvertError) as exc:
        inspect_hf(hf)
    _one_line(exc, "num_attention_heads = 0; expected a whole number > 0")
    hf = _with_config(qwen2vl_dir, tmp_path / "b", lambda c: c.__setitem__("tie_word_embeddings", "yes"))
    with pytest.raises(ConvertError) as exc:
        inspect_hf(hf)
    _one_line(exc, "tie_word_embeddings = 'yes'; expected true or false")
    hf = _with_config(qwen2vl_dir, tmp_path / "c", lambda c: c["vision_config"].__setitem__("num_heads", -4))
    with pytest.raises(ConvertError) as exc:
        inspect_hf(hf)
    _one_line(exc, "vision_config.num_heads = -4; expected a whole number > 0")


def test_deeply_nested_or_duplicated_config(qwen2vl_dir: Path, tmp_path: Path) -> None:
    hf = _linked_copy(qwen2vl_dir, tmp_path / "deep")
    (hf / "config.json").unlink()
    (hf / "config.json").write_text('{"model_type": "qwen2_vl", "x": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(ConvertError) as exc:
        inspect_hf(hf)
    _one_line(exc, f"{hf}/config.json: config.json nests brackets too deeply")
    text = (qwen2vl_dir / "config.json").read_text()
    (hf / "config.json").unlink()
    (hf / "config.json").write_text(text.replace("{", '{"vocab_size": 7, ', 1))  # vocab_size twice
    with pytest.raises(ConvertError) as exc:
        inspect_hf(hf)
    _one_line(exc, "config.json has the key 'vocab_size' twice")


@pytest.mark.parametrize(
    ("weight_map", "needle"),
    [
        ({"model.norm.weight": 3}, "weight_map['model.norm.weight'] = 3; expected the name of a .safetensors file"),
        ({"model.norm.weight": "../other/x.safetensors"}, "weight_map['model.norm.weight'] = '../other/x"),
        ({"model.norm.weight": None}, "weight_map['model.norm.weight'] = None"),
        ([1, 2], "not a valid index (expected a JSON object with a weight_map object)"),
    ],
)
def test_bad_index_values(tiny_dirs: dict[str, Path], tmp_path: Path, weight_map: object, needle: str) -> None:
    src = tiny_dirs["qwen2_vl_tied"]  # sharded
    hf = _linked_copy(src, tmp_path / "hf")
    index = json.loads((src / "model.safetensors.index.json").read_text())
    index["weight_map"] = {**index["weight_map"], **weight_map} if isinstance(weight_map, dict) else weight_map
    (hf / "model.safetensors.index.json").unlink()
    (hf / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ConvertError) as exc:
        inspect_hf(hf)
    _one_line(exc, "model.safetensors.index.json", needle)


# ---------------------------------------------------------------------------------------
# shapes against config.json


def _rewrite(src: Path, dst: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> Path:
    """A copy of a single-file model with some tensors changed (config.json unchanged)."""
    shutil.copytree(src, dst)
    state = load_file(dst / "model.safetensors")
    edit(state)
    save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def _plan(hf: Path) -> None:
    pc = ParallelConfig(tp_size=1, llm_pp_layers=[[4]], vit_pp_layers=[[3]])
    job = Job(
        converter="Qwen2VLConverter",
        command="hf_to_mm",
        cfg=HfToMmConfig(mm_dir=hf.parent / "out", hf_config=HfConfig(hf_dir=hf), parallel_config=pc),
    )
    prepare(job)


def _reshaped(key: str, shape: tuple[int, ...]) -> Callable[[dict[str, torch.Tensor]], None]:
    def edit(state: dict[str, torch.Tensor]) -> None:
        state[key] = state[key].reshape(shape).contiguous()

    return edit


@pytest.mark.parametrize(
    ("key", "shape", "needle"),
    [
        # the case: the bytes of a [128, 64] embedding, shaped [256, 32]
        ("model.embed_tokens.weight", (256, 32), "model.embed_tokens.weight has shape [256, 32], but config.json "
         "says vocab_size = 128 and hidden_size = 64, so it must be [128, 64]"),
        ("lm_head.weight", (64, 128), "lm_head.weight has shape [64, 128], but config.json says vocab_size = 128 "
         "and hidden_size = 64, so it must be [128, 64]"),
        ("model.layers.2.mlp.down_proj.weight", (128, 64),
         "model.layers.2.mlp.down_proj.weight has shape [128, 64], but config.json says hidden_size = 64, so it "
         "must be [64, *]"),
        ("model.layers.1.mlp.gate_proj.weight", (64, 128),
         "model.layers.1.mlp.gate_proj.weight has shape [64, 128], but config.json says hidden_size = 64"),
        ("model.layers.0.self_attn.k_proj.weight", (64, 32),
         "model.layers.0.self_attn.k_proj.weight has shape [64, 32], but config.json says hidden_size = 64, so "
         "it must be [*, 64]"),
    ],
)  # fmt: skip
def test_shapes_against_config(qwen2vl_dir: Path, tmp_path: Path, key: str, shape: tuple[int, ...], needle: str):
    hf = _rewrite(qwen2vl_dir, tmp_path / "hf", _reshaped(key, shape))
    with pytest.raises(ConvertError) as exc:
        _plan(hf)
    _one_line(exc, str(hf / "model.safetensors"), needle)


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (_reshaped("visual.blocks.1.mlp.fc1.weight", (32, 64)),
         "visual.blocks.1.mlp.fc1.weight has shape [32, 64], but config.json says vision_config.embed_dim = 32, so "
         "it must be [*, 32]"),
        (_reshaped("visual.blocks.2.attn.proj.weight", (16, 64)),
         "visual.blocks.2.attn.proj.weight has shape [16, 64], but config.json says vision_config.embed_dim = 32, "
         "so it must be [32, *]"),
        (lambda s: s.__setitem__("model.layers.0.self_attn.k_proj.weight",
                                 s["model.layers.0.self_attn.k_proj.weight"][:16].contiguous()),
         "model.layers.0.self_attn.k_proj.weight has shape [16, 64], but config.json says num_key_value_heads = 2 "
         "and q's head size is 16 (64 rows / num_attention_heads = 4), so it must be [32, *]"),
        (lambda s: s.__setitem__("model.layers.0.self_attn.q_proj.weight",
                                 s["model.layers.0.self_attn.q_proj.weight"][:62].contiguous()),
         "model.layers.0.self_attn.q_proj.weight has shape [62, 64], but config.json says num_attention_heads = 4, "
         "so it must be whole heads: a multiple of 4 rows"),
    ],
)  # fmt: skip
def test_vision_widths_and_heads_against_config(qwen2vl_dir: Path, tmp_path: Path, edit, needle: str) -> None:
    hf = _rewrite(qwen2vl_dir, tmp_path / "hf", edit)
    with pytest.raises(ConvertError) as exc:
        _plan(hf)
    _one_line(exc, str(hf / "model.safetensors"), needle)


def test_gate_rows_against_intermediate_size(qwen2vl_dir: Path, tmp_path: Path) -> None:
    def halve(state: dict[str, torch.Tensor]) -> None:
        for k in ("model.layers.3.mlp.gate_proj.weight", "model.layers.3.mlp.up_proj.weight"):
            state[k] = state[k][:64].contiguous()

    hf = _rewrite(qwen2vl_dir, tmp_path / "hf", halve)
    with pytest.raises(ConvertError) as exc:
        _plan(hf)
    _one_line(exc, "model.layers.3.mlp.gate_proj.weight has shape [64, 64], but config.json says "
              "intermediate_size = 128, so it must be [128, *]")  # fmt: skip


def test_expert_rows_against_moe_intermediate_size(tiny_llms: dict[str, Path], tmp_path: Path) -> None:
    src = tiny_llms["qwen3_moe"]

    def cut(state: dict[str, torch.Tensor]) -> None:
        for k in ("model.layers.0.mlp.experts.2.gate_proj.weight", "model.layers.0.mlp.experts.2.up_proj.weight"):
            state[k] = state[k][:24].contiguous()

    hf = _rewrite(src, tmp_path / "hf", cut)
    job = Job(
        converter="Qwen3MoeConverter",
        command="hf_to_mm",
        cfg=HfToMmConfig(
            mm_dir=tmp_path / "out", hf_config=HfConfig(hf_dir=hf), parallel_config=ParallelConfig(llm_pp_layers=[[4]])
        ),
    )
    with pytest.raises(ConvertError) as exc:
        prepare(job)
    _one_line(exc, "model.layers.0.mlp.experts.2.gate_proj.weight has shape [24, 64], but config.json says "
              "moe_intermediate_size = 48, so it must be [48, *]")  # fmt: skip


# ---------------------------------------------------------------------------------------
# only regular files are opened


def _fifo(path: Path) -> None:
    path.unlink(missing_ok=True)
    os.mkfifo(path)


def _dev_zero(path: Path) -> None:
    path.unlink(missing_ok=True)
    path.symlink_to("/dev/zero")


@pytest.mark.parametrize(("make", "kind"), [(_fifo, "is a FIFO (named pipe)"), (_dev_zero, "is a character device")])
@pytest.mark.parametrize("which", ["config.json", "model.safetensors", "index"])
def test_hf_inputs_must_be_regular_files(
    tiny_dirs: dict[str, Path], tmp_path: Path, make: Callable[[Path], None], kind: str, which: str
) -> None:
    src = tiny_dirs["qwen2_vl_tied" if which == "index" else "qwen2_vl"]
    hf = _linked_copy(src, tmp_path / "hf")
    target = hf / ("model.safetensors.index.json" if which == "index" else which)
    make(target)
    err = _within(30, lambda: inspect_hf(hf))
    assert isinstance(err, ConvertError), err
    assert str(err) == f"{target}: {kind}; only regular files are read (a link must lead to one)"


@pytest.fixture(scope="module")
def mm_tp1(qwen2vl_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("mm") / "mm"
    pc = ParallelConfig(tp_size=1, llm_pp_layers=[[4]], vit_pp_layers=[[3]])
    job = Job(converter="Qwen2VLConverter", command="hf_to_mm",
              cfg=HfToMmConfig(mm_dir=out, hf_config=HfConfig(hf_dir=qwen2vl_dir), parallel_config=pc))  # fmt: skip
    from engine.run.execute import run

    run(prepare(job)[1], out)
    return out


@pytest.mark.parametrize(("make", "kind"), [(_fifo, "is a FIFO (named pipe)"), (_dev_zero, "is a character device")])
def test_rank_file_and_tracker_must_be_regular(
    mm_tp1: Path, tmp_path: Path, make: Callable[[Path], None], kind: str
) -> None:
    mm = tmp_path / "mm"
    shutil.copytree(mm_tp1, mm)
    rank = mm / "release" / "mp_rank_00" / "model_optim_rng.pt"
    make(rank)
    err = _within(30, lambda: read_rank_file(rank))
    assert isinstance(err, ConvertError) and str(err).startswith(f"{rank}: {kind}"), err
    tracker = mm / "latest_checkpointed_iteration.txt"
    make(tracker)
    err = _within(30, lambda: open_checkpoint(mm))
    assert isinstance(err, ConvertError) and str(err).startswith(f"{tracker}: {kind}"), err


# ---------------------------------------------------------------------------------------
# rank files: every number of the pickle is checked


class _Storage:
    def __init__(self, key: str, cls: object, numel: int) -> None:
        self.key, self.cls, self.numel = key, cls, numel


class _Tensor:
    """Pickles as torch does (`_rebuild_tensor_v2(storage, offset, shape, stride, ...)`), with any values."""

    def __init__(self, storage: _Storage, offset: object, shape: object, stride: object) -> None:
        self.args = (storage, offset, shape, stride, False, collections.OrderedDict())

    def __reduce__(self):
        return (torch._utils._rebuild_tensor_v2, self.args)


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj: object) -> object:
        if isinstance(obj, _Storage):
            return ("storage", obj.cls, obj.key, "cpu", obj.numel)
        return None


def _rank_file(path: Path, obj: object, records: dict[str, bytes]) -> Path:
    """A torch-format zip: data.pkl pickling `obj`, and the given storage records."""
    buf = io.BytesIO()
    _Pickler(buf, protocol=2).dump(obj)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", buf.getvalue())
        z.writestr("archive/byteorder", "little")
        for key, data in records.items():
            z.writestr(f"archive/data/{key}", data)
        z.writestr("archive/version", "3\n")
    return path


S0 = _Storage("0", torch.FloatStorage, 6)
RECORDS = {"0": bytes(24)}

RANK_FILES = {
    # name: (model entry, what the one line must say)
    "string_offset": ({"w": _Tensor(S0, "0", (2, 3), (3, 1))}, "[model] w has storage offset '0'; expected a whole"),
    "negative_offset": ({"w": _Tensor(S0, -3, (2, 3), (3, 1))}, "[model] w has storage offset -3"),
    "stride_too_short": ({"w": _Tensor(S0, 0, (2, 3), (1,))}, "[model] w has stride (1,) for shape [2, 3]; expected "
                         "one whole number >= 0 per dim"),
    "string_shape": ({"w": _Tensor(S0, 0, "23", (3, 1))}, "[model] w has shape '23'; expected a list of whole"),
    "negative_dim": ({"w": _Tensor(S0, 0, (-2, 3), (3, 1))}, "[model] w has shape (-2, 3)"),
    "unknown_storage": ({"w": _Tensor(_Storage("0", torch.ComplexFloatStorage, 3), 0, (2, 3), (3, 1))},
                        "storage '0' is a torch.ComplexFloatStorage; supported storage types: DoubleStorage, "
                        "FloatStorage"),
    "integer_key": ({3: _Tensor(S0, 0, (2, 3), (3, 1))}, "[model] has the key 3 (int); state-dict keys are strings"),
    "past_storage": ({"w": _Tensor(S0, 2, (2, 3), (3, 1))}, "[model] w (offset 2, 6 elements) reaches past its "
                     "storage of 6"),
    "storage_bigger_than_record": ({"w": _Tensor(_Storage("0", torch.FloatStorage, 60), 0, (2, 3), (3, 1))},
                                   "storage 0 declares 60 float32 elements (240 bytes) but its record "
                                   "archive/data/0 holds 24 bytes"),
    "missing_record": ({"w": _Tensor(_Storage("7", torch.FloatStorage, 6), 0, (2, 3), (3, 1))},
                       "[model] w refers to record archive/data/7, which the file does not have"),
    "not_a_storage": ({"w": _Tensor(5, 0, (2, 3), (3, 1))}, "[model] w is built from 5, not a storage"),  # type: ignore[arg-type]
}  # fmt: skip


@pytest.mark.parametrize("case", list(RANK_FILES))
def test_hostile_rank_file_is_one_line(tmp_path: Path, case: str) -> None:
    model, needle = RANK_FILES[case]
    path = _rank_file(tmp_path / "model_optim_rng.pt", {"model": model, "checkpoint_version": 3.0}, RECORDS)
    with pytest.raises(ConvertError) as exc:
        read_rank_file(path)
    _one_line(exc, str(path), needle)


def test_a_valid_hand_made_rank_file_is_read(tmp_path: Path) -> None:
    """The control for the cases above: the same file with sound values gives the tensor's bytes."""
    data = struct.pack("<6f", *range(6))
    t = _Tensor(S0, 0, (2, 3), (3, 1))
    path = _rank_file(tmp_path / "model_optim_rng.pt", {"model": {"w": t}, "checkpoint_version": 3.0}, {"0": data})
    (meta,) = read_rank_file(path)["model"].values()
    assert (meta.shape, meta.dtype, meta.nbytes) == ((2, 3), "float32", 24)
    assert path.read_bytes()[meta.begin : meta.begin + meta.nbytes] == data


# ---------------------------------------------------------------------------------------
# MindSpeed-LLM's own rank files (issue 18 item 2)


def _as_mindspeed_llm(mm: Path) -> None:
    """Rewrite our release checkpoint as MindSpeed-LLM's convert_ckpt_v2 writes one.

    Its `run()` saves, per rank, {"args": argparse.Namespace, "checkpoint_version": 3.0,
    "iteration": 1, "model": mg_weight[ep][tp]} where mg_weight is
    defaultdict(lambda: defaultdict(lambda: defaultdict(dict))), so `model` is a
    defaultdict(dict); torch.save(..., pickle_protocol=4), into iter_0000001 with the
    tracker holding 1. Its tensors are torch.chunk pieces, so some share a storage: here
    the fused QKV and the MLP input of each layer are views of one storage each.
    """
    it = mm / "iter_0000001"
    (mm / "release").rename(it)
    (mm / "latest_checkpointed_iteration.txt").write_text("1")
    args = argparse.Namespace(tensor_model_parallel_size=1, num_layers=4, hidden_size=64, params_dtype="bf16")
    for path in sorted(it.glob("*/model_optim_rng.pt")):
        old = torch.load(path, weights_only=True)["model"]
        model: collections.defaultdict = collections.defaultdict(dict)
        for key, value in old.items():
            if key.endswith(("linear_qkv.weight", "linear_fc1.weight")):
                flat = torch.cat([torch.zeros(5, dtype=value.dtype), value.reshape(-1)])
                value = flat[5:].view(value.shape)  # a view at storage offset 5
            model[key] = value
        obj = {"args": args, "checkpoint_version": 3.0, "iteration": 1, "model": model}
        torch.save(obj, path, pickle_protocol=4, _use_new_zipfile_serialization=True)


def test_mindspeed_llm_rank_files_convert_back_exactly(qwen2vl_dir: Path, mm_tp1: Path, tmp_path: Path) -> None:
    mm = tmp_path / "mm"
    shutil.copytree(mm_tp1, mm)
    _as_mindspeed_llm(mm)
    raw = (mm / "iter_0000001" / "mp_rank_00" / "model_optim_rng.pt").read_bytes()
    assert b"defaultdict" in raw and b"argparse" in raw and b"OrderedDict" in raw  # what the issue lists
    pc = ParallelConfig(tp_size=1, llm_pp_layers=[[4]], vit_pp_layers=[[3]])
    cfg = MmToHfConfig(save_hf_dir=tmp_path / "back", mm_dir=mm, hf_config=HfConfig(hf_dir=qwen2vl_dir),
                       parallel_config=pc)  # fmt: skip
    from engine.run.execute import run

    run(prepare(Job(converter="Qwen2VLConverter", command="mm_to_hf", cfg=cfg))[1], tmp_path / "back")
    assert (tmp_path / "back" / "model.safetensors").read_bytes() == (qwen2vl_dir / "model.safetensors").read_bytes()


def test_a_state_dict_ordered_dict_with_metadata_is_read(tmp_path: Path) -> None:
    """module.state_dict() is an OrderedDict carrying `_metadata` (pickled as state): it loads as a dict."""
    lin = torch.nn.Linear(3, 2)
    sd = lin.state_dict()
    assert hasattr(sd, "_metadata")
    path = tmp_path / "model_optim_rng.pt"
    torch.save({"model": sd}, path)
    metas = read_rank_file(path)["model"]
    assert {k: m.shape for k, m in metas.items()} == {"weight": (2, 3), "bias": (2,)}


def test_a_default_factory_is_never_called(tmp_path: Path) -> None:
    """A defaultdict's factory is a name in the pickle: a plain container's is ignored, anything else refused."""
    path = tmp_path / "model_optim_rng.pt"
    torch.save({"model": collections.defaultdict(list, {"w": torch.zeros(2)})}, path)
    assert list(read_rank_file(path)["model"]) == ["w"]
    torch.save({"model": collections.defaultdict(os.getcwd, {"w": torch.zeros(2)})}, path)
    with pytest.raises(ConvertError) as exc:
        read_rank_file(path)
    _one_line(exc, "refusing to unpickle posix.getcwd", "nothing was executed")


# ---------------------------------------------------------------------------------------
# the command line: exit 2, one line on stderr, nothing written

TP1_LAYOUT = ["--cfg.parallel_config.llm_pp_layers", "[[4]]", "--cfg.parallel_config.vit_pp_layers", "[[3]]"]


def test_cli_bad_config_values(qwen2vl_dir: Path, tmp_path: Path) -> None:
    from tests.test_cli import _bad, hf_to_mm

    hf = _with_config(qwen2vl_dir, tmp_path / "hf", lambda c: c.__setitem__("num_hidden_layers", "four"))
    _bad(hf_to_mm(hf, tmp_path / "out", layout=TP1_LAYOUT), "num_hidden_layers = 'four'; expected a whole number")
    (hf / "config.json").write_text('{"model_type": "qwen2_vl", "x": ' + "[" * 50_000 + "]" * 50_000 + "}")
    _bad(hf_to_mm(hf, tmp_path / "out", layout=TP1_LAYOUT), "config.json nests brackets too deeply")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_cli_overlapping_offsets_and_a_reshaped_embedding(qwen2vl_dir: Path, tmp_path: Path) -> None:
    from tests.test_cli import _bad, hf_to_mm

    hf = _rewrite(qwen2vl_dir, tmp_path / "hf", _reshaped("model.embed_tokens.weight", (256, 32)))
    _bad(hf_to_mm(hf, tmp_path / "out", layout=TP1_LAYOUT), "model.embed_tokens.weight has shape [256, 32]",
         "vocab_size = 128 and hidden_size = 64")  # fmt: skip
    path = hf / "model.safetensors"
    data = bytearray(path.read_bytes())
    (hlen,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + hlen])
    name = next(k for k in header if k != "__metadata__" and header[k]["data_offsets"][0] > 0)
    begin, end = header[name]["data_offsets"]
    header[name]["data_offsets"] = [begin - 4, end - 4]  # shifted into its neighbour
    text = json.dumps(header).encode().ljust(hlen)
    path.write_bytes(struct.pack("<Q", len(text)) + text + bytes(data[8 + hlen :]))
    _bad(hf_to_mm(hf, tmp_path / "out", layout=TP1_LAYOUT), f"tensor {name!r} data_offsets", "overlaps the bytes")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_cli_hostile_rank_files(qwen2vl_dir: Path, mm_tp1: Path, tmp_path: Path) -> None:
    from tests.test_cli import _bad, mm_convert

    def mm_to_hf() -> object:
        return mm_convert(
            "Qwen2VLConverter", "mm_to_hf", "--cfg.save_hf_dir", str(tmp_path / "back"), "--cfg.mm_dir",
            str(tmp_path / "mm"), "--cfg.hf_config.hf_dir", str(qwen2vl_dir), *TP1_LAYOUT,
        )  # fmt: skip

    mm = tmp_path / "mm"
    shutil.copytree(mm_tp1, mm)
    rank = mm / "release" / "mp_rank_00" / "model_optim_rng.pt"
    good = rank.read_bytes()
    obj = torch.load(rank, weights_only=True)
    torch.save({**obj, "model": {**obj["model"], 7: torch.zeros(2)}}, rank)
    _bad(mm_to_hf(), str(rank), "[model] has the key 7 (int); state-dict keys are strings")
    torch.save({**obj, "model": {**obj["model"], "extra": torch.zeros(2, dtype=torch.complex64)}}, rank)
    _bad(mm_to_hf(), str(rank), "is a torch.ComplexFloatStorage; supported storage types")
    _fifo(rank)
    _bad(mm_to_hf(), f"{rank}: is a FIFO (named pipe); only regular files are read")
    rank.unlink()
    rank.write_bytes(good)
    _dev_zero(mm / "latest_checkpointed_iteration.txt")
    _bad(mm_to_hf(), "latest_checkpointed_iteration.txt: is a character device")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mm"]
