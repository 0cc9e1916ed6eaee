"""Qwen3-VL and Qwen3-VL-MoE (MindSpeed-MM's Qwen3VLMegatronConverter): layout, round trips, re-split, logits.

The expected rank files come from a naive reference written here from MindSpeed-MM's own rules
(github.com/Ascend/MindSpeed-MM, checkpoint/vlm_model/converters/qwen3vl_megatron.py,
checkpoint/vlm_model/operator.py and checkpoint/vlm_model/hf_to_mm.py; lines cited below),
applied to whole tensors in memory, one step after another as the peer does.
"""

from __future__ import annotations

import filecmp
import json
import re
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from engine.errors import ConvertError
from engine.job import HfConfig, HfToDcpConfig, HfToMmConfig, Job, LoraConfig, MmToHfConfig
from engine.layout import ParallelConfig
from engine.planning.build import build_plan
from engine.run.verify import verify_job
from engine.source.hf_source import inspect_hf
from tests.engine.test_hf_to_mm import _assert_same, _load_dir
from tests.engine.test_llm_families import _assert_back_to_original, _convert, _hf_to_mm, _resplit
from tests.engine.test_way_back import _same_tree
from tests.fixtures.tiny_lora import build_peft_adapter, reference_merge
from tests.fixtures.tiny_qwen3_vl import build_tiny_qwen3_vl, load_state, tiny_model
from tests.test_cli import mm_convert

LAYOUTS = {
    # name: (tp, ep, vit_pp_layers, llm_pp_layers)
    "tp1": (1, 1, [[4]], [[4]]),
    "tp2": (2, 1, [[4]], [[4]]),
    "pp2": (1, 1, [[4, 0]], [[2, 2]]),  # vision on stage 0, the LLM over two stages
    "tp2_vit_split": (2, 1, [[2, 2]], [[1, 3]]),  # deepstack layer 3 goes to stage 1 as its layer 1
    "ep2": (1, 2, [[4]], [[4]]),
    "tp2ep2pp2": (2, 2, [[4, 0]], [[2, 2]]),
}
CASES = [
    ("qwen3_vl", "tp1"), ("qwen3_vl", "tp2"), ("qwen3_vl", "pp2"), ("qwen3_vl", "tp2_vit_split"),
    ("qwen3_vl_moe", "tp1"), ("qwen3_vl_moe", "tp2"), ("qwen3_vl_moe", "pp2"), ("qwen3_vl_moe", "ep2"),
    ("qwen3_vl_moe", "tp2ep2pp2"), ("qwen3_vl_moe", "tp2_vit_split"),
]  # fmt: skip


def _pc(name: str) -> ParallelConfig:
    tp, ep, vit, llm = LAYOUTS[name]
    return ParallelConfig(tp_size=tp, ep_size=ep, vit_pp_layers=vit, llm_pp_layers=llm)


@pytest.fixture(scope="module")
def hf(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Dense Qwen3-VL with tied embeddings (as the 2B/4B), one file; the MoE untied in two shards, layer 1 dense."""
    root = tmp_path_factory.mktemp("qwen3_vl")
    return {
        "qwen3_vl": build_tiny_qwen3_vl(root / "dense", "qwen3_vl", tied=True),
        "qwen3_vl_moe": build_tiny_qwen3_vl(root / "moe", "qwen3_vl_moe", tied=False, shards=2),
    }


@pytest.fixture(scope="module")
def converted(hf: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    """hf_to_mm of (family, layout), each written once for the module."""
    root, done = tmp_path_factory.mktemp("qwen3_vl_mm"), {}

    def get(family: str, layout: str) -> Path:
        if (family, layout) not in done:
            done[family, layout] = _hf_to_mm(hf[family], root / f"{family}-{layout}", _pc(layout))
        return done[family, layout]

    return get


# ---------------------------------------------------------------------------------------
# the naive reference: MindSpeed-MM's steps on whole tensors

# qwen3vl_megatron.py 21-54, 86-107: renames (vision, deepstack, language model)
RENAMES = [
    (r"model\.visual\.blocks\.(\d+)\.norm1\.", r"image_encoder.encoder.blocks.layers.\1.input_layernorm."),
    (r"model\.visual\.blocks\.(\d+)\.norm2\.", r"image_encoder.encoder.blocks.layers.\1.pre_mlp_layernorm."),
    (r"model\.visual\.blocks\.(\d+)\.attn\.qkv\.", r"image_encoder.encoder.blocks.layers.\1.self_attention.linear_qkv."),
    (r"model\.visual\.blocks\.(\d+)\.attn\.proj\.", r"image_encoder.encoder.blocks.layers.\1.self_attention.linear_proj."),
    (r"model\.visual\.blocks\.(\d+)\.mlp\.linear_fc", r"image_encoder.encoder.blocks.layers.\1.mlp.linear_fc"),
    (r"model\.visual\.patch_embed\.proj\.", "image_encoder.encoder.patch_embed.proj."),
    (r"model\.visual\.pos_embed\.", "image_encoder.encoder.pos_embed."),
    (r"model\.visual\.merger\.linear_fc", "image_encoder.projector.encoder.linear_fc"),
    (r"model\.visual\.merger\.norm\.", "image_encoder.projector.layernorm."),
    (r"model\.language_model\.layers\.(\d+)\.mlp\.gate\.weight", r"text_decoder.decoder.layers.\1.mlp.router.weight"),
    (r"model\.language_model\.layers\.(\d+)\.self_attn\.q_norm\.", r"text_decoder.decoder.layers.\1.self_attention.q_layernorm."),
    (r"model\.language_model\.layers\.(\d+)\.self_attn\.k_norm\.", r"text_decoder.decoder.layers.\1.self_attention.k_layernorm."),
    (r"model\.language_model\.layers\.(\d+)\.self_attn\.o_proj\.", r"text_decoder.decoder.layers.\1.self_attention.linear_proj."),
    (r"model\.language_model\.layers\.(\d+)\.input_layernorm\.", r"text_decoder.decoder.layers.\1.input_layernorm."),
    (r"model\.language_model\.layers\.(\d+)\.post_attention_layernorm\.", r"text_decoder.decoder.layers.\1.pre_mlp_layernorm."),
    (r"model\.language_model\.layers\.(\d+)\.mlp\.down_proj\.", r"text_decoder.decoder.layers.\1.mlp.linear_fc2."),
    (r"model\.language_model\.embed_tokens\.", "text_decoder.embedding.word_embeddings."),
    (r"model\.language_model\.norm\.", "text_decoder.decoder.final_layernorm."),
    (r"lm_head\.", "text_decoder.output_layer."),
]  # fmt: skip
ROW, COL, GLU = "row", "col", "glu"
# qwen3vl_megatron.py 111-135: TP rules; anything else is copied to every rank (hf_to_mm.py 260-263)
TP_RULES = [
    (r"text_decoder\.output_layer\.weight", ROW), (r"text_decoder\.embedding\.word_embeddings\.weight", ROW),
    (r"text_decoder\.decoder\.layers\.\d+\.mlp\.linear_fc1\.weight", GLU),
    (r"text_decoder\.decoder\.layers\.\d+\.mlp\.linear_fc2\.weight", COL),
    (r"text_decoder\.decoder\.layers\.\d+\.self_attention\.linear_qkv\.(weight|bias)", ROW),
    (r"text_decoder\.decoder\.layers\.\d+\.self_attention\.linear_proj\.weight", COL),
    (r"image_encoder\.encoder\.blocks\.layers\.\d+\.self_attention\.linear_proj\.weight", COL),
    (r"image_encoder\.encoder\.blocks\.layers\.\d+\.self_attention\.linear_qkv\.(weight|bias)", ROW),
    (r"image_encoder\.encoder\.blocks\.layers\.\d+\.mlp\.linear_fc1\.(weight|bias)", ROW),
    (r"image_encoder\.encoder\.blocks\.layers\.\d+\.mlp\.linear_fc2\.weight", COL),
    (r"image_encoder\.projector\.encoder\.linear_fc1\.(weight|bias)", ROW),
    (r"image_encoder\.projector\.encoder\.linear_fc2\.weight", COL),
    (r"text_decoder\.decoder\.layers\.\d+\.mlp\.experts\.local_experts\.\d+\.linear_fc1\.weight", GLU),
    (r"text_decoder\.decoder\.layers\.\d+\.mlp\.experts\.local_experts\.\d+\.linear_fc2\.weight", COL),
    (r"image_encoder\.encoder\.blocks\.layers\.\d+\.deepstack_layer\.encoder\.linear_fc1\.(weight|bias)", ROW),
    (r"image_encoder\.encoder\.blocks\.layers\.\d+\.deepstack_layer\.encoder\.linear_fc2\.weight", COL),
]  # fmt: skip
# qwen3vl_megatron.py 11-15 and hf_to_mm.py 77-81: each module's first-stage, last-stage and layer names
STAGES = {
    "image_encoder.": (["image_encoder.encoder.patch_embed.", "image_encoder.encoder.pos_embed."],
                       ["image_encoder.projector."], "image_encoder.encoder.blocks.layers."),
    "text_decoder.": (["text_decoder.embedding."], ["text_decoder.decoder.final_layernorm.", "text_decoder.output_layer."],
                      "text_decoder.decoder.layers."),
}  # fmt: skip


def _convert_names(state: dict[str, torch.Tensor], cfg: dict, pp: int) -> dict[str, torch.Tensor]:
    text, vision = cfg["text_config"], cfg["vision_config"]
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        new = k
        for pat, rep in RENAMES:
            new = re.sub(pat, rep, new)
        out[new] = v
    for layer in range(text["num_hidden_layers"]):
        p = f"model.language_model.layers.{layer}."
        t = f"text_decoder.decoder.layers.{layer}."
        # operator.py 31-38 (QKVMergeOp): per key/value group, its queries, its key, its value
        q, k, v = (out.pop(f"{p}self_attn.{n}_proj.weight") for n in "qkv")
        g = text["num_key_value_heads"]
        out[t + "self_attention.linear_qkv.weight"] = torch.cat(
            [x for grp in zip(q.chunk(g), k.chunk(g), v.chunk(g), strict=True) for x in grp]
        )
        if f"{p}mlp.gate_proj.weight" in out:  # operator.py 249-256 (UpGateMergeOp): [gate; up]
            out[t + "mlp.linear_fc1.weight"] = torch.cat(
                [out.pop(f"{p}mlp.gate_proj.weight"), out.pop(f"{p}mlp.up_proj.weight")]
            )
        for hf_name, mm_name in (("gate_up_proj", "linear_fc1"), ("down_proj", "linear_fc2")):
            fused = out.pop(f"{p}mlp.experts.{hf_name}", None)
            if fused is not None:  # operator.py 589-596 (ExpertSplitOp): expert e is fused[e].T
                for e in range(fused.shape[0]):
                    out[f"{t}mlp.experts.local_experts.{e}.{mm_name}.weight"] = fused[e].T.contiguous()
    heads = vision["num_heads"]
    for layer in range(vision["depth"]):
        for param in ("weight", "bias"):
            # operator.py 21-28 (RelocateOp): [all q; all k; all v] -> per head [q_h; k_h; v_h]
            name = f"image_encoder.encoder.blocks.layers.{layer}.self_attention.linear_qkv.{param}"
            parts = [x.chunk(heads) for x in out[name].chunk(3)]
            out[name] = torch.cat([x for head in zip(*parts, strict=True) for x in head])
    for i, layer in enumerate(vision["deepstack_visual_indexes"]):  # qwen3vl_megatron.py 86-94
        for k in [k for k in out if k.startswith(f"model.visual.deepstack_merger_list.{i}.")]:
            rest = k.removeprefix(f"model.visual.deepstack_merger_list.{i}.")
            rest = rest.replace("norm.", "layernorm.").replace("linear_fc", "encoder.linear_fc")
            out[f"image_encoder.encoder.blocks.layers.{layer}.deepstack_layer.{rest}"] = out.pop(k)
    if cfg["tie_word_embeddings"] and pp > 1:  # hf_to_mm.py 352-356 (TieOp)
        out["text_decoder.output_layer.weight"] = out["text_decoder.embedding.word_embeddings.weight"]
    assert all(k.startswith(("image_encoder.", "text_decoder.")) for k in out), sorted(out)
    return out


def _split_ep(sd: dict[str, torch.Tensor], ep: int, experts: int) -> list[dict[str, torch.Tensor]]:
    """hf_to_mm.py 267-290: rank r keeps experts [r * n, (r + 1) * n), renumbered from 0."""
    per, out = experts // ep, []
    for r in range(ep):
        part = {}
        for k, v in sd.items():
            m = re.match(r"(.*\.local_experts\.)(\d+)(\..*)", k)
            if m is None:
                part[k] = v
            elif r * per <= int(m.group(2)) < (r + 1) * per:
                part[f"{m.group(1)}{int(m.group(2)) - r * per}{m.group(3)}"] = v
        out.append(part)
    return out


def _split_tp(sd: dict[str, torch.Tensor], tp: int) -> list[dict[str, torch.Tensor]]:
    """hf_to_mm.py 215-264 with operator.py's RowSplit 467-481, ColSplit 451-465, GLUSplit 553-579."""
    out: list[dict[str, torch.Tensor]] = [{} for _ in range(tp)]
    for k, v in sd.items():
        rule = next((r for pat, r in TP_RULES if re.fullmatch(pat, k)), None)
        if rule == ROW:
            parts = list(v.chunk(tp))
        elif rule == COL:
            parts = list(v.chunk(tp, dim=1))
        elif rule == GLU:
            gate, up = v.chunk(2)
            parts = [torch.cat([a, b]) for a, b in zip(gate.chunk(tp), up.chunk(tp), strict=True)]
        else:
            parts = [v] * tp
        for r in range(tp):
            out[r][k] = parts[r].clone()
    return out


def _split_pp(sd: dict[str, torch.Tensor], vit: list[int], llm: list[int]) -> list[dict[str, torch.Tensor]]:
    """hf_to_mm.py 112-165 (one chunk): first-stage names on the module's first non-empty stage, last-stage
    names on its last, and layers renumbered from 0 on the stage holding them."""
    out: list[dict[str, torch.Tensor]] = [{} for _ in llm]
    for prefix, counts in (("image_encoder.", vit), ("text_decoder.", llm)):
        firsts, lasts, middle = STAGES[prefix]
        busy = [s for s, n in enumerate(counts) if n]
        starts = [sum(counts[:s]) for s in range(len(counts))]
        for k, v in sd.items():
            if not k.startswith(prefix):
                continue
            if k.startswith(middle):
                layer, rest = k.removeprefix(middle).split(".", 1)
                s = max(s for s in busy if starts[s] <= int(layer))
                out[s][f"{middle}{int(layer) - starts[s]}.{rest}"] = v
            elif k.startswith(tuple(firsts)):
                out[busy[0]][k] = v
            else:
                assert k.startswith(tuple(lasts)), k
                out[busy[-1]][k] = v
    return out


def reference(hf_dir: Path, layout: str, state: dict[str, torch.Tensor] | None = None) -> dict[str, dict]:
    """The rank files of `layout` for the weights of `hf_dir` (or `state`, weights of that model)."""
    tp, ep, (vit,), (llm,) = LAYOUTS[layout]
    cfg = json.loads((hf_dir / "config.json").read_text())
    sd = _convert_names(load_state(hf_dir) if state is None else state, cfg, len(llm))
    out = {}
    for e, ep_part in enumerate(_split_ep(sd, ep, cfg["text_config"].get("num_experts", 0))):
        for t, tp_part in enumerate(_split_tp(ep_part, tp)):
            for s, stage in enumerate(_split_pp(tp_part, vit, llm)):
                # hf_to_mm.py 177-194: mp_rank_TT[_PPP][_EEE], {"model": ..., "checkpoint_version": 3.0}
                name = f"mp_rank_{t:02d}" + (f"_{s:03d}" if len(llm) > 1 else "") + (f"_{e:03d}" if ep > 1 else "")
                out[name] = {"model": stage, "checkpoint_version": 3.0}
    return out


# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("family", "layout"), CASES)
def test_layout_matches_reference(hf: dict[str, Path], converted, family: str, layout: str) -> None:
    _assert_same(_load_dir(converted(family, layout)), reference(hf[family], layout))


def test_reference_places_what_matters(hf: dict[str, Path]) -> None:
    """The reference itself: deepstack merger 1 (vision layer 3) on stage 1 as layer 1; experts 2, 3 on EP rank 1."""
    got = reference(hf["qwen3_vl_moe"], "tp2_vit_split")["mp_rank_01_001"]["model"]
    assert "image_encoder.encoder.blocks.layers.1.deepstack_layer.encoder.linear_fc2.weight" in got
    assert "image_encoder.encoder.pos_embed.weight" not in got
    state = load_state(hf["qwen3_vl_moe"])
    ep1 = reference(hf["qwen3_vl_moe"], "ep2")["mp_rank_00_001"]["model"]
    fused = state["model.language_model.layers.2.mlp.experts.down_proj"]
    assert torch.equal(ep1["text_decoder.decoder.layers.2.mlp.experts.local_experts.0.linear_fc2.weight"], fused[2].T)
    assert not any("layers.1.mlp.experts" in k for k in ep1)  # layer 1 is dense (mlp_only_layers)


@pytest.mark.parametrize(("family", "layout"), [("qwen3_vl", "tp2_vit_split"), ("qwen3_vl_moe", "tp2ep2pp2")])
def test_hf_mm_hf_is_byte_identical(hf: dict[str, Path], converted, tmp_path: Path, family: str, layout: str) -> None:
    _assert_back_to_original(hf[family], converted(family, layout), tmp_path / "back", _pc(layout))


@pytest.mark.parametrize(
    ("family", "a", "b"), [("qwen3_vl", "tp1", "tp2_vit_split"), ("qwen3_vl_moe", "ep2", "tp2ep2pp2")]
)
def test_resplit_equals_direct_conversion(
    hf: dict[str, Path], converted, tmp_path: Path, family: str, a: str, b: str
) -> None:
    _same_tree(converted(family, b), _resplit(hf[family], converted(family, a), tmp_path / "b", _pc(a), _pc(b)))


def test_command_line_takes_the_peers_converter_for_both(hf: dict[str, Path], converted, tmp_path: Path) -> None:
    """`mm-convert Qwen3VLMegatronConverter` as MindSpeed-MM's README writes it; config.json tells dense from MoE."""
    out = tmp_path / "mm"
    r = mm_convert(
        "Qwen3VLMegatronConverter", "hf_to_mm", "--cfg.mm_dir", str(out), "--cfg.hf_config.hf_dir", str(hf["qwen3_vl_moe"]),
        "--cfg.parallel_config.llm_pp_layers", "[[4]]", "--cfg.parallel_config.vit_pp_layers", "[[4]]",
        "--cfg.parallel_config.ep_size", "2",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    _same_tree(converted("qwen3_vl_moe", "ep2"), out)
    r = mm_convert("-h")
    assert "Qwen3VLMegatronConverter  Qwen3-VL / Qwen3-VL-MoE" in r.stdout


def test_params_dtype_casts_the_transposed_experts_too(hf: dict[str, Path], tmp_path: Path) -> None:
    """bf16 output: every tensor (fused experts, the 5-D patch embedding) is the reference's, rounded once."""
    src = hf["qwen3_vl_moe"]
    cfg = HfToMmConfig(mm_dir=tmp_path / "mm", hf_config=HfConfig(hf_dir=src), parallel_config=_pc("tp2"))
    _convert(src, "hf_to_mm", cfg.model_copy(update={"params_dtype": "bf16"}))
    want = reference(src, "tp2", {k: v.to(torch.bfloat16) for k, v in load_state(src).items()})
    _assert_same(_load_dir(tmp_path / "mm"), want)


def test_verify_and_the_way_back_with_the_layout_read_from_disk(hf: dict[str, Path], converted, tmp_path: Path) -> None:
    src, mm = hf["qwen3_vl_moe"], converted("qwen3_vl_moe", "tp2ep2pp2")
    job = Job(
        converter="Qwen3VLMegatronConverter", command="hf_to_mm",
        cfg=HfToMmConfig(mm_dir=mm, hf_config=HfConfig(hf_dir=src), parallel_config=_pc("tp2ep2pp2")),
    )  # fmt: skip
    n = len(inspect_hf(src).tensors)  # 3 fused tensors x 4 experts in, as 12 per-expert tensors
    assert verify_job(inspect_hf(src), job) == (True, f"identical: {n} tensors ({n} equal)")
    back = _convert(
        src, "mm_to_hf", MmToHfConfig(save_hf_dir=tmp_path / "back", mm_dir=mm, hf_config=HfConfig(hf_dir=src))
    )
    for f in src.glob("*.safetensors"):
        assert filecmp.cmp(f, back / f.name, shallow=False), f.name


def test_dcp_holds_the_whole_model(hf: dict[str, Path], tmp_path: Path) -> None:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    src = hf["qwen3_vl_moe"]
    _convert(src, "hf_to_dcp", HfToDcpConfig(dcp_dir=tmp_path / "dcp", hf_config=HfConfig(hf_dir=src)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed is ... uninitialized, assuming ... a single process"
        dcp_to_torch_save(tmp_path / "dcp" / "release", tmp_path / "whole.pt")
    got = torch.load(tmp_path / "whole.pt", weights_only=True)["model"]
    want = reference(src, "tp1")["mp_rank_00"]["model"]
    assert sorted(got) == sorted(want)
    assert all(torch.equal(got[k], v) for k, v in want.items())


def test_lora_merged_into_the_layout(hf: dict[str, Path], tmp_path: Path) -> None:
    """A PEFT adapter on the language model (q/k/v/o, the dense MLP) merged while cutting TP 2 x PP 2."""
    src = hf["qwen3_vl"]
    build_peft_adapter(src, tmp_path / "adapter")
    cfg = HfToMmConfig(
        mm_dir=tmp_path / "mm", hf_config=HfConfig(hf_dir=src), parallel_config=_pc("tp2_vit_split"),
        lora=LoraConfig(adapter_dir=tmp_path / "adapter"),
    )  # fmt: skip
    _convert(src, "hf_to_mm", cfg)
    merged = reference_merge(load_state(src), tmp_path / "adapter")
    assert merged.keys() == load_state(src).keys()
    _assert_same(_load_dir(tmp_path / "mm"), reference(src, "tp2_vit_split", merged))


# ---------------------------------------------------------------------------------------
# bad inputs: one line each


def _copy_with(src: Path, dst: Path, text: dict | None = None, vision: dict | None = None) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["text_config"] |= text or {}
    cfg["vision_config"] |= vision or {}
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize(
    ("vision", "text", "message"),
    [
        ({"deepstack_visual_indexes": [1]}, {},
         "model.visual.deepstack_merger_list.1.norm.bias is entry 1 of vision_config.deepstack_visual_indexes = [1], "
         "which has 1 entries"),
        ({"deepstack_visual_indexes": [1, 4]}, {},
         "model.visual.deepstack_merger_list.1.norm.bias is entry 1 of vision_config.deepstack_visual_indexes = [1, 4], "
         "which names layer 4 of 4"),
        ({"deepstack_visual_indexes": 3}, {}, "vision_config.deepstack_visual_indexes = 3; expected a list of whole numbers >= 0"),
        ({}, {"num_experts": 8},
         "model.language_model.layers.0.mlp.experts.down_proj has shape [4, 24, 64], but config.json says "
         "text_config.num_experts = 8 and text_config.hidden_size = 64, so it must be [8, *, 64] (experts, in, out: "
            "each expert transposed relative to nn.Linear)"),
    ],
)  # fmt: skip
def test_bad_config_is_one_line(hf: dict[str, Path], tmp_path: Path, vision: dict, text: dict, message: str) -> None:
    bad = _copy_with(hf["qwen3_vl_moe"], tmp_path / "bad", text, vision)
    with pytest.raises(ConvertError) as err:
        build_plan(inspect_hf(bad), _pc("tp1"))
    assert "\n" not in str(err.value)
    assert str(err.value).endswith(message), str(err.value)


def test_fused_experts_stored_the_other_way_round_is_one_line(hf: dict[str, Path], tmp_path: Path) -> None:
    """[experts, 2 x moe_intermediate, hidden] (nn.Linear's orientation, as transformers 5 holds it in memory)."""
    from safetensors.torch import load_file, save_file

    bad = _copy_with(hf["qwen3_vl_moe"], tmp_path / "bad")
    key = "model.language_model.layers.2.mlp.experts.gate_up_proj"
    for f in bad.glob("*.safetensors"):
        state = load_file(f)
        if key in state:
            state[key] = state[key].transpose(1, 2).contiguous()
            save_file(state, f, metadata={"format": "pt"})
    with pytest.raises(ConvertError) as err:
        inspect_hf(bad)
    assert str(err.value).endswith(
        f"{key} has shape [4, 48, 64], but config.json says text_config.num_experts = 4 and "
        "text_config.hidden_size = 64, so it must be [4, 64, *] (experts, in, out: each expert transposed relative "
        "to nn.Linear)"
    )


@pytest.mark.parametrize(("top", "text"), [(None, None), (None, True), (False, True), (True, False)])
def test_tie_is_read_as_transformers_reads_it(hf: dict[str, Path], tmp_path: Path, top: bool | None, text: bool | None):
    """Only the top-level key counts (transformers 5's Qwen3VLConfig; MindSpeed-MM's ConvertVppMMConfigQwen3 too)."""
    import transformers

    from engine.source.tie import is_tied

    d = _copy_with(hf["qwen3_vl"], tmp_path / "hf", {} if text is None else {"tie_word_embeddings": text})
    cfg = json.loads((d / "config.json").read_text())
    cfg.pop("tie_word_embeddings")
    (d / "config.json").write_text(json.dumps(cfg | ({} if top is None else {"tie_word_embeddings": top})))
    cls = transformers.Qwen3VLForConditionalGeneration
    model = cls(cls.config_class.from_pretrained(d))
    assert is_tied(inspect_hf(d)) is (model.lm_head.weight is model.model.language_model.embed_tokens.weight)


def test_dense_has_no_experts_and_the_converter_checks_the_family(
    hf: dict[str, Path], tiny_dirs: dict[str, Path]
) -> None:
    from engine.job import prepare

    with pytest.raises(ConvertError, match=r"ep_size 2: Qwen3-VL has no experts; use 1$"):
        build_plan(inspect_hf(hf["qwen3_vl"]), _pc("ep2"))
    job = Job(
        converter="Qwen3VLMegatronConverter", command="hf_to_mm",
        cfg=HfToMmConfig(mm_dir=hf["qwen3_vl"].parent / "never", hf_config=HfConfig(hf_dir=tiny_dirs["qwen2_vl"]),
                         parallel_config=_pc("tp1")),
    )  # fmt: skip
    with pytest.raises(ConvertError) as err:
        prepare(job)
    assert str(err.value).endswith(
        "model_type 'qwen2_vl' is not a Qwen3-VL or Qwen3-VL-MoE model "
        "(converter Qwen3VLMegatronConverter expects qwen3_vl, qwen3_vl_moe)"
    )


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ('kind = "fused_experts"\nhf = "x.*.experts.down_proj.#"\nmm = "text_decoder.decoder.layers.*.e.#.w"\nbare = true',
         "kind 'fused_experts' reads expert # of one [experts, in, out] tensor"),
        ('hf = "model.visual.deepstack_merger_list.*.x"\nmm = "image_encoder.encoder.blocks.layers.*.x"\n'
         'layer_from = "vit_heads"', "layer_from 'vit_heads': give it a list default under [defaults] (e.g. [])"),
    ],
)  # fmt: skip
def test_preset_rules_for_the_new_kinds(tmp_path: Path, extra: str, message: str) -> None:
    from engine.preset import load_preset_file

    path = tmp_path / "x.toml"
    shutil.copy(Path(__file__).resolve().parents[2] / "presets" / "qwen3_vl.toml", tmp_path / "qwen3_vl.toml")
    path.write_text(f'extends = "qwen3_vl"\nname = "x"\n[[more_mappings]]\n{extra}\n')
    with pytest.raises(ConvertError) as err:
        load_preset_file(path)
    assert message in str(err.value) and "\n" not in str(err.value)


# ---------------------------------------------------------------------------------------

TOKENS = [3, 17, 99, 5, 42, 7, 64, 127, 0, 11, 23, 88]


@pytest.mark.oracle
@pytest.mark.parametrize(("family", "layout"), [("qwen3_vl", "tp2"), ("qwen3_vl_moe", "ep2")])
def test_megatron_reproduces_transformers_logits(hf: dict[str, Path], converted, family: str, layout: str) -> None:
    """megatron-core's GPTModel on our language-model files: transformers' logits (q/k norms, head_dim 24, tied
    embeddings for the dense; the MoE with layer 1 dense, experts over two EP ranks)."""
    pytest.importorskip("megatron.core")
    from mmtui.megatron_logits import GPTArch, megatron_logits

    text = json.loads((hf[family] / "config.json").read_text())["text_config"]
    moe = {}
    if family == "qwen3_vl_moe":
        moe = dict(
            num_moe_experts=text["num_experts"], moe_router_topk=text["num_experts_per_tok"],
            moe_ffn_hidden_size=text["moe_intermediate_size"],
            moe_layer_freq=[0 if i in text["mlp_only_layers"] else 1 for i in range(text["num_hidden_layers"])],
        )  # fmt: skip
    arch = GPTArch(
        num_layers=text["num_hidden_layers"], hidden_size=text["hidden_size"], num_attention_heads=text["num_attention_heads"],
        num_query_groups=text["num_key_value_heads"], ffn_hidden_size=text["intermediate_size"], vocab_size=text["vocab_size"],
        rotary_base=text["rope_parameters"]["rope_theta"], norm_epsilon=text["rms_norm_eps"], add_qkv_bias=False,
        tied=family == "qwen3_vl", qk_layernorm=True, kv_channels=text["head_dim"], **moe,
    )  # fmt: skip
    tp, ep = LAYOUTS[layout][:2]
    ranks = []
    for e in range(ep):
        for t in range(tp):
            name = f"mp_rank_{t:02d}" + (f"_{e:03d}" if ep > 1 else "")
            model = torch.load(converted(family, layout) / "release" / name / "model_optim_rng.pt", weights_only=True)
            ranks.append(
                {k.removeprefix("text_decoder."): v for k, v in model["model"].items() if k.startswith("text_decoder.")}
            )
    got = megatron_logits(ranks, arch, TOKENS, ep=ep)
    with torch.no_grad():
        want = tiny_model(hf[family])(input_ids=torch.tensor([TOKENS])).logits[0]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
