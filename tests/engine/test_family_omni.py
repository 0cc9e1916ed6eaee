"""Qwen2.5-Omni (Qwen2_5_OmniConverter): the thinker's three modules, as MindSpeed-MM writes them.

The reference below is written from MindSpeed-MM's checkpoint/vlm_model/converters/qwen2_5omni.py
(its renames, QKV merges and TP patterns, the audio k bias as zeros: QVToQKVMergeOp) and
hf_to_mm.py (the PP stage schemas of the vision, text and audio modules, split_by_tp's
per-module TP sizes). The talker and token2wav are not part of MindSpeed-MM's model.
"""

from __future__ import annotations

import filecmp
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine.formats.mm_source import open_checkpoint
from engine.job import HfConfig, HfToMmConfig, Job, MmToHfConfig, ResplitConfig, prepare
from engine.layout import ParallelConfig
from engine.planning.check import check_plan
from engine.run.execute import run
from engine.run.verify import compare, identical, open_side
from engine.source.disk_layout import infer_layout
from engine.source.hf_source import inspect_hf
from tests.engine.test_hf_to_mm import _assert_same, _load_dir
from tests.fixtures.reference_layout import fuse_qkv_gqa, stage_cells
from tests.fixtures.tiny_omni import AUDIO, TALKER, TEXT, VISION, build_tiny_omni
from tests.test_cli import _bad, mm_convert

CONVERTER = "Qwen2_5_OmniConverter"
LAYOUTS = {
    # name: (tp_size, vit_tp_size, audio_tp_size, llm_pp_layers, vit_pp_layers, audio_pp_layers)
    "tp1": (1, 0, 0, [[3]], [[2]], [[3]]),
    "tp2": (2, 0, 0, [[3]], [[2]], [[3]]),
    "pp2": (1, 0, 0, [[1, 2]], [[2, 0]], [[1, 2]]),  # vision on stage 0, audio and LLM over both
    "tp2_pp2": (2, 0, 0, [[1, 2]], [[2, 0]], [[1, 2]]),
    "tp2_enc1": (2, 1, 1, [[3]], [[2]], [[3]]),  # both encoders whole on each of the two ranks
    "tp2_audio1_pp2": (2, 0, 1, [[1, 2]], [[2, 0]], [[3, 0]]),
}

VISION_LAYER = {"norm1": "input_layernorm", "norm2": "pre_mlp_layernorm", "attn.proj": "self_attention.linear_proj",
                "mlp.down_proj": "mlp.linear_fc2"}  # fmt: skip
AUDIO_LAYER = {"self_attn_layer_norm": "input_layernorm", "final_layer_norm": "pre_mlp_layernorm",
               "self_attn.out_proj": "self_attention.linear_proj", "fc1": "mlp.linear_fc1", "fc2": "mlp.linear_fc2"}  # fmt: skip
AUDIO_WHOLE = {"conv1": "conv1", "conv2": "conv2", "audio_bos_eos_token": "audio_bos_eos_token", "ln_post": "ln_post",
               "proj": "proj"}  # fmt: skip
TEXT_LAYER = {"input_layernorm": "input_layernorm", "post_attention_layernorm": "pre_mlp_layernorm",
              "self_attn.o_proj": "self_attention.linear_proj", "mlp.down_proj": "mlp.linear_fc2"}  # fmt: skip
# the peer's stage schemas: (module prefix, layer prefix, first-stage prefixes, last-stage prefixes)
SCHEMAS = {
    "vit": ("image_encoder.", "image_encoder.encoder.blocks.layers.", ["image_encoder.encoder.patch_embed."],
            ["image_encoder.projector."]),
    "audio": ("audio_encoder.", "audio_encoder.encoder.blocks.layers.",
              ["audio_encoder.encoder.conv", "audio_encoder.encoder.audio_bos_eos_token"],
              ["audio_encoder.encoder.proj", "audio_encoder.encoder.ln_post"]),
    "llm": ("text_decoder.", "text_decoder.decoder.layers.", ["text_decoder.embedding."],
            ["text_decoder.decoder.final_layernorm.", "text_decoder.output_layer."]),
}  # fmt: skip


def load_hf(hf_dir: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(hf_dir.glob("*.safetensors")) for k, v in load_file(f).items()}


def _both(hf: dict, src: str, dst: str, out: dict) -> None:
    for p in ("weight", "bias"):
        if f"{src}.{p}" in hf:
            out[f"{dst}.{p}"] = hf[f"{src}.{p}"]


def full_state(hf: dict[str, torch.Tensor], tied: bool) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    v, a, t = "thinker.visual.", "thinker.audio_tower.", "thinker.model."
    _both(hf, v + "patch_embed.proj", "image_encoder.encoder.patch_embed.proj", out)
    for i in range(VISION["depth"]):
        src, dst = f"{v}blocks.{i}.", f"image_encoder.encoder.blocks.layers.{i}."
        for x, y in VISION_LAYER.items():
            _both(hf, src + x, dst + y, out)
        for p in ("weight", "bias"):
            q, k, vv = (hf[f"{src}attn.{n}.{p}"] for n in "qkv")
            out[f"{dst}self_attention.linear_qkv.{p}"] = fuse_qkv_gqa(q, k, vv, 4, 4)  # one head per group
            out[f"{dst}mlp.linear_fc1.{p}"] = torch.cat([hf[f"{src}mlp.gate_proj.{p}"], hf[f"{src}mlp.up_proj.{p}"]])
    _both(hf, v + "merger.ln_q", "image_encoder.projector.layernorm", out)
    _both(hf, v + "merger.mlp.0", "image_encoder.projector.encoder.linear_fc1", out)
    _both(hf, v + "merger.mlp.2", "image_encoder.projector.encoder.linear_fc2", out)
    for x, y in AUDIO_WHOLE.items():
        _both(hf, a + x, "audio_encoder.encoder." + y, out)
    heads = AUDIO["encoder_attention_heads"]
    for i in range(AUDIO["encoder_layers"]):
        src, dst = f"{a}layers.{i}.", f"audio_encoder.encoder.blocks.layers.{i}."
        for x, y in AUDIO_LAYER.items():
            _both(hf, src + x, dst + y, out)
        q, k, vv = (hf[f"{src}self_attn.{n}_proj.weight"] for n in "qkv")
        out[dst + "self_attention.linear_qkv.weight"] = fuse_qkv_gqa(q, k, vv, heads, heads)
        qb, vb = hf[src + "self_attn.q_proj.bias"], hf[src + "self_attn.v_proj.bias"]
        out[dst + "self_attention.linear_qkv.bias"] = fuse_qkv_gqa(qb, torch.zeros_like(qb), vb, heads, heads)
    out["text_decoder.embedding.word_embeddings.weight"] = hf[t + "embed_tokens.weight"]
    for i in range(TEXT["num_hidden_layers"]):
        src, dst = f"{t}layers.{i}.", f"text_decoder.decoder.layers.{i}."
        for x, y in TEXT_LAYER.items():
            _both(hf, src + x, dst + y, out)
        for p in ("weight", "bias"):
            q, k, vv = (hf[f"{src}self_attn.{n}_proj.{p}"] for n in "qkv")
            out[f"{dst}self_attention.linear_qkv.{p}"] = fuse_qkv_gqa(q, k, vv, 4, 2)
        out[dst + "mlp.linear_fc1.weight"] = torch.cat(
            [hf[src + "mlp.gate_proj.weight"], hf[src + "mlp.up_proj.weight"]]
        )
    out["text_decoder.decoder.final_layernorm.weight"] = hf[t + "norm.weight"]
    out["text_decoder.output_layer.weight"] = hf[t + "embed_tokens.weight"] if tied else hf["thinker.lm_head.weight"]
    return out


ROWS = ("text_decoder.output_layer.weight", "text_decoder.embedding.word_embeddings.weight",
        "linear_qkv.weight", "linear_qkv.bias", "projector.encoder.linear_fc1.weight",
        "projector.encoder.linear_fc1.bias")  # fmt: skip
COLS = ("linear_proj.weight", "linear_fc2.weight")


def shard(key: str, t: torch.Tensor, tp: int, r: int) -> torch.Tensor:
    """The peer's TP patterns (qwen2_5_vl_tp_patterns and the audio ones)."""
    if tp == 1:
        return t
    gated = key.endswith("mlp.linear_fc1.weight") and key.startswith("text_decoder.")
    gated |= key.startswith("image_encoder.encoder.blocks.") and "mlp.linear_fc1." in key
    if gated:
        gate, up = t.chunk(2)
        return torch.cat([gate.chunk(tp)[r], up.chunk(tp)[r]])
    if key.endswith(ROWS) or (key.startswith("audio_encoder.encoder.blocks.") and "mlp.linear_fc1." in key):
        return t.chunk(tp)[r]
    if key.endswith(COLS):
        return t.chunk(tp, dim=1)[r]
    return t


def expected(hf_dir: Path, name: str) -> dict[str, dict]:
    tp, vit_tp, audio_tp, llm, vit, audio = LAYOUTS[name]
    tied = json.loads((hf_dir / "config.json").read_text())["thinker_config"]["text_config"]["tie_word_embeddings"]
    full = full_state(load_hf(hf_dir), tied)
    pp = len(llm[0])
    sizes = {"vit": vit_tp or tp, "audio": audio_tp or tp, "llm": tp}
    placed: dict[int, dict[str, tuple[str, str]]] = {s: {} for s in range(pp)}  # stage -> key -> (local, module)
    for module, counts in (("vit", vit), ("audio", audio), ("llm", llm)):
        prefix, layer_prefix, firsts, lasts = SCHEMAS[module]
        cells = [(s, start, n) for _, s, start, n in stage_cells(counts)]
        used = [s for s, _, n in cells if n]
        for key in (k for k in full if k.startswith(prefix)):
            if key.startswith(layer_prefix):
                layer, rest = key[len(layer_prefix) :].split(".", 1)
                s, start, _ = next(c for c in cells if c[1] <= int(layer) < c[1] + c[2])
                placed[s][key] = (f"{layer_prefix}{int(layer) - start}.{rest}", module)
            elif key.startswith(tuple(firsts)):
                placed[used[0]][key] = (key, module)
            elif key.startswith(tuple(lasts)):
                if not (key == "text_decoder.output_layer.weight" and tied and pp == 1):
                    placed[used[-1]][key] = (key, module)
            else:
                raise AssertionError(key)
    out = {}
    for r in range(max(sizes.values())):
        for s in range(pp):
            model = {local: shard(g, full[g], sizes[m], r % sizes[m]).clone() for g, (local, m) in placed[s].items()}
            out[f"mp_rank_{r:02d}" + (f"_{s:03d}" if pp > 1 else "")] = {"model": model, "checkpoint_version": 3.0}
    return out


def _pc(name: str) -> ParallelConfig:
    tp, vit_tp, audio_tp, llm, vit, audio = LAYOUTS[name]
    return ParallelConfig(
        tp_size=tp, vit_tp_size=vit_tp, audio_tp_size=audio_tp, llm_pp_layers=llm, vit_pp_layers=vit,
        audio_pp_layers=audio,
    )  # fmt: skip


@pytest.fixture(scope="module")
def omni_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("omni")
    return {
        "thinker": build_tiny_omni(root / "thinker", shards=2),
        "talker": build_tiny_omni(root / "talker", talker=True, tied=True),  # the hub's whole model, tied
    }


@pytest.fixture(scope="module")
def converted(omni_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Path]:
    root = tmp_path_factory.mktemp("omni_mm")
    out = {}
    for variant, hf in omni_dirs.items():
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
@pytest.mark.parametrize("variant", ["thinker", "talker"])
def test_layout_matches_reference(omni_dirs: dict, converted: dict, variant: str, layout: str) -> None:
    _assert_same(_load_dir(converted[(variant, layout)]), expected(omni_dirs[variant], layout))


def test_the_audio_k_bias_is_zeros(converted: dict) -> None:
    d = AUDIO["d_model"] // AUDIO["encoder_attention_heads"]
    for rank, obj in _load_dir(converted[("thinker", "tp2")]).items():
        bias = obj["model"]["audio_encoder.encoder.blocks.layers.0.self_attention.linear_qkv.bias"]
        per_head = bias.view(-1, 3, d)  # [q_h; k_h; v_h] for each of this rank's heads
        assert per_head.shape[0] == 2 and not per_head[:, 1].any() and per_head[:, 0].all(), rank


def test_talker_is_left_out_and_said(omni_dirs: dict) -> None:
    info = inspect_hf(omni_dirs["talker"])
    cfg = HfToMmConfig(
        mm_dir=Path("unused"), hf_config=HfConfig(hf_dir=omni_dirs["talker"]), parallel_config=_pc("tp1")
    )
    _, plan = prepare(Job(converter=CONVERTER, command="hf_to_mm", cfg=cfg), check_out=False)
    assert set(TALKER) <= set(plan.dropped) and set(TALKER) <= set(info.tensors)
    assert any("4 tensors of talker.*, token2wav.* are not written" in n for n in plan.notes), plan.notes
    assert not any(k.startswith(("talker", "token2wav")) for f in plan.files for e in f.entries for k in [e.key])


@pytest.mark.parametrize(("variant", "layout", "given"), [("talker", "tp2_pp2", True), ("talker", "tp2_audio1_pp2", False),
                                                          ("thinker", "tp2_enc1", False)])  # fmt: skip
def test_way_back_is_byte_identical(
    omni_dirs: dict, converted: dict, tmp_path: Path, variant: str, layout: str, given: bool
) -> None:
    hf = omni_dirs[variant]
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


@pytest.mark.parametrize("layout", ["tp2_enc1", "tp2_audio1_pp2", "pp2"])
def test_the_disk_gives_the_layout_back(omni_dirs: dict, converted: dict, layout: str) -> None:
    got = infer_layout(inspect_hf(omni_dirs["thinker"]), open_checkpoint(converted[("thinker", layout)]))
    tp, vit_tp, audio_tp, llm, vit, audio = LAYOUTS[layout]
    assert (got.tp_size, got.tp_of("vit"), got.tp_of("audio")) == (tp, vit_tp or tp, audio_tp or tp)
    assert (got.llm_pp_layers, got.vit_pp_layers, got.audio_pp_layers) == (llm, vit, audio)


@pytest.mark.parametrize(("a", "b"), [("tp2_pp2", "tp2_audio1_pp2"), ("tp2_enc1", "tp1")])
def test_resplit_equals_direct_conversion(omni_dirs: dict, converted: dict, tmp_path: Path, a: str, b: str) -> None:
    cfg = ResplitConfig(
        source_dir=converted[("talker", a)], target_dir=tmp_path / "b", hf_config=HfConfig(hf_dir=omni_dirs["talker"]),
        target_parallel_config=_pc(b),
    )  # fmt: skip
    _, plan = prepare(Job(converter=CONVERTER, command="resplit", cfg=cfg))
    assert check_plan(plan) == []
    run(plan, tmp_path / "b")
    direct = converted[("talker", b)]
    files = sorted(p.relative_to(direct) for p in direct.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    for rel in files:
        assert filecmp.cmp(direct / rel, tmp_path / "b" / rel, shallow=False), rel


def test_a_trained_k_bias_is_refused_on_the_way_back(omni_dirs: dict, converted: dict, tmp_path: Path) -> None:
    """HF has no k bias to put it in: the way back (and a re-cut) refuses rather than drop it."""
    mm = tmp_path / "mm"
    shutil.copytree(converted[("thinker", "tp2_pp2")], mm)
    path = mm / "release" / "mp_rank_01_001" / "model_optim_rng.pt"
    obj = torch.load(path, weights_only=True)
    key = "audio_encoder.encoder.blocks.layers.1.self_attention.linear_qkv.bias"
    obj["model"][key][8 + 3] = 0.5  # head 0's k part (rows 8..15 of [q_0; k_0; v_0; ...])
    torch.save(obj, path)
    hf = str(omni_dirs["thinker"])
    r = mm_convert(CONVERTER, "mm_to_hf", "--cfg.save_hf_dir", str(tmp_path / "back"), "--cfg.mm_dir", str(mm),
                   "--cfg.hf_config.hf_dir", hf)  # fmt: skip
    _bad(r, f"mm_dir {mm}: mp_rank_01_001 [model] {key} row 11 is not zero", "must stay zero")
    assert not (tmp_path / "back").exists()
    r = mm_convert(CONVERTER, "resplit", "--cfg.source_dir", str(mm), "--cfg.target_dir", str(tmp_path / "b"),
                   "--cfg.hf_config.hf_dir", hf, "--cfg.target_parallel_config.llm_pp_layers", "[[3]]",
                   "--cfg.target_parallel_config.vit_pp_layers", "[[2]]",
                   "--cfg.target_parallel_config.audio_pp_layers", "[[3]]")  # fmt: skip
    _bad(r, f"source_dir {mm}: mp_rank_01_001 [model] {key} row 11 is not zero")


def test_bad_layouts_are_one_line(omni_dirs: dict, tmp_path: Path) -> None:
    base = [CONVERTER, "hf_to_mm", "--cfg.mm_dir", str(tmp_path / "out"), "--cfg.hf_config.hf_dir",
            str(omni_dirs["thinker"]), "--cfg.parallel_config.llm_pp_layers", "[[3]]",
            "--cfg.parallel_config.vit_pp_layers", "[[2]]"]  # fmt: skip
    _bad(
        mm_convert(*base), "parallel_config.audio_pp_layers is missing; Qwen2.5-Omni has an audio encoder whose layers"
    )
    audio = ["--cfg.parallel_config.audio_pp_layers", "[[3]]"]
    _bad(mm_convert(*base, "--cfg.parallel_config.audio_pp_layers", "[[2]]"),
         "parallel_config.audio_pp_layers [[2]] sums to 2 but thinker/config.json has "
         "thinker_config.audio_config.encoder_layers = 3")  # fmt: skip
    _bad(
        mm_convert(*base, *audio, "--cfg.parallel_config.tp_size", "2", "--cfg.parallel_config.audio_tp_size", "3"),
        "parallel_config.tp_size 2 does not divide the largest TP size 3 (tp_size 2, vit_tp_size 2, audio_tp_size 3)",
    )
    _bad(
        mm_convert(*base, *audio, "--cfg.parallel_config.audio_tp_size", "8"),
        "parallel_config.audio_tp_size 8 does not divide thinker_config.audio_config.encoder_attention_heads = 4",
    )
    _bad(mm_convert(*base, "--cfg.parallel_config.audio_pp_layers", "[[3,0]]"),
         "parallel_config.audio_pp_layers[0] = [3, 0] has 2 stage(s)")  # fmt: skip
    assert not (tmp_path / "out").exists()


def test_verify_finds_the_hf_model_in_the_checkpoint(omni_dirs: dict, converted: dict) -> None:
    """The Megatron side stands for what the way back writes: its tensors, plus the talker from hf_dir."""
    hf = omni_dirs["talker"]
    info = inspect_hf(hf)
    rows = list(
        compare(open_side(hf, None, None, "hf"), open_side(converted[("talker", "tp2_audio1_pp2")], info, None, "mm"))
    )
    assert len(rows) == len(load_hf(hf)) and identical(rows)


@pytest.mark.oracle
def test_megatron_reproduces_the_thinkers_logits(omni_dirs: dict, converted: dict) -> None:
    """The language model of a TP 2 checkpoint (encoders at TP 1) in megatron-core's GPTModel gives the
    thinker's logits on text tokens (fp32, 1e-5): the Qwen2 language model's renames, QKV fusion and splits."""
    pytest.importorskip("megatron.core")
    from transformers import Qwen2_5OmniThinkerConfig, Qwen2_5OmniThinkerForConditionalGeneration

    from mmtui.megatron_logits import GPTArch, megatron_logits
    from tests.fixtures.tiny_omni import HUB_NAMES

    hf = omni_dirs["thinker"]
    got_dir = converted[("thinker", "tp2_enc1")]
    ranks = []
    for r in range(2):
        state = torch.load(got_dir / "release" / f"mp_rank_{r:02d}" / "model_optim_rng.pt", weights_only=True)
        ranks.append({k[len("text_decoder.") :]: v for k, v in state["model"].items() if k.startswith("text_decoder.")})
    arch = GPTArch(
        num_layers=TEXT["num_hidden_layers"], hidden_size=TEXT["hidden_size"], num_attention_heads=4,
        num_query_groups=2, ffn_hidden_size=TEXT["intermediate_size"], vocab_size=TEXT["vocab_size"],
        rotary_base=1e6, norm_epsilon=1e-6, add_qkv_bias=True, tied=False,
    )  # fmt: skip
    tokens = [3, 17, 99, 5, 42, 7, 64, 127, 0, 11, 23, 88]
    got = megatron_logits(ranks, arch, tokens)

    thinker = json.loads((hf / "config.json").read_text())["thinker_config"]
    model = Qwen2_5OmniThinkerForConditionalGeneration(Qwen2_5OmniThinkerConfig(**thinker)).eval()
    back = {old: new for new, old in HUB_NAMES}
    state = {}
    for k, v in load_hf(hf).items():
        old = next(o for o in back if k.startswith(o))
        state[back[old] + k[len(old) :]] = v
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and not missing, (missing, unexpected)
    with torch.no_grad():
        want = model(input_ids=torch.tensor([tokens])).logits[0]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_zero_k_is_only_for_a_fused_qkv(tmp_path: Path) -> None:
    from engine.errors import ConvertError
    from engine.preset import load_preset_file

    text = (Path(__file__).parents[2] / "presets" / "qwen2_5_omni.toml").read_text()
    old = 'hf = "thinker.audio_tower.conv1"\n'
    path = tmp_path / "broken.toml"
    path.write_text(text.replace(old, old + "zero_k = true\n", 1))
    with pytest.raises(ConvertError) as err:
        load_preset_file(path)
    assert str(err.value).endswith(
        "(the mapping to 'audio_encoder.encoder.conv1'): zero_k needs kind 'qkv' (a fused q, k, v whose k has no bias)"
    )


def test_only_a_missing_k_bias_is_zeros(omni_dirs: dict, tmp_path: Path) -> None:
    """A missing k *weight* is a broken checkpoint, not a zero: refused with the names."""
    from safetensors.torch import save_file

    from engine.errors import ConvertError

    hf = tmp_path / "hf"
    shutil.copytree(omni_dirs["talker"], hf)
    state = load_file(hf / "model.safetensors")
    del state["thinker.audio_tower.layers.1.self_attn.k_proj.weight"]
    save_file(state, hf / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConvertError, match=r"thinker.audio_tower.layers.1.self_attn.q_proj.weight is present but "
                       r"thinker.audio_tower.layers.1.self_attn.k_proj.weight is missing"):  # fmt: skip
        prepare(Job(converter=CONVERTER, command="hf_to_mm", cfg=HfToMmConfig(
            mm_dir=tmp_path / "o", hf_config=HfConfig(hf_dir=hf), parallel_config=_pc("tp1"))))  # fmt: skip


def test_a_thinker_saved_alone_converts_the_same(omni_dirs: dict, converted: dict, tmp_path: Path) -> None:
    """transformers' Qwen2_5OmniThinkerForConditionalGeneration saved alone (config at the top, model.* names):
    the same rank files as the hub's layout of the same weights, and its own files back byte for byte."""
    hf = build_tiny_omni(tmp_path / "hf", thinker_only=True, shards=2)
    assert not any(k.startswith("thinker.") for k in load_hf(hf))
    cfg = HfToMmConfig(mm_dir=tmp_path / "mm", hf_config=HfConfig(hf_dir=hf), parallel_config=_pc("tp2_pp2"))
    run(prepare(Job(converter=CONVERTER, command="hf_to_mm", cfg=cfg))[1], tmp_path / "mm")
    _assert_same(_load_dir(tmp_path / "mm"), _load_dir(converted[("thinker", "tp2_pp2")]))
    back = MmToHfConfig(save_hf_dir=tmp_path / "back", mm_dir=tmp_path / "mm", hf_config=HfConfig(hf_dir=hf))
    run(prepare(Job(converter=CONVERTER, command="mm_to_hf", cfg=back))[1], tmp_path / "back")
    for f in hf.iterdir():
        assert filecmp.cmp(f, tmp_path / "back" / f.name, shallow=False), f.name
