"""dcp_to_hf: a torch.distributed.checkpoint back to the original Hugging Face files.

Two sources: our own hf_to_dcp (Megatron names, one chunk per tensor), and what MindSpeed-MM's FSDP2
training saves, made here by torch's own `torch.distributed.checkpoint.save` from two gloo processes
holding every tensor as a DTensor sharded on dim 0 (`{"model": {"model." + hf_key: t}}`, MindSpeed-MM's
Qwen3-VL prefix, plus optimizer state and checkpoint_version). The expectation is always hf_dir itself:
safetensors files byte for byte, and each tensor torch.equal to safetensors' own reading of it.
"""

from __future__ import annotations

import filecmp
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine.errors import ConvertError
from engine.job import DcpToHfConfig, HfConfig, HfToDcpConfig, Job, prepare
from engine.planning.check import check_plan
from engine.run.execute import run
from engine.source.hf_source import inspect_hf
from mmtui.megatron_logits import init_gloo, rendezvous
from tests.fixtures.tiny_llm import build_tiny_llm
from tests.fixtures.tiny_vlm import write_weights
from tests.test_cli import BIN, mm_convert

REPO = Path(__file__).resolve().parents[2]
PREFIX = "model."  # MindSpeed-MM's Qwen3VLConverter.dcp_prefix: "model." + "model." + HF name on disk


def _converter(hf: Path) -> str:
    return inspect_hf(hf).preset.converter


def _hf_state(hf: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(hf.glob("*.safetensors")) for k, v in load_file(f).items()}


def _same_files(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for n in names:
        assert filecmp.cmp(a / n, b / n, shallow=False), n


def _back(hf: Path, dcp: Path, out: Path, **kw: object) -> Path:
    cfg = DcpToHfConfig(dcp_dir=dcp, hf_config=HfConfig(hf_dir=hf), save_hf_dir=out, **kw)
    _, plan = prepare(Job(converter=_converter(hf), command="dcp_to_hf", cfg=cfg))
    assert check_plan(plan) == []
    run(plan, out)
    return out


# ---------------------------------------------------------------------------------------
# DCP as torch itself saves it from FSDP2-style sharded tensors


def _save_rank(rank: int, jobs: list[tuple[str, str]], url: str) -> None:
    """One of two gloo ranks: every HF tensor of each hf_dir as DTensor Shard(0), saved by torch's DCP."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    init_gloo(url, rank, 2)
    try:
        mesh = init_device_mesh("cpu", (2,))
        for hf, out in jobs:
            state = _hf_state(Path(hf))
            model = {PREFIX + k: distribute_tensor(v, mesh, [Shard(0)]) for k, v in state.items()}
            first = next(iter(model))
            optim = {
                "state": {first: {"exp_avg": distribute_tensor(state[first[len(PREFIX):]] * 2, mesh, [Shard(0)]),
                                  "step": torch.tensor(7.0)}},
                "param_groups": [{"lr": 1e-5, "params": [first]}],
            }  # fmt: skip
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                dcp.save({"model": model, "optimizer": optim, "checkpoint_version": 3.0}, checkpoint_id=out)
            del model, optim, state
    finally:
        dist.destroy_process_group()


def save_sharded(jobs: list[tuple[str, str]]) -> None:
    """For each (hf_dir, root): `root/release` as MindSpeed-MM's FSDP2 saves it (2 ranks), and its tracker."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_save_rank, args=([(hf, str(Path(root) / "release")) for hf, root in jobs], rendezvous(tmp)), nprocs=2)
    for _, root in jobs:
        (Path(root) / "latest_checkpointed_iteration.txt").write_text("release")


def _sharded(jobs: list[tuple[Path, Path]]) -> None:
    """In a fresh interpreter (spawn re-imports this module; pytest's workers stay out of it), once for all."""
    pairs = [(str(hf), str(root)) for hf, root in jobs]
    code = f"from tests.engine.test_dcp_to_hf import save_sharded; save_sharded({pairs!r})"
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]


BIG_VOCAB = (1 << 18) - 1  # 67 MB per table in float32, odd: the two ranks' chunks differ


@pytest.fixture(scope="module")
def llama99(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama in two shards whose vocabulary (99 rows) does not divide by 2 ranks."""
    return build_tiny_llm(tmp_path_factory.mktemp("hf") / "llama99", family="llama", vocab_size=99, shards=2)


@pytest.fixture(scope="module")
def big(llama99: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same model with a 262,143-word vocabulary: two 67 MB tables (the memory test's)."""
    import json

    path = tmp_path_factory.mktemp("big")
    state = _hf_state(llama99)
    gen = torch.Generator().manual_seed(3)
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        state[k] = torch.randn(BIG_VOCAB, 64, generator=gen)
    config = json.loads((llama99 / "config.json").read_text()) | {"vocab_size": BIG_VOCAB}
    (path / "config.json").write_text(json.dumps(config))
    write_weights(path, state, 2)
    return path


@pytest.fixture(scope="module")
def sharded(llama99: Path, big: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fsdp")
    _sharded([(llama99, root / "tiny"), (big, root / "big")])  # one spawn for both
    return {"tiny": root / "tiny", "big": root / "big"}


@pytest.fixture(scope="module")
def fsdp_dcp(sharded: dict[str, Path]) -> Path:
    return sharded["tiny"]


def test_fsdp2_sharded_dcp_reads_back_exactly(llama99: Path, fsdp_dcp: Path, tmp_path: Path) -> None:
    from engine.formats.dcp_reader import open_dcp

    index = open_dcp(fsdp_dcp).index  # what torch wrote: every tensor in two chunks, one per rank file
    embed = index.tensors["model.model.model.embed_tokens.weight"]
    assert [(c.offset, c.size, c.file) for c in embed.chunks] == [
        ((0, 0), (50, 64), "__0_0.distcp"), ((50, 0), (49, 64), "__1_0.distcp")
    ]  # fmt: skip
    assert any(k.startswith("optimizer.") for k in index.tensors) and "checkpoint_version" in index.objects
    out = _back(llama99, fsdp_dcp, tmp_path / "hf")
    want, got = _hf_state(llama99), _hf_state(out)
    assert list(got) == list(want)
    for k, t in want.items():
        assert got[k].dtype == t.dtype and torch.equal(got[k], t), k
    _same_files(llama99, out)


def test_the_iteration_directory_given_as_mindspeed_mm_does(llama99: Path, fsdp_dcp: Path, tmp_path: Path) -> None:
    """load_dir = save_dir/release, and MindSpeed-MM's other names, read as ours."""
    cfg = DcpToHfConfig(load_dir=fsdp_dcp / "release", model_assets_dir=llama99, save_dir=tmp_path / "hf")
    assert (cfg.dcp_dir, cfg.hf_config, cfg.save_hf_dir) == (fsdp_dcp / "release", HfConfig(hf_dir=llama99),
                                                              tmp_path / "hf")  # fmt: skip
    assert (cfg.load_dir, cfg.model_assets_dir, cfg.save_dir) == (None, None, None)
    _same_files(llama99, _back(llama99, fsdp_dcp / "release", tmp_path / "hf", dcp_prefix=PREFIX))


# ---------------------------------------------------------------------------------------
# our own hf_to_dcp's output


@pytest.mark.parametrize("variant", ["llama", "qwen2_vl_tied"])
def test_hf_to_dcp_and_back_is_byte_identical(
    tiny_dirs: dict[str, Path], tiny_llms: dict[str, Path], tmp_path: Path, variant: str
) -> None:
    hf = {**tiny_dirs, **tiny_llms}[variant]
    dcp = tmp_path / "dcp"
    job = Job(
        converter=_converter(hf), command="hf_to_dcp", cfg=HfToDcpConfig(dcp_dir=dcp, hf_config=HfConfig(hf_dir=hf))
    )
    run(prepare(job)[1], dcp)
    _same_files(hf, _back(hf, dcp, tmp_path / "hf"))


# ---------------------------------------------------------------------------------------
# unhappy paths: one line naming the thing, nothing written


def _single(hf: Path, root: Path, state: dict[str, torch.Tensor]) -> Path:
    """A one-process torch DCP save of `state` under model.model.* (MindSpeed-MM's naming)."""
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": {PREFIX + k: v for k, v in state.items()}}, checkpoint_id=root, no_dist=True)
    return root


def _refused(hf: Path, dcp: Path, out: Path, *parts: str, **kw: object) -> str:
    cfg = DcpToHfConfig(dcp_dir=dcp, hf_config=HfConfig(hf_dir=hf), save_hf_dir=out, **kw)
    with pytest.raises(ConvertError) as e:
        prepare(Job(converter=_converter(hf), command="dcp_to_hf", cfg=cfg))
    text = str(e.value)
    assert "\n" not in text and all(p in text for p in parts), text
    assert not out.exists()
    return text


def test_keys_shapes_and_dtypes_must_be_hf_dirs(llama99: Path, tmp_path: Path) -> None:
    state = _hf_state(llama99)
    norm = "model.norm.weight"
    extra = _single(llama99, tmp_path / "extra", state | {"model.layers.9.mlp.up_proj.weight": state[norm]})
    _refused(llama99, extra, tmp_path / "o", "model.model.model.layers.9.mlp.up_proj.weight", "not in hf_config.hf_dir")
    missing = _single(llama99, tmp_path / "missing", {k: v for k, v in state.items() if k != norm})
    _refused(llama99, missing, tmp_path / "o", f"{norm} of hf_config.hf_dir is missing")
    short = _single(llama99, tmp_path / "shape", state | {norm: state[norm][:-1]})
    _refused(llama99, short, tmp_path / "o", f"model.model.{norm} is float32 [63]", "[64]")
    wide = _single(llama99, tmp_path / "dtype", state | {norm: state[norm].double()})
    _refused(llama99, wide, tmp_path / "o", f"model.model.{norm} is float64 [64]", "float32 [64]")
    _refused(
        llama99,
        extra,
        tmp_path / "o",
        "lm_head.weight of hf_config.hf_dir is missing (no model.lm_head.weight in",
        dcp_prefix="",
    )


def test_another_float_dtype_with_hf_dtype(llama99: Path, tmp_path: Path) -> None:
    """FSDP2 keeps float32 master weights of a bfloat16 model: hf_dtype rounds them as tensor.to does."""
    state = _hf_state(llama99)
    norm = "model.norm.weight"
    wide = state[norm].double() * (1 + 3e-7)  # 2.5 ulp away: needs rounding back to float32
    dcp = _single(llama99, tmp_path / "dtype", state | {norm: wide})
    _refused(llama99, dcp, tmp_path / "o", "float64 [64]", "(or hf_dtype true: write hf_dir's dtype)")
    out = _back(llama99, dcp, tmp_path / "hf", hf_dtype=True)
    got = _hf_state(out)
    assert got[norm].dtype == torch.float32 and torch.equal(got[norm], wide.to(torch.float32))
    assert not torch.equal(got[norm], state[norm])  # the change survived: a real rounding was tested
    assert all(torch.equal(got[k], t) for k, t in state.items() if k != norm)


def test_a_tied_models_saved_output_layer(tiny_llms: dict[str, Path], tmp_path: Path) -> None:
    """MindSpeed-MM's hf_to_dcp with tie_weight saves lm_head.weight though hf_dir has none: not written."""
    hf = tiny_llms["qwen2_tied"]
    state = _hf_state(hf)
    assert "lm_head.weight" not in state
    dcp = _single(hf, tmp_path / "dcp", state | {"lm_head.weight": state["model.embed_tokens.weight"]})
    _same_files(hf, _back(hf, dcp, tmp_path / "hf"))


def test_moe_experts_stored_as_their_2d_view(tmp_path: Path) -> None:
    """MindSpeed-MM's Qwen3-VL converter and FSDP2 model hold fused experts [E, in, out] as view(-1, out)."""
    from tests.fixtures.tiny_qwen3_vl import build_tiny_qwen3_vl

    hf = build_tiny_qwen3_vl(tmp_path / "moe", "qwen3_vl_moe", tied=False, shards=2)
    state = _hf_state(hf)
    fused = [k for k, v in state.items() if v.dim() == 3 and k.endswith(("gate_up_proj", "down_proj"))]
    assert fused
    flat = {k: (v.reshape(-1, v.shape[-1]) if k in fused else v) for k, v in state.items()}
    dcp = _single(hf, tmp_path / "dcp", flat)
    _same_files(hf, _back(hf, dcp, tmp_path / "hf"))
    k = fused[0]
    _refused(hf, dcp, tmp_path / "o", f"model.model.{k} is float32 {list(flat[k].shape)}", fused_linear_names=[])


def test_hostile_or_broken_directories(llama99: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    _refused(llama99, empty, tmp_path / "o", "no .metadata (torch DCP's index)")
    good = _single(llama99, tmp_path / "good", _hf_state(llama99))

    hostile = tmp_path / "hostile"
    shutil.copytree(good, hostile)

    class Boom:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    (hostile / ".metadata").write_bytes(pickle.dumps(Boom()))
    _refused(llama99, hostile, tmp_path / "o", "refusing to unpickle posix.system", "nothing was executed")
    assert not (tmp_path / "pwned").exists()

    cut = tmp_path / "cut"
    shutil.copytree(good, cut)
    data = cut / "__0_0.distcp"
    data.write_bytes(data.read_bytes()[: data.stat().st_size - 100])
    _refused(llama99, cut, tmp_path / "o", "__0_0.distcp", "past its end (truncated?)")

    other = build_tiny_llm(tmp_path / "qwen3", family="qwen3")  # another model's hf_dir, the same names
    _refused(other, good, tmp_path / "o", "model.model.lm_head.weight is float32 [99, 64], hf_config.hf_dir's "
             "lm_head.weight is float32 [128, 64] (model.safetensors); they must match")  # fmt: skip
    stranger = _single(llama99, tmp_path / "stranger", {"vision.proj.weight": torch.zeros(2, 2)})
    _refused(llama99, stranger, tmp_path / "o", "none of its 1 model tensors (first: model.model.vision.proj.weight)",
             "is hf_config.hf_dir this checkpoint's model?")  # fmt: skip


# ---------------------------------------------------------------------------------------
# the command line and job files


def test_command_line_with_mindspeed_mm_names(llama99: Path, fsdp_dcp: Path, tmp_path: Path) -> None:
    """As MindSpeed-MM's docs spell it: GenericDCPConverter, load_dir = the release directory, save_dir,
    model_assets_dir (the family is read from config.json)."""
    out = tmp_path / "hf"
    release = str(fsdp_dcp / "release")
    args = ["GenericDCPConverter", "dcp_to_hf", "--cfg.load_dir", release, "--cfg.model_assets_dir", str(llama99)]
    r = mm_convert(*args, "--cfg.save_dir", str(out))
    assert r.returncode == 0, r.stderr
    _same_files(llama99, out)
    r = mm_convert(*args, "--cfg.save_hf_dir", str(tmp_path / "two"), "--cfg.dcp_dir", str(tmp_path))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "dcp_dir and load_dir name different directories" in r.stderr and not (tmp_path / "two").exists()
    r = mm_convert("LlamaConverter", "dcp_to_hf", "--cfg.dcp_dir", str(tmp_path / "nope"), "--cfg.hf_config.hf_dir",
                   str(llama99), "--cfg.save_hf_dir", str(tmp_path / "three"))  # fmt: skip
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "no such directory" in r.stderr, r.stderr
    assert not (tmp_path / "three").exists()
    r = mm_convert("LlamaConverter", "dcp_to_hf", "--cfg.dcp_dir", str(fsdp_dcp), "--cfg.hf_dir", str(llama99))
    assert (
        r.returncode == 2
        and r.stderr == "mm-convert: error: cfg: give save_hf_dir (or save_dir, as MindSpeed-MM calls it)\n"
    )
    r = mm_convert("GenericDCPConverter", "hf_to_dcp", "--cfg.dcp_dir", str(tmp_path / "four"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "GenericDCPConverter takes dcp_to_hf only; name the model's converter for hf_to_dcp" in r.stderr


def test_job_file_replays(llama99: Path, fsdp_dcp: Path, tmp_path: Path) -> None:
    import tomli_w

    from engine.job import job_to_dict, load_job

    cfg = DcpToHfConfig(load_dir=fsdp_dcp, hf_dir=llama99, save_dir=tmp_path / "hf")
    job = tmp_path / "job.toml"
    job.write_text(tomli_w.dumps(job_to_dict(Job(converter="LlamaConverter", command="dcp_to_hf", cfg=cfg))))
    assert load_job(job).cfg == cfg
    assert "dcp_dir" in job.read_text() and "load_dir" not in job.read_text()
    bad = tmp_path / "bad.toml"
    bad.write_text(job.read_text().replace("hf_config", "other_config"))
    with pytest.raises(ConvertError, match=r"bad.toml: cfg.other_config: Extra inputs are not permitted"):
        load_job(bad)
    bad.write_text('converter = "LlamaConverter"\ncommand = "dcp_to_hf"\n[cfg]\nload_dir = "d"\nsave_dir = "s"\n')
    with pytest.raises(
        ConvertError, match=r"bad.toml: cfg: give hf_config.hf_dir \(or model_assets_dir or hf_dir, as "
    ):
        load_job(bad)
    r = subprocess.run([str(BIN / "mmtui"), "--replay", str(job)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    _same_files(llama99, tmp_path / "hf")


# ---------------------------------------------------------------------------------------
# memory: a tensor in several chunks is read a band at a time


@pytest.mark.skipif(not hasattr(os, "wait4"), reason="peak RSS is read with wait4")
def test_peak_memory_of_a_sharded_checkpoint(
    llama99: Path, big: Path, sharded: dict[str, Path], tmp_path: Path
) -> None:
    """Peak RSS of mm-convert (wait4, as tests/engine/test_memory.py reads it): the tables in two chunks each add
    less than one table's size over the tiny model's run."""

    def peak(hf: Path, dcp: Path, out: Path) -> float:
        args = ["LlamaConverter", "dcp_to_hf", "--cfg.dcp_dir", str(dcp), "--cfg.hf_config.hf_dir", str(hf),
                "--cfg.save_hf_dir", str(out)]  # fmt: skip
        with subprocess.Popen([BIN / "mm-convert", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) as p:
            _, status, usage = os.wait4(p.pid, 0)
            assert os.waitstatus_to_exitcode(status) == 0, p.stderr.read().decode() if p.stderr else ""
        return usage.ru_maxrss / 1024

    base = peak(llama99, sharded["tiny"], tmp_path / "tiny_out")
    high = peak(big, sharded["big"], tmp_path / "big_out")
    _same_files(big, tmp_path / "big_out")
    assert high - base < 48, f"peak {high:.0f} MB against {base:.0f} MB for the tiny model (one table: 67 MB)"


def test_verify_reads_the_chunks_again_against_what_was_written(llama99: Path, fsdp_dcp: Path, tmp_path: Path) -> None:
    """The wizard's ctrl+t: every HF tensor built again from the DCP chunks equals the bytes written; one flipped
    byte in the output is found and named."""
    from engine.formats.safetensors_header import read_header
    from engine.run.verify import verify_job
    from engine.source.hf_source import inspect_hf

    out = tmp_path / "hf"
    cfg = DcpToHfConfig(dcp_dir=fsdp_dcp, hf_config=HfConfig(hf_dir=llama99), save_hf_dir=out)
    job = Job(converter=_converter(llama99), command="dcp_to_hf", cfg=cfg)
    _, plan = prepare(job)
    run(plan, out)
    info = inspect_hf(llama99)
    n = len(info.tensors)
    assert verify_job(info, job) == (True, f"identical: {n} tensors ({n} equal)")
    (shard,) = [p for p in sorted(out.glob("*.safetensors")) if "model.norm.weight" in read_header(p)]
    meta = read_header(shard)["model.norm.weight"]
    data = bytearray(shard.read_bytes())
    data[meta.begin + 3] ^= 0x40
    shard.write_bytes(bytes(data))
    ok, said = verify_job(info, job)
    assert not ok and said == f"different: {n} tensors ({n - 1} equal, 1 differs); first: model.norm.weight differs"
