"""Megatron-Core's torch_dist format, written and read: the layout megatron-core 0.16 saves (measured, and
restated here as the expectation), megatron-core loading our output, our reader taking megatron-core's own
save back to the original safetensors, round trips through legacy rank files, and bad input."""

from __future__ import annotations

import argparse
import dataclasses
import filecmp
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine.errors import ConvertError
from engine.job import Job, prepare
from engine.run.execute import run
from tests.test_cli import _bad, mm_convert

TOKENS = [3, 17, 99, 5, 42, 7, 64, 127, 0, 11, 23, 88]
L, HIDDEN, HEADS, GROUPS, D, FFN, VOCAB = 4, 64, 4, 2, 16, 128, 128  # the tiny Llama (tests/fixtures/tiny_vlm.TEXT)
CONFIG_JSON = (
    b'{"sharded_backend": "torch_dist", "sharded_backend_version": 1, "common_backend": "torch", '
    b'"common_backend_version": 1}'
)
LINEARS = ["self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2"]


def _job(command: str, cfg: dict, converter: str = "LlamaConverter") -> Job:
    return Job.model_validate({"converter": converter, "command": command, "cfg": cfg})


def convert(command: str, cfg: dict, out: Path, converter: str = "LlamaConverter") -> Path:
    _, plan = prepare(_job(command, cfg, converter))
    run(plan, out)
    return out


def hf_to_mm(hf: Path, out: Path, tp: int, pp: list[int], fmt: str) -> Path:
    cfg = {"mm_dir": str(out), "hf_config": {"hf_dir": str(hf)}, "format": fmt}
    cfg["parallel_config"] = {"tp_size": tp, "llm_pp_layers": [pp]}
    return convert("hf_to_mm", cfg, out)


def resplit(hf: Path, src: Path, out: Path, tp: int, pp: list[int], fmt: str) -> Path:
    cfg = {"source_dir": str(src), "target_dir": str(out), "hf_config": {"hf_dir": str(hf)}, "format": fmt}
    cfg["target_parallel_config"] = {"tp_size": tp, "llm_pp_layers": [pp]}
    return convert("resplit", cfg, out)


def mm_to_hf(hf: Path, src: Path, out: Path) -> Path:
    return convert("mm_to_hf", {"mm_dir": str(src), "save_hf_dir": str(out), "hf_config": {"hf_dir": str(hf)}}, out)


@pytest.fixture(scope="module")
def llama(tiny_llms: dict[str, Path]) -> Path:
    return tiny_llms["llama"]


@pytest.fixture(scope="module")
def outs(llama: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("torch_dist")
    return {
        "td_tp1": hf_to_mm(llama, root / "td_tp1", 1, [4], "torch_dist"),
        "td_tp2pp2": hf_to_mm(llama, root / "td_tp2pp2", 2, [1, 3], "torch_dist"),
        "legacy_tp2": hf_to_mm(llama, root / "legacy_tp2", 2, [4], "legacy"),
    }


def _same_tree(a: Path, b: Path) -> None:
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for rel in files:
        assert filecmp.cmp(a / rel, b / rel, shallow=False), rel


# ---------------------------------------------------------------------------------------
# the layout, spelled out


def _expected_chunks(tp: int) -> dict[str, list[tuple[tuple[int, ...], tuple[int, ...]]]]:
    """{global tensor: [(offset, size)]} as megatron-core 0.16 saves the tiny Llama at TP `tp` (measured)."""
    qkv = (HEADS + 2 * GROUPS) * D
    out: dict[str, list] = {
        "embedding.word_embeddings.weight": [((r * VOCAB // tp, 0), (VOCAB // tp, HIDDEN)) for r in range(tp)],
        "output_layer.weight": [((r * VOCAB // tp, 0), (VOCAB // tp, HIDDEN)) for r in range(tp)],
        "decoder.final_layernorm.weight": [((0,), (HIDDEN,))],
    }
    layers = {
        "self_attention.linear_qkv.layer_norm_weight": [((0,), (HIDDEN,))],
        "mlp.linear_fc1.layer_norm_weight": [((0,), (HIDDEN,))],
        "self_attention.linear_qkv.weight": [((r * qkv // tp, 0), (qkv // tp, HIDDEN)) for r in range(tp)],
        "self_attention.linear_proj.weight": [((0, r * HIDDEN // tp), (HIDDEN, HIDDEN // tp)) for r in range(tp)],
        "mlp.linear_fc1.weight": [  # [gate; up]: each rank's gate block and up block
            ((half * FFN + r * FFN // tp, 0), (FFN // tp, HIDDEN)) for r in range(tp) for half in (0, 1)
        ],
        "mlp.linear_fc2.weight": [((0, r * FFN // tp), (HIDDEN, FFN // tp)) for r in range(tp)],
    }
    for name, chunks in layers.items():
        out[f"decoder.layers.{name}"] = [((layer, *o), (1, *s)) for layer in range(L) for o, s in chunks]
    return {k: sorted(v) for k, v in out.items()}


def _expected_objects() -> set[str]:
    layer = {f"decoder.layers.{m}._extra_state/shard_{i}_{L}" for m in LINEARS for i in range(L)}
    return layer | {"decoder.final_layernorm._extra_state/shard_0_1"}  # TE's norm asks for it; the local spec not


def _index(it_dir: Path):
    with open(it_dir / ".metadata", "rb") as f:
        return pickle.load(f)  # our own output, read with torch's classes (the reader's own unpickler is tested below)


def _structure(md) -> tuple[dict, set[str]]:
    tensors, objects = {}, set()
    for k, v in md.state_dict_metadata.items():
        if hasattr(v, "chunks"):
            tensors[k] = sorted((tuple(c.offsets), tuple(c.sizes)) for c in v.chunks)
        else:
            objects.add(k)
    return tensors, objects


def _naive_global(hf: Path) -> dict[str, torch.Tensor]:
    """The global tensors built from the HF weights by hand: stacked layers, grouped QKV, [gate; up]."""
    w = {k: v for f in sorted(hf.glob("*.safetensors")) for k, v in load_file(f).items()}

    def stack(fn) -> torch.Tensor:
        return torch.stack([fn(f"model.layers.{i}.") for i in range(L)])

    def qkv(p: str) -> torch.Tensor:
        q, k, v = (w[p + f"self_attn.{n}_proj.weight"] for n in "qkv")
        per = HEADS // GROUPS * D
        return torch.cat(
            [
                t
                for g in range(GROUPS)
                for t in (q[g * per : (g + 1) * per], k[g * D : (g + 1) * D], v[g * D : (g + 1) * D])
            ]
        )

    return {
        "embedding.word_embeddings.weight": w["model.embed_tokens.weight"],
        "output_layer.weight": w["lm_head.weight"],
        "decoder.final_layernorm.weight": w["model.norm.weight"],
        "decoder.layers.self_attention.linear_qkv.layer_norm_weight": stack(lambda p: w[p + "input_layernorm.weight"]),
        "decoder.layers.mlp.linear_fc1.layer_norm_weight": stack(lambda p: w[p + "post_attention_layernorm.weight"]),
        "decoder.layers.self_attention.linear_qkv.weight": stack(qkv),
        "decoder.layers.self_attention.linear_proj.weight": stack(lambda p: w[p + "self_attn.o_proj.weight"]),
        "decoder.layers.mlp.linear_fc1.weight": stack(
            lambda p: torch.cat([w[p + "mlp.gate_proj.weight"], w[p + "mlp.up_proj.weight"]])
        ),
        "decoder.layers.mlp.linear_fc2.weight": stack(lambda p: w[p + "mlp.down_proj.weight"]),
    }


def _dcp_tensors(it_dir: Path) -> dict[str, torch.Tensor]:
    """Every global tensor, read back by torch's own DCP reader."""
    import torch.distributed.checkpoint as dcp

    md = _index(it_dir)
    sd = {
        k: torch.empty(v.size, dtype=v.properties.dtype)
        for k, v in md.state_dict_metadata.items()
        if hasattr(v, "size")
    }
    dcp.load(sd, storage_reader=dcp.FileSystemReader(it_dir), no_dist=True)
    return sd


def test_layout_on_disk_is_megatron_cores(outs: dict[str, Path], llama: Path) -> None:
    out = outs["td_tp2pp2"]
    assert (out / "latest_checkpointed_iteration.txt").read_text() == "release"
    it = out / "release"
    names = ["__0_0.distcp", "__1_0.distcp", "__2_0.distcp", "__3_0.distcp", ".metadata", "common.pt", "metadata.json"]
    assert sorted(p.name for p in it.iterdir()) == sorted(names)
    assert (it / "metadata.json").read_bytes() == CONFIG_JSON
    with torch.serialization.safe_globals([argparse.Namespace]):
        common = torch.load(it / "common.pt", weights_only=True)
    assert list(common) == [
        "args",
        "checkpoint_version",
        "iteration",
        "num_floating_point_operations_so_far",
        "content_metadata",
    ]
    assert (common["checkpoint_version"], common["iteration"], common["num_floating_point_operations_so_far"]) == (
        3.0,
        0,
        0,
    )
    assert common["content_metadata"] == {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}
    a = common["args"]
    assert (a.tensor_model_parallel_size, a.pipeline_model_parallel_size, a.ckpt_format) == (2, 2, "torch_dist")
    assert (a.num_layers, a.hidden_size, a.num_query_groups, a.params_dtype) == (L, HIDDEN, GROUPS, torch.float32)

    md = _index(it)  # pickled without torch, loaded as torch's own classes
    from torch.distributed.checkpoint.filesystem import CURRENT_DCP_VERSION
    from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorProperties

    assert type(md) is Metadata and md.version == CURRENT_DCP_VERSION
    assert md.storage_meta == StorageMeta(checkpoint_id=None, save_id=None)  # the same bytes wherever written
    assert md.state_dict_metadata["output_layer.weight"].properties == TensorProperties(dtype=torch.float32)
    tensors, objects = _structure(md)
    assert tensors == _expected_chunks(2)
    assert objects == _expected_objects()
    assert md.planner_data is None
    files = {k.fqn: set() for k in md.storage_data}
    for k, v in md.storage_data.items():
        files[k.fqn].add(v.relative_path)
    # stage 0 holds layer 0 (ranks 0, 1), stage 1 layers 1-3 (ranks 2, 3); replicas and extra state on TP rank 0
    assert files["decoder.layers.self_attention.linear_qkv.weight"] == set(names[:4])
    assert files["decoder.final_layernorm.weight"] == {"__2_0.distcp"}
    assert files["embedding.word_embeddings.weight"] == {"__0_0.distcp", "__1_0.distcp"}
    assert files[f"decoder.layers.mlp.linear_fc2._extra_state/shard_3_{L}"] == {"__2_0.distcp"}
    # the bytes of a module's extra state are torch.save([None])
    key = next(k for k in md.storage_data if k.fqn.endswith("shard_0_4"))
    info = md.storage_data[key]
    raw = (it / info.relative_path).read_bytes()[info.offset : info.offset + info.length]
    import io

    assert torch.load(io.BytesIO(raw), weights_only=True) == [None]

    got, want = _dcp_tensors(it), _naive_global(llama)
    assert sorted(got) == sorted(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_writing_needs_no_torch(llama: Path, tmp_path: Path) -> None:
    """Importing torch costs seconds and hundreds of MB: the torch_dist writer, like the rank-file writer, does not."""
    cfg = {"mm_dir": str(tmp_path / "o"), "hf_config": {"hf_dir": str(llama)}, "format": "torch_dist"}
    cfg["parallel_config"] = {"tp_size": 2, "llm_pp_layers": [[2, 2]]}
    job = {"converter": "LlamaConverter", "command": "hf_to_mm", "cfg": cfg}
    code = (
        "import sys; from engine.job import Job, prepare; from engine.run.execute import run; "
        f"job = Job.model_validate({job!r}); run(prepare(job)[1], {str(tmp_path / 'o')!r}); "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[2])
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "o" / "release" / ".metadata").is_file()


def test_tp1_chunks_and_data(outs: dict[str, Path], llama: Path) -> None:
    it = outs["td_tp1"] / "release"
    assert sorted(p.name for p in it.iterdir()) == [".metadata", "__0_0.distcp", "common.pt", "metadata.json"]
    tensors, objects = _structure(_index(it))
    assert tensors == _expected_chunks(1)  # fc1 is still two chunks per layer
    assert objects == _expected_objects()
    got, want = _dcp_tensors(it), _naive_global(llama)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_same_input_same_bytes_from_any_source(outs: dict[str, Path], llama: Path, tmp_path: Path) -> None:
    """torch_dist written from HF and re-cut from another torch_dist or from legacy rank files: identical bytes."""
    direct = hf_to_mm(llama, tmp_path / "direct", 2, [4], "torch_dist")
    from_td = resplit(llama, outs["td_tp2pp2"], tmp_path / "from_td", 2, [4], "torch_dist")
    from_legacy = resplit(llama, outs["legacy_tp2"], tmp_path / "from_legacy", 2, [4], "torch_dist")
    _same_tree(direct, from_td)
    _same_tree(direct, from_legacy)


def test_legacy_to_torch_dist_and_back_is_byte_identical(outs: dict[str, Path], llama: Path, tmp_path: Path) -> None:
    back = resplit(llama, outs["td_tp2pp2"], tmp_path / "back", 2, [4], "legacy")
    _same_tree(outs["legacy_tp2"], back)


def test_way_back_to_hf_is_the_original(outs: dict[str, Path], llama: Path, tmp_path: Path) -> None:
    out = mm_to_hf(llama, outs["td_tp2pp2"], tmp_path / "hf")
    for f in llama.glob("*.safetensors"):
        assert filecmp.cmp(f, out / f.name, shallow=False), f.name


def test_padded_tied_vocabulary(tiny_llms: dict[str, Path], tmp_path: Path) -> None:
    """Vocabulary 99 padded to 128 (zeros, split by TP rows); tied, so no output layer even with PP 2 (megatron-core
    ties the last stage's to the embedding's key); read back without being told the padding."""
    hf = tiny_llms["qwen3_vocab99"]
    layout = {"tp_size": 2, "llm_pp_layers": [[2, 2]], "make_vocab_size_divisible_by": 32}
    cfg = {
        "mm_dir": str(tmp_path / "td"),
        "hf_config": {"hf_dir": str(hf)},
        "parallel_config": layout,
        "format": "torch_dist",
    }
    td = convert("hf_to_mm", cfg, tmp_path / "td", "Qwen3Converter")
    tensors, _ = _structure(_index(td / "release"))
    assert tensors["embedding.word_embeddings.weight"] == [((0, 0), (64, HIDDEN)), ((64, 0), (64, HIDDEN))]
    assert "output_layer.weight" not in tensors
    emb = _dcp_tensors(td / "release")["embedding.word_embeddings.weight"]
    assert torch.equal(emb[:99], load_file(next(hf.glob("*.safetensors")))["model.embed_tokens.weight"])
    assert not emb[99:].any()
    cfg = {"mm_dir": str(td), "save_hf_dir": str(tmp_path / "hf"), "hf_config": {"hf_dir": str(hf)}}
    out = convert("mm_to_hf", cfg, tmp_path / "hf", "Qwen3Converter")
    for f in hf.glob("*.safetensors"):
        assert filecmp.cmp(f, out / f.name, shallow=False), f.name


# ---------------------------------------------------------------------------------------
# megatron-core itself


def _arch():
    from mmtui.megatron_logits import GPTArch

    return GPTArch(
        num_layers=L, hidden_size=HIDDEN, num_attention_heads=HEADS, num_query_groups=GROUPS, ffn_hidden_size=FFN,
        vocab_size=VOCAB, rotary_base=10000.0, norm_epsilon=1e-6, add_qkv_bias=False, tied=False,
    )  # fmt: skip


@pytest.fixture(scope="module")
def megatron(outs: dict[str, Path], moe: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One megatron-core run: load our TP 1, TP 2 (PP 2) and MoE EP 2 outputs, and save our legacy TP 2 and
    Mixtral EP 2 outputs itself."""
    pytest.importorskip("megatron.core")
    from tests.fixtures.megatron_dist import Load, Save, run_megatron

    root = tmp_path_factory.mktemp("megatron")
    saved = {}
    files: dict[str, list[Path]] = {}
    for name, ranks in (("llama", ["mp_rank_00", "mp_rank_01"]), ("mixtral", ["mp_rank_00_000", "mp_rank_00_001"])):
        src = outs["legacy_tp2"] if name == "llama" else moe["mixtral_legacy"]
        saved[name] = root / name
        (saved[name] / "release").mkdir(parents=True)
        (saved[name] / "latest_checkpointed_iteration.txt").write_text("release")
        files[name] = []
        for r in ranks:
            files[name].append(root / f"{name}_{r}.pt")
            torch.save(
                torch.load(src / "release" / r / "model_optim_rng.pt", weights_only=True)["model"], files[name][-1]
            )
    tasks = [
        Load(outs["td_tp1"] / "release", _arch(), 1),
        Load(outs["td_tp2pp2"] / "release", _arch(), 2),
        Load(moe["mixtral"] / "release", _moe_arch("mixtral"), 1, 2),
        Save(files["llama"], saved["llama"] / "release", _arch(), 2),
        Save(files["mixtral"], saved["mixtral"] / "release", _moe_arch("mixtral"), 1, 2),
    ]
    tp1, tp2, mixtral, _, _ = run_megatron(tasks, TOKENS)
    return {"logits": {"tp1": tp1, "tp2": tp2, "mixtral": mixtral}, "saved": saved}


@pytest.mark.oracle
def test_megatron_core_loads_it_strictly_with_transformers_logits(megatron: dict, llama: Path) -> None:
    """dist_checkpointing.load into GPTModel, load_state_dict(strict=True), at TP 1 and TP 2."""
    from tests.fixtures.tiny_llm import tiny_llm_model

    model, _ = tiny_llm_model(llama)
    with torch.no_grad():
        want = model(input_ids=torch.tensor([TOKENS])).logits[0]
    for tp in ("tp1", "tp2"):
        torch.testing.assert_close(megatron["logits"][tp], want, rtol=0, atol=1e-5)


@pytest.mark.oracle
def test_megatron_core_save_reads_back_to_the_original_hf(
    megatron: dict, outs: dict[str, Path], llama: Path, tmp_path: Path
) -> None:
    """dist_checkpointing.save of our legacy TP 2 output loaded into GPTModel: the same index as ours (but the
    final norm's extra state, which only TE's norm asks for), and mm_to_hf gives the HF files byte for byte."""
    saved = megatron["saved"]["llama"]
    assert sorted(p.name for p in (saved / "release").iterdir()) == [
        ".metadata", "__0_0.distcp", "__0_1.distcp", "__1_0.distcp", "__1_1.distcp", "common.pt", "metadata.json",
    ]  # fmt: skip
    assert (saved / "release" / "metadata.json").read_bytes() == CONFIG_JSON
    theirs, ours = _structure(_index(saved / "release")), _structure(_index(outs["td_tp2pp2"] / "release"))
    assert theirs[0] == ours[0] == _expected_chunks(2)
    assert theirs[1] == ours[1] - {"decoder.final_layernorm._extra_state/shard_0_1"}
    out = mm_to_hf(llama, saved, tmp_path / "hf")
    for f in llama.glob("*.safetensors"):
        assert filecmp.cmp(f, out / f.name, shallow=False), f.name


def test_training_state_is_read_past(td_copy: Path, llama: Path, tmp_path: Path) -> None:
    """A trained checkpoint's index also lists RNG state (bytes) and optimizer state (tensors): never read."""
    path = td_copy / "release" / ".metadata"
    md = pickle.loads(path.read_bytes())
    key = next(k for k in md.storage_data if k.fqn == "decoder.final_layernorm.weight")
    extra = next(k for k in md.storage_data if k.fqn.endswith("_extra_state/shard_0_4"))
    opt = "optimizer.state.exp_avg.decoder.final_layernorm.weight"
    md.state_dict_metadata[opt] = md.state_dict_metadata[key.fqn]
    md.storage_data[dataclasses.replace(key, fqn=opt)] = md.storage_data[key]
    md.state_dict_metadata["rng_state/shard_0.0_1.2"] = md.state_dict_metadata[extra.fqn]
    md.storage_data[dataclasses.replace(extra, fqn="rng_state/shard_0.0_1.2")] = md.storage_data[extra]
    path.write_bytes(pickle.dumps(md))
    out = mm_to_hf(llama, td_copy, tmp_path / "hf")
    for f in llama.glob("*.safetensors"):
        assert filecmp.cmp(f, out / f.name, shallow=False), f.name


def test_format_dcp_is_hf_to_dcp(outs: dict[str, Path], llama: Path, tmp_path: Path) -> None:
    """hf_to_mm --cfg.format dcp writes what hf_to_dcp writes (the layout is not used); resplit writes no DCP."""
    a = hf_to_mm(llama, tmp_path / "a", 2, [2, 2], "dcp")
    b = convert("hf_to_dcp", {"dcp_dir": str(tmp_path / "b"), "hf_config": {"hf_dir": str(llama)}}, tmp_path / "b")
    _same_tree(a, b)
    with pytest.raises(ConvertError) as e:
        resplit(llama, outs["legacy_tp2"], tmp_path / "c", 1, [4], "dcp")
    assert str(e.value) == "format = dcp: resplit writes legacy or torch_dist"


# ---------------------------------------------------------------------------------------
# MoE: an expert axis after the layer axis; mixed dense / MoE layers are not stacked


E = 4


def _moe_arch(family: str = "mixtral"):
    """Mixtral's. (Qwen3-MoE's, with moe_layer_freq [1, 0, 1, 1], was loaded and checked the same way by hand.)"""
    from mmtui.megatron_logits import GPTArch

    return GPTArch(
        num_layers=L, hidden_size=HIDDEN, num_attention_heads=HEADS, num_query_groups=GROUPS, ffn_hidden_size=FFN,
        vocab_size=VOCAB, rotary_base=1e6, norm_epsilon=1e-6, add_qkv_bias=False, tied=False, num_moe_experts=E,
        moe_router_topk=2, moe_ffn_hidden_size=FFN,
    )  # fmt: skip


def _moe_cfg(hf: Path, out: Path, fmt: str, **extra: object) -> dict:
    layout = {"ep_size": 2, "llm_pp_layers": [[L]]}
    return {"mm_dir": str(out), "hf_config": {"hf_dir": str(hf)}, "parallel_config": layout, "format": fmt, **extra}


@pytest.fixture(scope="module")
def moe(tiny_llms: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("torch_dist_moe")
    out = {}
    for name, converter in (("mixtral", "MixtralConverter"), ("qwen3_moe", "Qwen3MoeConverter")):
        out[name] = convert("hf_to_mm", _moe_cfg(tiny_llms[name], root / name, "torch_dist"), root / name, converter)
    out["mixtral_legacy"] = root / "mixtral_legacy"
    convert(
        "hf_to_mm",
        _moe_cfg(tiny_llms["mixtral"], out["mixtral_legacy"], "legacy"),
        out["mixtral_legacy"],
        "MixtralConverter",
    )
    return out


def test_moe_layout(moe: dict[str, Path], tiny_llms: dict[str, Path], tmp_path: Path) -> None:
    it = moe["mixtral"] / "release"
    assert sorted(p.name for p in it.iterdir()) == [
        ".metadata",
        "__0_0.distcp",
        "__1_0.distcp",
        "common.pt",
        "metadata.json",
    ]
    md = _index(it)
    tensors, objects = _structure(md)
    experts = "decoder.layers.mlp.experts.experts."
    assert {k: md.state_dict_metadata[k].size for k in tensors if k.startswith(experts)} == {
        experts + "linear_fc1.weight": (L, E, 2 * FFN, HIDDEN),
        experts + "linear_fc2.weight": (L, E, HIDDEN, FFN),
    }
    assert tensors[experts + "linear_fc1.weight"] == sorted(
        ((layer, e, half * FFN, 0), (1, 1, FFN, HIDDEN)) for layer in range(L) for e in range(E) for half in (0, 1)
    )
    assert tensors["decoder.layers.mlp.router.weight"] == [((layer, 0, 0), (1, E, HIDDEN)) for layer in range(L)]
    # the local spec saves an MoE layer's pre-MLP norm under the fc1 name all the same
    assert "decoder.layers.mlp.linear_fc1.layer_norm_weight" in tensors
    assert not any("pre_mlp_layernorm" in k for k in tensors)
    expert_objects = {k for k in objects if k.startswith(experts)}
    assert expert_objects == {
        f"{experts}linear_fc{i}._extra_state/shard_{layer}.{e}_{L}.{E}"
        for i in (1, 2)
        for layer in range(L)
        for e in range(E)
    }
    files = {
        v.relative_path
        for k, v in md.storage_data.items()
        if k.fqn == experts + "linear_fc2.weight" and k.offset[1] >= 2
    }
    assert files == {"__1_0.distcp"}  # experts 2 and 3 on EP rank 1
    w = {k: v for f in sorted(tiny_llms["mixtral"].glob("*.safetensors")) for k, v in load_file(f).items()}
    got = _dcp_tensors(it)[experts + "linear_fc1.weight"]
    p = "model.layers.{}.block_sparse_moe.experts.{}."
    want = torch.stack([
        torch.stack([torch.cat([w[p.format(i, e) + "w1.weight"], w[p.format(i, e) + "w3.weight"]]) for e in range(E)])
        for i in range(L)
    ])  # fmt: skip
    assert torch.equal(got, want)

    # dense and MoE layers mixed: each layer its own tensors, experts still on an axis
    tensors, _ = _structure(_index(moe["qwen3_moe"] / "release"))
    assert "decoder.layers.1.mlp.linear_fc1.weight" in tensors and "decoder.layers.mlp.router.weight" not in tensors
    assert tensors["decoder.layers.0.mlp.experts.experts.linear_fc2.weight"] == [
        ((e, 0, 0), (1, HIDDEN, 48)) for e in range(E)
    ]


@pytest.mark.parametrize("impl", ["local", "transformer_engine"])
def test_moe_back_to_hf_and_to_legacy(
    moe: dict[str, Path], tiny_llms: dict[str, Path], tmp_path: Path, impl: str
) -> None:
    """Transformer Engine's spec keeps an MoE layer's pre_mlp_layernorm: written so with that impl, read either way."""
    hf = tiny_llms["mixtral"]
    src = moe["mixtral"]
    if impl != "local":
        src = convert(
            "hf_to_mm",
            _moe_cfg(hf, tmp_path / "te", "torch_dist", transformer_impl=impl),
            tmp_path / "te",
            "MixtralConverter",
        )
        assert "decoder.layers.pre_mlp_layernorm.weight" in _index(src / "release").state_dict_metadata
    out = convert(
        "mm_to_hf",
        {"mm_dir": str(src), "save_hf_dir": str(tmp_path / "hf"), "hf_config": {"hf_dir": str(hf)}},
        tmp_path / "hf",
        "MixtralConverter",
    )
    for f in hf.glob("*.safetensors"):
        assert filecmp.cmp(f, out / f.name, shallow=False), f.name
    cfg = {"source_dir": str(src), "target_dir": str(tmp_path / "legacy"), "hf_config": {"hf_dir": str(hf)}}
    cfg["target_parallel_config"] = {"ep_size": 2, "llm_pp_layers": [[L]]}
    _same_tree(
        moe["mixtral_legacy"],
        convert("resplit", cfg | {"transformer_impl": "local"}, tmp_path / "legacy", "MixtralConverter"),
    )


@pytest.mark.oracle
def test_megatron_core_loads_moe_and_its_save_reads_back(
    megatron: dict, moe: dict[str, Path], tiny_llms: dict[str, Path], tmp_path: Path
) -> None:
    from tests.fixtures.tiny_llm import tiny_llm_model

    model, _ = tiny_llm_model(tiny_llms["mixtral"])
    with torch.no_grad():
        want = model(input_ids=torch.tensor([TOKENS])).logits[0]
    torch.testing.assert_close(megatron["logits"]["mixtral"], want, rtol=0, atol=1e-5)
    saved = megatron["saved"]["mixtral"]
    theirs, ours = _structure(_index(saved / "release")), _structure(_index(moe["mixtral"] / "release"))
    assert theirs[0] == ours[0]
    assert theirs[1] == ours[1] - {"decoder.final_layernorm._extra_state/shard_0_1"}
    hf = tiny_llms["mixtral"]
    out = convert(
        "mm_to_hf",
        {"mm_dir": str(saved), "save_hf_dir": str(tmp_path / "hf"), "hf_config": {"hf_dir": str(hf)}},
        tmp_path / "hf",
        "MixtralConverter",
    )
    for f in hf.glob("*.safetensors"):
        assert filecmp.cmp(f, out / f.name, shallow=False), f.name


# ---------------------------------------------------------------------------------------
# bad input


@pytest.fixture
def td_copy(outs: dict[str, Path], tmp_path: Path) -> Path:
    dst = tmp_path / "td"
    shutil.copytree(outs["td_tp2pp2"], dst)
    return dst


def _read_error(llama: Path, src: Path, tmp_path: Path) -> str:
    with pytest.raises(ConvertError) as e:
        prepare(
            _job(
                "mm_to_hf",
                {"mm_dir": str(src), "save_hf_dir": str(tmp_path / "o"), "hf_config": {"hf_dir": str(llama)}},
            )
        )
    assert "\n" not in str(e.value)
    return str(e.value)


def test_missing_index(td_copy: Path, llama: Path, tmp_path: Path) -> None:
    (td_copy / "release" / ".metadata").unlink()
    assert _read_error(llama, td_copy, tmp_path) == (
        f"{td_copy}/release: metadata.json says torch_dist but its index .metadata is missing"
    )


def test_wrong_metadata_json(td_copy: Path, llama: Path, tmp_path: Path) -> None:
    (td_copy / "release" / "metadata.json").write_text('{"sharded_backend": "zarr", "sharded_backend_version": 1}')
    assert _read_error(llama, td_copy, tmp_path) == (
        f'{td_copy}/release/metadata.json: {{"sharded_backend": "zarr", "sharded_backend_version": 1}}; mmtui '
        "reads Megatron-Core's torch_dist checkpoints, whose metadata.json is " + CONFIG_JSON.decode()
    )


def test_index_without_metadata_json(td_copy: Path, llama: Path, tmp_path: Path) -> None:
    (td_copy / "release" / "metadata.json").unlink()
    msg = _read_error(llama, td_copy, tmp_path)
    assert msg.startswith(f"{td_copy}/release: holds a torch DCP index (.metadata) but no metadata.json")


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_index_with_a_forbidden_global_is_refused_and_never_run(td_copy: Path, llama: Path, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    (td_copy / "release" / ".metadata").write_bytes(pickle.dumps({"x": _Evil(marker)}))
    r = mm_convert(
        "LlamaConverter", "mm_to_hf", "--cfg.mm_dir", str(td_copy), "--cfg.save_hf_dir", str(tmp_path / "out"),
        "--cfg.hf_config.hf_dir", str(llama),
    )  # fmt: skip
    _bad(r, f"{td_copy}/release/.metadata: refusing to unpickle posix.system", "nothing was executed")
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_hostile_index_entries(td_copy: Path, llama: Path, tmp_path: Path) -> None:
    """A chunk stored outside the directory, a truncated data file, a tensor the model does not have."""
    path = td_copy / "release" / ".metadata"
    good = path.read_bytes()
    md = pickle.loads(good)
    key = next(k for k in md.storage_data if k.fqn == "decoder.final_layernorm.weight")
    md.storage_data[key].relative_path = "../../etc/passwd"
    path.write_bytes(pickle.dumps(md))
    assert _read_error(llama, td_copy, tmp_path) == (
        f"{path}: decoder.final_layernorm.weight is stored in '../../etc/passwd'; expected a file name in "
        f"{td_copy}/release"
    )
    md = pickle.loads(good)
    md.state_dict_metadata["decoder.layers.mlp.router.weight"] = md.state_dict_metadata[
        "decoder.final_layernorm.weight"
    ]
    md.storage_data[dataclasses.replace(key, fqn="decoder.layers.mlp.router.weight")] = md.storage_data[key]
    path.write_bytes(pickle.dumps(md))
    assert "decoder.layers.mlp.router.weight is on disk but not in the model" in _read_error(llama, td_copy, tmp_path)
    path.write_bytes(good)
    data = td_copy / "release" / "__3_0.distcp"
    os.truncate(data, data.stat().st_size // 2)
    assert "past its end (truncated?)" in _read_error(llama, td_copy, tmp_path)


def test_read_without_a_layout_and_as_the_right_model(
    outs: dict[str, Path], tiny_llms: dict[str, Path], tmp_path: Path
) -> None:
    src = outs["td_tp2pp2"]
    cfg = {"mm_dir": str(src), "save_hf_dir": str(tmp_path / "o"), "hf_config": {"hf_dir": str(tiny_llms["llama"])}}
    with pytest.raises(ConvertError) as e:
        prepare(_job("mm_to_hf", cfg | {"parallel_config": {"tp_size": 2, "llm_pp_layers": [[1, 3]]}}))
    assert str(e.value) == (
        f"mm_dir {src}: a torch_dist checkpoint, whose tensors do not depend on a layout; leave the source "
        "parallel_config out (it is read from the disk)"
    )
    cfg["hf_config"] = {"hf_dir": str(tiny_llms["qwen3"])}  # q/k norms and a head size of 32: not this checkpoint
    with pytest.raises(ConvertError) as e:
        prepare(_job("mm_to_hf", cfg, "Qwen3Converter"))
    assert str(e.value) == (
        f"mm_dir {src}: decoder.layers.self_attention.linear_qkv.weight has shape [4, 128, 64] on disk, the model "
        "(decoder.layers.0.self_attention.linear_qkv.weight [256, 64]) expects [4, 256, 64]"
    )


def test_writer_refuses_what_it_cannot_write(tiny_llms: dict[str, Path], tmp_path: Path) -> None:
    """(Multi-latent attention, multimodal models and their refusals: test_torch_dist_mla.py, test_torch_dist_vlm.py.)"""

    def err(converter: str, hf: Path, **layout: object) -> str:
        cfg = {"mm_dir": str(tmp_path / "o"), "hf_config": {"hf_dir": str(hf)}, "format": "torch_dist"}
        cfg["parallel_config"] = {"llm_pp_layers": [[4]], **layout}
        with pytest.raises(ConvertError) as e:
            prepare(_job("hf_to_mm", cfg, converter))
        return str(e.value)

    assert err("LlamaConverter", tiny_llms["llama"], llm_pp_layers=[[3, 2]], noop_layers=[2]) == (
        "format = torch_dist: parallel_config.noop_layers [2] are MindSpeed-LLM's; Megatron-Core's torch_dist has "
        "no empty layers"
    )
    assert err("MixtralConverter", tiny_llms["mixtral"], moe_grouped_gemm="te") == (
        "format = torch_dist: parallel_config.moe_grouped_gemm = te is a rank-file layout; torch_dist stores experts "
        "one by one on an expert axis whatever the training used (Megatron-Core's GroupedMLP saves them so): leave "
        "moe_grouped_gemm out"
    )
    assert not (tmp_path / "o").exists()
    assert json.loads(CONFIG_JSON)  # the expected metadata.json is itself valid JSON
