"""GLM-4.1V (GlmConverter): the peer's names and stages, split over TP as MindSpeed-MM's modules hold them.

The reference below is written from MindSpeed-MM's checkpoint/vlm_model/converters/glm.py (its
rename table and PP stage schema) and, for TP, from its GLM model code: the language model's
attention and MLP are Megatron column/row-parallel layers (glm4v_layer_spec.py), the vision MLP is
Megatron's MLP, and the vision attention (Glm4vVisionAttention), the projector (GlmMLP), the
downsample and the embeddings are plain torch modules, whole on every rank. The peer itself writes
every tensor whole to every TP rank, so its output is matched at TP 1 (and a hetero PP), and the TP 2
output is proved to reassemble to TP 1.

The logits oracle is megatron-core's GPTModel with GLM's post_self_attn_layernorm / post_mlp_layernorm
added to each layer (they are not in megatron-core's layer spec; MindSpeed-MM adds them in its GLM layer).
"""

from __future__ import annotations

import filecmp
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine.errors import ConvertError
from engine.job import HfConfig, HfToMmConfig, Job, MmToHfConfig, ResplitConfig, prepare
from engine.layout import ParallelConfig
from engine.planning.check import check_plan
from engine.run.execute import run
from engine.source.hf_source import inspect_hf
from tests.engine.test_hf_to_mm import _assert_same, _load_dir
from tests.fixtures.reference_layout import fuse_qkv_gqa, stage_cells
from tests.fixtures.tiny_glm4v import TEXT, build_tiny_glm4v
from tests.test_cli import _bad, mm_convert

CONVERTER = "GlmConverter"
LAYOUTS = {
    # name: (tp_size, vit_tp_size, llm_pp_layers, vit_pp_layers)
    "tp1": (1, 0, [[3]], [[2]]),
    "tp2": (2, 0, [[3]], [[2]]),
    "pp2": (1, 0, [[1, 2]], [[2, 0]]),  # the peer's hetero PP: vision on stage 0, the LLM over both
    "tp2_pp2": (2, 0, [[1, 2]], [[2, 0]]),
    "tp2_vit1": (2, 1, [[3]], [[2]]),
}

# MindSpeed-MM's GlmConverter renames (HF prefix -> target prefix), written out here
VISION = {
    "model.visual.patch_embed.proj": "image_encoder.encoder.patch_embed.proj",
    "model.visual.post_conv_layernorm": "image_encoder.encoder.post_conv_layernorm",
    "model.visual.embeddings.position_embedding": "image_encoder.encoder.embeddings.position_embedding",
    "model.visual.post_layernorm": "image_encoder.encoder.blocks.final_layernorm",
    "model.visual.downsample": "image_encoder.encoder.downsample",
    "model.visual.merger.proj": "image_encoder.projector.proj",
    "model.visual.merger.post_projection_norm": "image_encoder.projector.post_projection_norm",
    "model.visual.merger.gate_proj": "image_encoder.projector.gate_proj",
    "model.visual.merger.up_proj": "image_encoder.projector.up_proj",
    "model.visual.merger.down_proj": "image_encoder.projector.down_proj",
}
VISION_LAYER = {
    "attn.proj": "self_attention.proj", "attn.qkv": "self_attention.qkv", "mlp.down_proj": "mlp.linear_fc2",
    "norm1": "input_layernorm", "norm2": "pre_mlp_layernorm",
}  # fmt: skip
TEXT_LAYER = {
    "input_layernorm": "input_layernorm", "mlp.down_proj": "mlp.linear_fc2", "mlp.gate_up_proj": "mlp.linear_fc1",
    "post_attention_layernorm": "pre_mlp_layernorm", "post_self_attn_layernorm": "post_self_attn_layernorm",
    "post_mlp_layernorm": "post_mlp_layernorm", "self_attn.o_proj": "self_attention.linear_proj",
}  # fmt: skip
# the peer's PP stage schema (glm_vision_schema, glm_text_schema)
FIRSTS = ["image_encoder.encoder.patch_embed.", "image_encoder.encoder.post_conv_layernorm.",
          "image_encoder.encoder.embeddings.position_embedding", "text_decoder.embedding."]  # fmt: skip
LASTS = ["image_encoder.projector.", "image_encoder.encoder.blocks.final_layernorm", "image_encoder.encoder.downsample",
         "text_decoder.decoder.final_layernorm.", "text_decoder.output_layer."]  # fmt: skip


def load_hf_state(hf_dir: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(hf_dir.glob("*.safetensors")) for k, v in load_file(f).items()}


def full_state(hf: dict[str, torch.Tensor], tied: bool) -> dict[str, torch.Tensor]:
    out = {}
    for key, t in hf.items():
        for a, b in VISION.items():
            if key.startswith(a + "."):
                out[b + key[len(a) :]] = t
    n_vit = 1 + max(int(k.split(".")[3]) for k in hf if k.startswith("model.visual.blocks."))
    for i in range(n_vit):
        src, dst = f"model.visual.blocks.{i}.", f"image_encoder.encoder.blocks.layers.{i}."
        for key, t in hf.items():
            for a, b in VISION_LAYER.items():
                if key.startswith(src + a + "."):
                    out[dst + b + key[len(src + a) :]] = t
        out[dst + "mlp.linear_fc1.weight"] = torch.cat(
            [hf[src + "mlp.gate_proj.weight"], hf[src + "mlp.up_proj.weight"]]
        )
    lm = "model.language_model."
    out["text_decoder.embedding.word_embeddings.weight"] = hf[lm + "embed_tokens.weight"]
    for i in range(TEXT["num_hidden_layers"]):
        src, dst = f"{lm}layers.{i}.", f"text_decoder.decoder.layers.{i}."
        for a, b in TEXT_LAYER.items():
            out[dst + b + ".weight"] = hf[src + a + ".weight"]
        for p in ("weight", "bias"):
            q, k, v = (hf[f"{src}self_attn.{x}_proj.{p}"] for x in "qkv")
            out[dst + "self_attention.linear_qkv." + p] = fuse_qkv_gqa(q, k, v, 4, 2)
    out["text_decoder.decoder.final_layernorm.weight"] = hf[lm + "norm.weight"]
    out["text_decoder.output_layer.weight"] = hf[lm + "embed_tokens.weight"] if tied else hf["lm_head.weight"]
    return out


def tp_rule(key: str) -> str:
    """How MindSpeed-MM's GLM modules hold a tensor at TP > 1 (module code named in the docstring)."""
    if key.endswith("linear_qkv.weight") or key.endswith("linear_qkv.bias") or "word_embeddings" in key:
        return "rows"
    if "output_layer" in key:
        return "rows"
    if key.endswith("linear_proj.weight") or key.endswith("linear_fc2.weight"):
        return "cols"
    if key.endswith("linear_fc1.weight"):
        return "gated"
    return "whole"


def shard(key: str, t: torch.Tensor, tp: int, r: int) -> torch.Tensor:
    rule = tp_rule(key)
    if tp == 1 or rule == "whole":
        return t
    if rule == "rows":
        return t.chunk(tp)[r]
    if rule == "cols":
        return t.chunk(tp, dim=1)[r]
    gate, up = t.chunk(2)
    return torch.cat([gate.chunk(tp)[r], up.chunk(tp)[r]])


def expected(hf_dir: Path, name: str) -> dict[str, dict]:
    tp, vit_tp, llm, vit = LAYOUTS[name]
    cfg = json.loads((hf_dir / "config.json").read_text())
    tied = cfg["tie_word_embeddings"]
    full = full_state(load_hf_state(hf_dir), tied)
    pp = len(llm[0])
    placed: dict[int, dict[str, str]] = {s: {} for s in range(pp)}  # stage -> global key -> local key
    for layer_prefix, counts, module in (
        ("image_encoder.encoder.blocks.layers.", vit, "image_encoder."),
        ("text_decoder.decoder.layers.", llm, "text_decoder."),
    ):
        cells = [(s, start, n) for _, s, start, n in stage_cells(counts)]
        used = [s for s, _, n in cells if n]
        for key in full:
            if not key.startswith(module):
                continue
            if key.startswith(layer_prefix):
                layer, rest = key[len(layer_prefix) :].split(".", 1)
                s, start, _ = next(c for c in cells if c[1] <= int(layer) < c[1] + c[2])
                placed[s][key] = f"{layer_prefix}{int(layer) - start}.{rest}"
            elif any(key.startswith(f) for f in FIRSTS):
                placed[used[0]][key] = key
            elif any(key.startswith(x) for x in LASTS):
                if key == "text_decoder.output_layer.weight" and tied and pp == 1:
                    continue
                placed[used[-1]][key] = key
            else:
                raise AssertionError(key)
    world = max(tp, vit_tp)
    out = {}
    for r in range(world):
        for s in range(pp):
            rank = f"mp_rank_{r:02d}" + (f"_{s:03d}" if pp > 1 else "")
            model = {}
            for g, local in placed[s].items():
                size = (vit_tp or tp) if g.startswith("image_encoder.") else tp
                model[local] = shard(g, full[g], size, r % size).clone()
            out[rank] = {"model": model, "checkpoint_version": 3.0}
    return out


def _pc(name: str) -> ParallelConfig:
    tp, vit_tp, llm, vit = LAYOUTS[name]
    return ParallelConfig(tp_size=tp, vit_tp_size=vit_tp, llm_pp_layers=llm, vit_pp_layers=vit)


@pytest.fixture(scope="module")
def glm_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("glm4v")
    return {"untied": build_tiny_glm4v(root / "untied", shards=2), "tied": build_tiny_glm4v(root / "tied", tied=True)}


@pytest.fixture(scope="module")
def converted(glm_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Path]:
    root = tmp_path_factory.mktemp("glm4v_mm")
    out = {}
    for variant, hf in glm_dirs.items():
        for name in LAYOUTS:
            cfg = HfToMmConfig(
                mm_dir=root / f"{variant}-{name}", hf_config=HfConfig(hf_dir=hf), parallel_config=_pc(name)
            )
            _, plan = prepare(Job(converter=CONVERTER, command="hf_to_mm", cfg=cfg))
            assert check_plan(plan) == []
            run(plan, cfg.mm_dir)
            out[(variant, name)] = cfg.mm_dir
    return out


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("variant", ["untied", "tied"])
def test_layout_matches_reference(glm_dirs: dict, converted: dict, variant: str, layout: str) -> None:
    _assert_same(_load_dir(converted[(variant, layout)]), expected(glm_dirs[variant], layout))


def _reassemble(ranks: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """TP shards back to whole tensors, by the same module rules (independent of the engine)."""
    out = {}
    for key in ranks[0]:
        parts = [r[key] for r in ranks]
        rule = tp_rule(key)
        if rule == "whole":
            assert all(torch.equal(p, parts[0]) for p in parts), key
            out[key] = parts[0]
        elif rule == "rows":
            out[key] = torch.cat(parts)
        elif rule == "cols":
            out[key] = torch.cat(parts, dim=1)
        else:
            halves = [p.chunk(2) for p in parts]
            out[key] = torch.cat([h[0] for h in halves] + [h[1] for h in halves])
    return out


@pytest.mark.parametrize(("tp2", "tp1"), [("tp2", "tp1"), ("tp2_pp2", "pp2")])
def test_tp2_reassembles_to_tp1(converted: dict, tp2: str, tp1: str) -> None:
    got, one = _load_dir(converted[("untied", tp2)]), _load_dir(converted[("untied", tp1)])
    for stage_rank, whole in one.items():
        suffix = stage_rank[len("mp_rank_00") :]
        joined = _reassemble([got[f"mp_rank_0{r}{suffix}"]["model"] for r in range(2)])
        assert joined.keys() == whole["model"].keys()
        assert all(torch.equal(joined[k], whole["model"][k]) for k in joined), stage_rank
        # and the split ones really are split: a rank holds half of a column-parallel layer's rows
        fc1 = [k for k in joined if k.endswith("linear_fc1.weight")]
        assert fc1 and all(got[f"mp_rank_00{suffix}"]["model"][k].shape[0] * 2 == joined[k].shape[0] for k in fc1)


@pytest.mark.parametrize(("variant", "layout", "given"), [("untied", "tp2_pp2", False), ("tied", "tp2_pp2", True),
                                                          ("untied", "tp2_vit1", False)])  # fmt: skip
def test_way_back_is_byte_identical(
    glm_dirs: dict, converted: dict, tmp_path: Path, variant: str, layout: str, given: bool
) -> None:
    hf = glm_dirs[variant]
    cfg = MmToHfConfig(
        save_hf_dir=tmp_path / "back", mm_dir=converted[(variant, layout)], hf_config=HfConfig(hf_dir=hf),
        parallel_config=_pc(layout) if given else None,
    )  # fmt: skip
    _, plan = prepare(Job(converter=CONVERTER, command="mm_to_hf", cfg=cfg))
    assert check_plan(plan) == []
    run(plan, tmp_path / "back")
    names = sorted(p.name for p in hf.iterdir())
    assert sorted(p.name for p in (tmp_path / "back").iterdir()) == names
    for name in names:
        assert filecmp.cmp(hf / name, tmp_path / "back" / name, shallow=False), name


@pytest.mark.parametrize(("a", "b"), [("tp2_pp2", "tp1"), ("tp1", "tp2_vit1")])
def test_resplit_equals_direct_conversion(glm_dirs: dict, converted: dict, tmp_path: Path, a: str, b: str) -> None:
    cfg = ResplitConfig(
        source_dir=converted[("untied", a)], target_dir=tmp_path / "b", hf_config=HfConfig(hf_dir=glm_dirs["untied"]),
        target_parallel_config=_pc(b),
    )  # fmt: skip
    _, plan = prepare(Job(converter=CONVERTER, command="resplit", cfg=cfg))
    run(plan, tmp_path / "b")
    direct = converted[("untied", b)]
    files = sorted(p.relative_to(direct) for p in direct.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    for rel in files:
        assert filecmp.cmp(direct / rel, tmp_path / "b" / rel, shallow=False), rel


def test_sizes_come_from_text_config(glm_dirs: dict, tmp_path: Path) -> None:
    """transformers writes the language model's sizes under text_config; a stale top-level copy loses."""
    hf = tmp_path / "hf"
    shutil.copytree(glm_dirs["tied"], hf)
    cfg = json.loads((hf / "config.json").read_text())
    cfg |= {"num_hidden_layers": 40, "num_key_value_heads": 3}
    (hf / "config.json").write_text(json.dumps(cfg))
    info = inspect_hf(hf)
    assert (info.fields["llm_layers"], info.fields["llm_kv_heads"]) == (3, 2)
    assert info.field_path("llm_layers") == "text_config.num_hidden_layers"


def test_bad_layouts_are_one_line(glm_dirs: dict, tmp_path: Path) -> None:
    base = [CONVERTER, "hf_to_mm", "--cfg.mm_dir", str(tmp_path / "out"), "--cfg.hf_config.hf_dir",
            str(glm_dirs["untied"]), "--cfg.parallel_config.vit_pp_layers", "[[2]]"]  # fmt: skip
    r = mm_convert(*base, "--cfg.parallel_config.llm_pp_layers", "[[3]]", "--cfg.parallel_config.tp_size", "4")
    _bad(
        r, "parallel_config.tp_size 4 does not divide text_config.num_key_value_heads = 2", "use a tp_size among: 1, 2"
    )
    r = mm_convert(*base, "--cfg.parallel_config.llm_pp_layers", "[[2]]")
    _bad(
        r, "parallel_config.llm_pp_layers [[2]] sums to 2 but untied/config.json has text_config.num_hidden_layers = 3"
    )
    r = mm_convert(*base, "--cfg.parallel_config.llm_pp_layers", "[[3]]", "--cfg.parallel_config.tp_size", "2",
                   "--cfg.parallel_config.vit_tp_size", "3")  # fmt: skip
    _bad(r, "parallel_config.tp_size 2 does not divide the largest TP size 3 (tp_size 2, vit_tp_size 3)")
    assert not (tmp_path / "out").exists()


def test_a_wrong_family_is_named(glm_dirs: dict, tmp_path: Path) -> None:
    with pytest.raises(ConvertError, match="model_type 'glm4v' is not a Qwen2-VL model"):
        prepare(Job(converter="Qwen2VLConverter", command="hf_to_mm", cfg=HfToMmConfig(
            mm_dir=tmp_path / "o", hf_config=HfConfig(hf_dir=glm_dirs["tied"]), parallel_config=_pc("tp1"))))  # fmt: skip


def test_lora_both_ways(glm_dirs: dict, converted: dict, tmp_path: Path) -> None:
    """A PEFT adapter on the language model (fused gate_up_proj included) and the vision encoder's qkv and MLP:
    cut for TP 2 / PP 2 and back gives the adapter's file byte for byte; merged on the way, the checkpoint is
    the conversion of the merged HF model."""
    from engine.job import LoraConfig, LoraHfToMmConfig, LoraMmToHfConfig, MergeLoraConfig
    from tests.fixtures.tiny_lora import build_peft_adapter

    hf = glm_dirs["untied"]
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj", "qkv", "gate_proj", "up_proj"]
    build_peft_adapter(hf, tmp_path / "peft", target_modules=targets)
    lora = LoraConfig(adapter_dir=tmp_path / "peft")
    jobs = [
        ("lora_hf_to_mm", LoraHfToMmConfig(mm_dir=tmp_path / "lora_mm", hf_config=HfConfig(hf_dir=hf), lora=lora,
                                           parallel_config=_pc("tp2_pp2"))),
        ("lora_mm_to_hf", LoraMmToHfConfig(save_hf_dir=tmp_path / "lora_back", hf_config=HfConfig(hf_dir=hf),
                                           lora=LoraConfig(adapter_dir=tmp_path / "lora_mm"))),
        ("merge_lora", MergeLoraConfig(save_hf_dir=tmp_path / "merged", hf_config=HfConfig(hf_dir=hf), lora=lora)),
        ("hf_to_mm", HfToMmConfig(mm_dir=tmp_path / "on_the_way", hf_config=HfConfig(hf_dir=hf), lora=lora,
                                  parallel_config=_pc("tp2_pp2"))),
        ("hf_to_mm", HfToMmConfig(mm_dir=tmp_path / "of_merged", hf_config=HfConfig(hf_dir=tmp_path / "merged"),
                                  parallel_config=_pc("tp2_pp2"))),
    ]  # fmt: skip
    for command, cfg in jobs:
        _, plan = prepare(Job(converter=CONVERTER, command=command, cfg=cfg))
        assert check_plan(plan) == [], command
        run(plan, cfg.out_dir)
    name = "adapter_model.safetensors"
    assert filecmp.cmp(tmp_path / "peft" / name, tmp_path / "lora_back" / name, shallow=False)
    a, b = _load_dir(tmp_path / "on_the_way"), _load_dir(tmp_path / "of_merged")
    assert sorted(a) == sorted(b)
    for rank in a:
        assert a[rank]["model"].keys() == b[rank]["model"].keys()
        assert all(torch.equal(a[rank]["model"][k], b[rank]["model"][k]) for k in a[rank]["model"]), rank
    qkv = "image_encoder.encoder.blocks.layers.0.self_attention.qkv.weight"  # replicated, and adapted
    plain = _load_dir(converted[("untied", "tp2_pp2")])["mp_rank_00_000"]["model"][qkv]
    assert not torch.equal(a["mp_rank_00_000"]["model"][qkv], plain)


@pytest.mark.oracle
def test_megatron_reproduces_transformers_logits(glm_dirs: dict, converted: dict) -> None:
    """megatron-core's GPTModel with GLM-4's two extra norms (applied as MindSpeed-MM's GLM layer applies them:
    on the attention's and the MLP's outputs, before the residual add), partial interleaved rotary (half of each
    head's dims, pairs rotated as transformers' rotate_half_llm), on our TP 2 language-model files: transformers'
    logits for a text-only sequence."""
    pytest.importorskip("megatron.core")
    from transformers import Glm4vForConditionalGeneration

    from mmtui.megatron_logits import GPTArch, megatron_logits

    hf = glm_dirs["untied"]
    rope = TEXT["rope_parameters"]
    arch = GPTArch(
        num_layers=TEXT["num_hidden_layers"], hidden_size=TEXT["hidden_size"],
        num_attention_heads=TEXT["num_attention_heads"], num_query_groups=TEXT["num_key_value_heads"],
        ffn_hidden_size=TEXT["intermediate_size"], vocab_size=TEXT["vocab_size"], rotary_base=rope["rope_theta"],
        norm_epsilon=TEXT["rms_norm_eps"], add_qkv_bias=True, tied=False,
        rotary_percent=rope["partial_rotary_factor"], post_norms=True, extra={"rotary_interleaved": True},
    )  # fmt: skip
    ranks = []
    for t in range(2):
        state = torch.load(converted[("untied", "tp2")] / "release" / f"mp_rank_{t:02d}" / "model_optim_rng.pt",
                           weights_only=True)["model"]  # fmt: skip
        ranks.append({k.removeprefix("text_decoder."): v for k, v in state.items() if k.startswith("text_decoder.")})
    tokens = [3, 17, 42, 99, 5, 64, 127, 1]
    got = megatron_logits(ranks, arch, tokens)
    from transformers import Glm4vConfig

    config = Glm4vConfig.from_pretrained(hf)  # mrope sections cover half the rotary dims (the fixture's are for
    config.text_config.rope_parameters["mrope_section"] = [1, 1, 2]  # weights only); text-only: all positions equal
    model = Glm4vForConditionalGeneration.from_pretrained(hf, config=config, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        want = model(input_ids=torch.tensor([tokens])).logits[0]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
