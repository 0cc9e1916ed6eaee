"""torch_dist of a vision-language model (Qwen2-VL; Qwen2.5-VL through the same preset machinery), as
MindSpeed-MM's VLMModel saves it with `--ckpt-format torch_dist`: each module's own sharded state dict under
its prefix. `text_decoder.` is megatron-core's GPTModel (MMGPTModel: the same names, its layer spec's keys map
renaming the norms); the vision layers are a TransformerBlock under `image_encoder.encoder.blocks.`, stacked on
their own layer axis, their norms under their own names (qwen2vl_layer_spec.py's vision spec has no keys map);
the patch embedding and projector are plain module names. Each module is split at its own TP size."""

from __future__ import annotations

import filecmp
from pathlib import Path

import pytest
import torch

from engine.errors import ConvertError
from engine.job import prepare
from tests.engine.test_torch_dist import _dcp_tensors, _index, _job, _same_tree, _structure, convert
from tests.fixtures.tiny_vlm import legacy_name, load_hf_state

TOKENS = [3, 17, 99, 5, 42, 7, 64, 127, 0, 11, 23, 88]
L, VL, HEADS, VD = 4, 3, 4, 8  # text layers; vision layers, heads, head size (tests/fixtures/tiny_vlm.py)
VIT = "image_encoder.encoder.blocks."
CONVERTER = "Qwen2VLConverter"


def _cfg(hf: Path, out: Path, fmt: str, tp: int, llm: list, vit: list, vit_tp: int | None = None) -> dict:
    layout = {"tp_size": tp, "llm_pp_layers": llm, "vit_pp_layers": vit, "vit_tp_size": vit_tp}
    return {"mm_dir": str(out), "hf_config": {"hf_dir": str(hf)}, "parallel_config": layout, "format": fmt}


LAYOUTS = {  # name: format, tp, llm_pp_layers, vit_pp_layers, vit_tp_size
    "td_split": ("torch_dist", 2, [1, 3], [3, 0], None),  # TP 2, PP 2: the vision encoder on stage 0
    "td_hetero": ("torch_dist", 2, [4], [3], 1),  # the vision encoder at TP 1, repeated over the TP group
    "legacy_hetero": ("legacy", 2, [4], [3], 1),
    "td_vpp": ("torch_dist", 1, [[1, 1], [1, 1]], [[2, 1], [0, 0]], None),  # VPP 2: one global layer axis
}


def outputs(qwen2vl_dir: Path, root: Path) -> dict[str, Path]:
    """The `vlm` fixture (tests/engine/conftest.py): our conversions of the tiny Qwen2-VL."""
    out = {}
    for name, (fmt, tp, llm, vit, vit_tp) in LAYOUTS.items():
        out[name] = convert(
            "hf_to_mm", _cfg(qwen2vl_dir, root / name, fmt, tp, llm, vit, vit_tp), root / name, CONVERTER
        )
    return out


def _per_head(t: torch.Tensor) -> torch.Tensor:
    """HF's vision qkv [all q; all k; all v] as MindSpeed-MM's [q_h; k_h; v_h] per head."""
    q, k, v = t.chunk(3)
    return torch.cat([x for h in range(HEADS) for x in (q[h * VD : (h + 1) * VD], k[h * VD : (h + 1) * VD],
                                                        v[h * VD : (h + 1) * VD])])  # fmt: skip


def _naive_global(hf: Path) -> dict[str, torch.Tensor]:
    """The global tensors built from the HF weights by hand."""
    w = {legacy_name(k): v for k, v in load_hf_state(hf).items()}
    out = {
        "text_decoder.embedding.word_embeddings.weight": w["model.embed_tokens.weight"],
        "text_decoder.output_layer.weight": w["lm_head.weight"],
        "text_decoder.decoder.final_layernorm.weight": w["model.norm.weight"],
        "image_encoder.encoder.patch_embed.proj.weight": w["visual.patch_embed.proj.weight"],
    }
    for p in ("weight", "bias"):
        out[f"image_encoder.projector.layernorm.{p}"] = w[f"visual.merger.ln_q.{p}"]
        out[f"image_encoder.projector.encoder.linear_fc1.{p}"] = w[f"visual.merger.mlp.0.{p}"]
        out[f"image_encoder.projector.encoder.linear_fc2.{p}"] = w[f"visual.merger.mlp.2.{p}"]

    def stack(fn, n: int) -> torch.Tensor:
        return torch.stack([fn(i) for i in range(n)])

    def qkv(i: int, p: str) -> torch.Tensor:  # grouped per KV group: 2 query heads, k, v of 16 rows each
        q, k, v = (w[f"model.layers.{i}.self_attn.{n}_proj.{p}"] for n in "qkv")
        return torch.cat([t for g in range(2) for t in (q[g * 32 : (g + 1) * 32], k[g * 16 : (g + 1) * 16],
                                                       v[g * 16 : (g + 1) * 16])])  # fmt: skip

    t = "text_decoder.decoder.layers."
    out[t + "self_attention.linear_qkv.layer_norm_weight"] = stack(
        lambda i: w[f"model.layers.{i}.input_layernorm.weight"], L
    )
    out[t + "mlp.linear_fc1.layer_norm_weight"] = stack(
        lambda i: w[f"model.layers.{i}.post_attention_layernorm.weight"], L
    )
    out[t + "self_attention.linear_qkv.weight"] = stack(lambda i: qkv(i, "weight"), L)
    out[t + "self_attention.linear_qkv.bias"] = stack(lambda i: qkv(i, "bias"), L)
    out[t + "self_attention.linear_proj.weight"] = stack(lambda i: w[f"model.layers.{i}.self_attn.o_proj.weight"], L)
    out[t + "mlp.linear_fc1.weight"] = stack(
        lambda i: torch.cat([w[f"model.layers.{i}.mlp.gate_proj.weight"], w[f"model.layers.{i}.mlp.up_proj.weight"]]), L
    )
    out[t + "mlp.linear_fc2.weight"] = stack(lambda i: w[f"model.layers.{i}.mlp.down_proj.weight"], L)

    def vis(hf_module: str, p: str, fn=lambda t: t) -> torch.Tensor:
        return torch.stack([fn(w[f"visual.blocks.{i}.{hf_module}.{p}"]) for i in range(VL)])

    v = VIT + "layers."
    for p in ("weight", "bias"):
        out[f"{v}input_layernorm.{p}"] = vis("norm1", p)
        out[f"{v}pre_mlp_layernorm.{p}"] = vis("norm2", p)
        out[f"{v}self_attention.linear_qkv.{p}"] = vis("attn.qkv", p, _per_head)
        out[f"{v}self_attention.linear_proj.{p}"] = vis("attn.proj", p)
        out[f"{v}mlp.linear_fc1.{p}"] = vis("mlp.fc1", p)
        out[f"{v}mlp.linear_fc2.{p}"] = vis("mlp.fc2", p)
    return out


def _expected_objects() -> set[str]:
    text = ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2")
    out = {f"text_decoder.decoder.layers.{m}._extra_state/shard_{i}_{L}" for m in text for i in range(L)}
    out |= {f"{VIT}layers.{m}._extra_state/shard_{i}_{VL}" for m in text for i in range(VL)}
    out |= {f"image_encoder.projector.encoder.linear_fc{i}._extra_state/shard_0_1" for i in (1, 2)}
    return out | {"text_decoder.decoder.final_layernorm._extra_state/shard_0_1"}


def test_global_tensors_are_mindspeed_mms(vlm: dict[str, Path], qwen2vl_dir: Path) -> None:
    want = _naive_global(qwen2vl_dir)
    for name in ("td_split", "td_hetero", "td_vpp"):
        it = vlm[name] / "release"
        got = _dcp_tensors(it)  # torch's own DCP reader
        assert sorted(got) == sorted(want), name
        for k in want:
            assert torch.equal(got[k], want[k]), (name, k)
        assert _structure(_index(it))[1] == _expected_objects(), name
    split, _ = _structure(_index(vlm["td_split"] / "release"))
    hetero, _ = _structure(_index(vlm["td_hetero"] / "release"))
    qkv = VIT + "layers.self_attention.linear_qkv.weight"  # 4 heads of [q; k; v] x 8 rows: 2 heads per TP rank
    assert split[qkv] == [((i, r * 48, 0), (1, 48, 32)) for i in range(VL) for r in (0, 1)]
    assert hetero[qkv] == [((i, 0, 0), (1, 96, 32)) for i in range(VL)]  # vit_tp_size 1: one chunk per layer
    fc1 = "text_decoder.decoder.layers.mlp.linear_fc1.weight"
    assert (
        split[fc1]
        == hetero[fc1]
        == sorted(((i, h * 128 + r * 64, 0), (1, 64, 64)) for i in range(L) for h in (0, 1) for r in (0, 1))
    )
    files = {v.relative_path for k, v in _index(vlm["td_split"] / "release").storage_data.items() if k.fqn == qkv}
    assert files == {"__0_0.distcp", "__1_0.distcp"}  # stage 0's two TP ranks


def test_plan_notes_say_what_is_written(qwen2vl_dir: Path, tmp_path: Path) -> None:
    _, plan = prepare(_job("hf_to_mm", _cfg(qwen2vl_dir, tmp_path / "o", "torch_dist", 2, [1, 3], [3, 0]), CONVERTER))
    assert (
        "Megatron-Core torch_dist: image_encoder.encoder.blocks.layers: 3 layers stacked; text_decoder.decoder.layers: "
        "4 layers stacked; one .distcp file per TP x PP x EP rank"
    ) in plan.notes


def test_way_back_to_hf(vlm: dict[str, Path], qwen2vl_dir: Path, tmp_path: Path) -> None:
    for name in ("td_split", "td_hetero"):
        cfg = {"mm_dir": str(vlm[name]), "save_hf_dir": str(tmp_path / name), "hf_config": {"hf_dir": str(qwen2vl_dir)}}
        out = convert("mm_to_hf", cfg, tmp_path / name, CONVERTER)
        for f in qwen2vl_dir.glob("*.safetensors"):
            assert filecmp.cmp(f, out / f.name, shallow=False), (name, f.name)


def test_legacy_to_torch_dist_and_back(vlm: dict[str, Path], qwen2vl_dir: Path, tmp_path: Path) -> None:
    """Hetero vit_tp_size both ways: the same bytes as written from HF, and back to the same rank files."""
    hf = {"hf_dir": str(qwen2vl_dir)}
    layout = {"tp_size": 2, "llm_pp_layers": [[4]], "vit_pp_layers": [[3]], "vit_tp_size": 1}
    cfg = {"source_dir": str(vlm["legacy_hetero"]), "target_dir": str(tmp_path / "td"), "hf_config": hf}
    td = convert(
        "resplit", cfg | {"format": "torch_dist", "target_parallel_config": layout}, tmp_path / "td", CONVERTER
    )
    _same_tree(td, vlm["td_hetero"])
    cfg = {"source_dir": str(vlm["td_split"]), "target_dir": str(tmp_path / "back"), "hf_config": hf}
    back = convert(
        "resplit", cfg | {"format": "legacy", "target_parallel_config": layout}, tmp_path / "back", CONVERTER
    )
    _same_tree(back, vlm["legacy_hetero"])


def test_qwen2_5_vl_round_trip(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    """Gated vision MLP and RMSNorms, nested config, new key spelling: back to the same HF files."""
    hf = tiny_dirs["qwen2_5_vl"]
    td = convert(
        "hf_to_mm", _cfg(hf, tmp_path / "td", "torch_dist", 2, [2, 2], [3, 0]), tmp_path / "td", "Qwen2_5_VLConverter"
    )
    tensors, _ = _structure(_index(td / "release"))
    fc1 = VIT + "layers.mlp.linear_fc1.weight"  # [gate; up]: each rank's gate block and up block
    assert tensors[fc1] == sorted(
        ((i, h * 64 + r * 32, 0), (1, 32, 32)) for i in range(VL) for h in (0, 1) for r in (0, 1)
    )
    cfg = {"mm_dir": str(td), "save_hf_dir": str(tmp_path / "hf"), "hf_config": {"hf_dir": str(hf)}}
    out = convert("mm_to_hf", cfg, tmp_path / "hf", "Qwen2_5_VLConverter")
    for f in hf.glob("*.safetensors"):
        assert filecmp.cmp(f, out / f.name, shallow=False), f.name


def _internvl_error(hf: Path, out: Path, tp: int, vit_tp: int | None) -> str:
    cfg = {"mm_dir": str(out), "hf_config": {"hf_dir": str(hf)}, "format": "torch_dist"}
    cfg["parallel_config"] = {"tp_size": tp, "vit_tp_size": vit_tp, "llm_pp_layers": [[4]], "vit_pp_layers": [[3]]}
    with pytest.raises(ConvertError) as e:
        prepare(_job("hf_to_mm", cfg, "InternVLConverter"))
    assert not out.exists()
    return str(e.value)


def test_splits_no_parallel_linear_holds_are_refused(tiny_internvls: dict[str, Path], tmp_path: Path) -> None:
    """InternViT's qkv is [q; k; v], each block split in whole heads; a vocabulary of 130 rows over 4 ranks is
    uneven: neither is a ColumnParallelLinear's (or VocabParallelEmbedding's) row split."""
    assert _internvl_error(tiny_internvls["llama"], tmp_path / "o", 2, None) == (
        "format = torch_dist: image_encoder.encoder.encoder.layers.0.self_attention.linear_qkv.weight is split over 2 "
        "TP ranks in [q; k; v] blocks of 6 heads, which no Megatron-Core parallel linear holds (use format legacy)"
    )
    assert _internvl_error(tiny_internvls["qwen2"], tmp_path / "o", 4, 1) == (
        "format = torch_dist: text_decoder.embedding.word_embeddings.weight is split over 4 TP ranks in uneven rows, "
        "which no Megatron-Core parallel linear holds (use format legacy)"
    )


def test_internvl_with_an_unsplit_vision_encoder(tiny_internvls: dict[str, Path], tmp_path: Path) -> None:
    """At vit_tp_size 1 InternViT is not split, and 130 vocabulary rows divide by TP 2: written, read back."""
    hf = tiny_internvls["qwen2"]
    cfg = {"mm_dir": str(tmp_path / "td"), "hf_config": {"hf_dir": str(hf)}, "format": "torch_dist"}
    cfg["parallel_config"] = {"tp_size": 2, "vit_tp_size": 1, "llm_pp_layers": [[2, 2]], "vit_pp_layers": [[3, 0]]}
    td = convert("hf_to_mm", cfg, tmp_path / "td", "InternVLConverter")
    cfg = {"mm_dir": str(td), "save_hf_dir": str(tmp_path / "hf"), "hf_config": {"hf_dir": str(hf)}}
    out = convert("mm_to_hf", cfg, tmp_path / "hf", "InternVLConverter")
    for f in hf.glob("*.safetensors"):
        assert filecmp.cmp(f, out / f.name, shallow=False), f.name


def test_omni_with_audio_and_a_zero_k_bias(tmp_path: Path) -> None:
    """Qwen2.5-Omni: three modules (the audio encoder at its own TP), Whisper's fused qkv bias whose k rows are
    zeros by layout (checked zero on the way back): written and read back to the same HF files."""
    from tests.fixtures.tiny_omni import build_tiny_omni

    hf = build_tiny_omni(tmp_path / "omni")
    cfg = {"mm_dir": str(tmp_path / "td"), "hf_config": {"hf_dir": str(hf)}, "format": "torch_dist"}
    layout = {
        "tp_size": 2,
        "audio_tp_size": 1,
        "llm_pp_layers": [[3]],
        "vit_pp_layers": [[2]],
        "audio_pp_layers": [[3]],
    }
    td = convert("hf_to_mm", cfg | {"parallel_config": layout}, tmp_path / "td", "Qwen2_5_OmniConverter")
    tensors, _ = _structure(_index(td / "release"))
    audio = [k for k in tensors if k.startswith("audio_encoder.") and ".layers." in k]
    assert audio and all(len(tensors[k]) == 3 for k in audio)  # stacked, one chunk per layer (audio at TP 1)
    cfg = {"mm_dir": str(td), "save_hf_dir": str(tmp_path / "hf"), "hf_config": {"hf_dir": str(hf)}}
    out = convert("mm_to_hf", cfg, tmp_path / "hf", "Qwen2_5_OmniConverter")
    for f in hf.glob("*.safetensors"):
        assert filecmp.cmp(f, out / f.name, shallow=False), f.name


def oracle_tasks(vlm: dict[str, Path]) -> list:
    """megatron-core's loads (run with the MLA model's in one start of megatron-core: tests/engine/conftest.py)."""
    from mmtui.megatron_logits import GPTArch
    from tests.fixtures.megatron_dist import Load, LoadBlock

    arch = GPTArch(
        num_layers=L, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128, vocab_size=128,
        rotary_base=1e6, norm_epsilon=1e-6, add_qkv_bias=True, tied=False,
    )  # fmt: skip
    block = {"num_layers": VL, "hidden_size": 32, "num_attention_heads": HEADS, "ffn_hidden_size": 64}
    split, hetero = vlm["td_split"] / "release", vlm["td_hetero"] / "release"
    return [
        Load(split, arch, 1, prefix="text_decoder."),
        Load(hetero, arch, 2, prefix="text_decoder."),
        LoadBlock(split, VIT, block, 2),
        LoadBlock(hetero, VIT, block, 1),
    ]


@pytest.mark.oracle
def test_megatron_core_loads_each_module_strictly(qwen2vl_dir: Path, td_oracle: dict) -> None:
    """The text decoder into GPTModel (sharded_state_dict(prefix="text_decoder.")), load_state_dict(strict=True),
    transformers' text-only logits (all mrope sections at the same position: plain rope) at TP 1 and TP 2; the
    vision layers into a TransformerBlock (prefix image_encoder.encoder.blocks.) strictly, each rank's tensors
    the HF ones, at TP 2 and (from the vit_tp_size 1 checkpoint) TP 1."""
    from tests.fixtures.tiny_vlm import tiny_text_model

    tp1, tp2, vit_tp2, vit_tp1 = td_oracle["vlm"]
    model, _ = tiny_text_model(qwen2vl_dir)
    with torch.no_grad():
        want = model(input_ids=torch.tensor([TOKENS])).logits[0]
    torch.testing.assert_close(tp1, want, rtol=0, atol=1e-5)
    torch.testing.assert_close(tp2, want, rtol=0, atol=1e-5)

    full = _naive_global(qwen2vl_dir)
    for tp, ranks in ((2, vit_tp2), (1, vit_tp1)):
        for r, state in enumerate(ranks):
            want_rank = {}
            for i in range(VL):
                for key, t in full.items():
                    if key.startswith(VIT + "layers."):
                        local = f"layers.{i}." + key[len(VIT + "layers.") :]
                        x = t[i]
                        if tp > 1 and ("linear_qkv." in key or "linear_fc1." in key):
                            x = x.chunk(tp)[r]  # ColumnParallelLinear: rows, bias too
                        elif tp > 1 and key.endswith(("linear_proj.weight", "linear_fc2.weight")):
                            x = x.chunk(tp, dim=1)[r]  # RowParallelLinear: columns; its bias whole
                        want_rank[local] = x
            assert sorted(state) == sorted(want_rank), (tp, r)
            for k in want_rank:
                assert torch.equal(state[k], want_rank[k]), (tp, r, k)
