"""Grouped-GEMM experts and expert TP (Mixtral, DeepSeek-V3): layout, way back, re-cuts, the disk reader, errors.

The expected rank files are the naive SequentialMLP references (tests/fixtures) regrouped here as the
consumers state it: Megatron-Core's GroupedMLP reads `weight1.view(E, hidden, -1)[e]` as local expert e's
fc1 transposed and `weight2.view(E, -1, hidden)[e]` as its fc2 transposed (megatron/core/transformer/moe/
experts.py, 0.16), which is MindSpeed-LLM's `torch.cat([fc1.t() ...]).view(hidden, -1)` (convert_hf2mg.py);
TEGroupedMLP names expert e's tensors `linear_fc1.weight{e}`. With an expert TP of 1 every TP rank holds
whole experts (MindSpeed-LLM repeats each expert over the TP ranks before cutting it).
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

import pytest
import torch

from engine.errors import ConvertError
from engine.formats.mm_source import open_checkpoint
from engine.job import HfConfig, HfToMmConfig, MmToHfConfig, ResplitConfig, prepare
from engine.layout import ParallelConfig, layout_problems
from engine.source.disk_layout import infer_layout
from engine.source.hf_source import inspect_hf
from tests.engine.test_hf_to_mm import _assert_same, _load_dir
from tests.engine.test_llm_families import _convert, _hf_to_mm
from tests.engine.test_way_back import _same_tree
from tests.fixtures import reference_deepseek, reference_layout
from tests.fixtures.tiny_vlm import load_hf_state

MODELS = {"mixtral": [[4]], "deepseek": [[3]]}  # name: llm_pp_layers of the TP2/EP2 layouts
MODES = ["legacy", "te"]
ETPS = [None, 1]  # the TP size (2), or whole experts on every TP rank


def _hf(name: str, tiny_llms: dict[str, Path], tiny_deepseeks: dict[str, Path]) -> Path:
    return tiny_llms["mixtral"] if name == "mixtral" else tiny_deepseeks["v3"]


def _layout(model: str, mode: str | bool, etp: int | None, tp: int = 2, ep: int = 2, llm=None) -> ParallelConfig:
    return ParallelConfig(
        tp_size=tp, ep_size=ep, llm_pp_layers=llm or MODELS[model], moe_grouped_gemm=mode, expert_tp_size=etp
    )


@pytest.fixture(scope="module")
def converted(tiny_llms, tiny_deepseeks, tmp_path_factory):
    """(model, mode, etp) -> its TP2/EP2 checkpoint, each written once for the module."""
    root, done = tmp_path_factory.mktemp("grouped"), {}

    def get(model: str, mode: str | bool, etp: int | None) -> Path:
        if (model, mode, etp) not in done:
            out = root / f"{model}_{mode}_{etp}"
            done[model, mode, etp] = _hf_to_mm(_hf(model, tiny_llms, tiny_deepseeks), out, _layout(model, mode, etp))
        return done[model, mode, etp]

    return get


# ---- the naive reference ----

_EXPERT = re.compile(r"^(?P<pre>.*\.mlp\.experts\.)local_experts\.(?P<e>\d+)\.(?P<fc>linear_fc[12])\.weight$")


def _sequential(model: str, hf: Path, tp: int, ep: int, llm) -> dict[str, dict]:
    state = load_hf_state(hf)
    if model == "deepseek":
        return reference_deepseek.expected_checkpoint(state, tp=tp, pp_layers=llm, ep=ep, experts=4)
    cfg = json.loads((hf / "config.json").read_text())
    return reference_layout.expected_checkpoint(
        state, family="mixtral", num_heads=cfg["num_attention_heads"], num_kv_heads=cfg["num_key_value_heads"],
        vit_num_heads=0, tied=False, tp=tp, llm_pp_layers=llm, vit_pp_layers=None, prefix="", ep=ep,
    )  # fmt: skip


def _whole_experts(by_tp: dict[str, dict], whole: dict[str, dict]) -> dict[str, dict]:
    """Expert TP 1: each rank's routed experts are TP rank 0's of the TP 1 reference (same PP and EP ranks)."""
    out = {}
    for name, obj in by_tp.items():
        one = whole["mp_rank_00" + name[len("mp_rank_00") :]]
        out[name] = dict(obj)
        for chunk in (k for k in obj if k.startswith("model")):
            out[name][chunk] = {
                k: (one[chunk][k] if _EXPERT.match(k) else t) for k, t in obj[chunk].items()
            }  # fmt: skip
    return out


def _grouped(ranks: dict[str, dict], mode: str) -> dict[str, dict]:
    """SequentialMLP rank files regrouped as GroupedMLP (legacy) or TEGroupedMLP (te) holds them."""
    out = {}
    for name, obj in ranks.items():
        out[name] = dict(obj)
        for chunk in (k for k in obj if k.startswith("model")):
            model: dict[str, torch.Tensor] = {}
            blocks: dict[str, dict[tuple[str, int], torch.Tensor]] = defaultdict(dict)
            for key, t in obj[chunk].items():
                m = _EXPERT.match(key)
                if m is None:
                    model[key] = t
                elif mode == "te":
                    model[f"{m['pre']}{m['fc']}.weight{m['e']}"] = t
                else:
                    blocks[m["pre"]][m["fc"], int(m["e"])] = t
            for pre, b in blocks.items():
                n = len(b) // 2
                fc1 = [b["linear_fc1", e] for e in range(n)]
                fc2 = [b["linear_fc2", e] for e in range(n)]
                hidden = fc1[0].shape[1]
                model[pre + "weight1"] = torch.cat([w.t() for w in fc1]).reshape(hidden, -1).clone()
                model[pre + "weight2"] = torch.cat([w.t() for w in fc2]).contiguous()
                # as GroupedMLP.forward reads them
                w1, w2 = model[pre + "weight1"].view(n, hidden, -1), model[pre + "weight2"].view(n, -1, hidden)
                assert all(torch.equal(w1[e].t(), fc1[e]) and torch.equal(w2[e].t(), fc2[e]) for e in range(n))
            out[name][chunk] = model
    return out


def _reference(model: str, hf: Path, mode: str | None, etp: int | None, tp: int = 2, ep: int = 2, llm=None):
    llm = llm or MODELS[model]
    want = _sequential(model, hf, tp, ep, llm)
    if etp == 1 and tp > 1:
        want = _whole_experts(want, _sequential(model, hf, 1, ep, llm))
    return _grouped(want, mode) if mode else want


@pytest.mark.parametrize("etp", ETPS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("model", list(MODELS))
def test_rank_files_equal_the_naive_reference(
    tiny_llms, tiny_deepseeks, converted, model: str, mode: str, etp: int | None
) -> None:
    hf = _hf(model, tiny_llms, tiny_deepseeks)
    _assert_same(_load_dir(converted(model, mode, etp)), _reference(model, hf, mode, etp))


def test_expert_tp_1_without_grouping(tiny_llms: dict[str, Path], tmp_path: Path) -> None:
    hf = tiny_llms["mixtral"]
    got = _load_dir(_hf_to_mm(hf, tmp_path / "mm", _layout("mixtral", False, 1)))
    _assert_same(got, _reference("mixtral", hf, None, 1))


def test_true_means_groupedmlp(tiny_llms: dict[str, Path], converted, tmp_path: Path) -> None:
    hf = tiny_llms["mixtral"]
    _same_tree(converted("mixtral", "legacy", None), _hf_to_mm(hf, tmp_path / "mm", _layout("mixtral", True, None)))


def test_grouped_with_pipeline_and_virtual_stages(tiny_llms: dict[str, Path], tmp_path: Path) -> None:
    hf, llm = tiny_llms["mixtral"], [[1, 1], [1, 1]]
    layout = _layout("mixtral", "legacy", 1, llm=llm)
    got = _load_dir(_hf_to_mm(hf, tmp_path / "mm", layout))
    _assert_same(got, _reference("mixtral", hf, "legacy", 1, llm=llm))
    _back_is_original(hf, tmp_path / "mm", tmp_path / "back")


# ---- the way back and re-cuts, with the layout read from the disk ----


def _back_is_original(hf: Path, mm: Path, out: Path) -> None:
    _convert(hf, "mm_to_hf", MmToHfConfig(save_hf_dir=out, mm_dir=mm, hf_config=HfConfig(hf_dir=hf)))
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in hf.iterdir())
    for p in hf.iterdir():
        if p.name == "model.safetensors.index.json":
            assert json.loads((out / p.name).read_text()) == json.loads(p.read_text())
        else:
            assert (out / p.name).read_bytes() == p.read_bytes(), p.name


@pytest.mark.parametrize("etp", ETPS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("model", list(MODELS))
def test_back_to_hf_is_byte_identical_and_the_layout_is_read_from_the_disk(
    tiny_llms, tiny_deepseeks, converted, tmp_path: Path, model: str, mode: str, etp: int | None
) -> None:
    hf = _hf(model, tiny_llms, tiny_deepseeks)
    mm = converted(model, mode, etp)
    assert infer_layout(inspect_hf(hf), open_checkpoint(mm)) == _layout(model, mode, etp)
    _back_is_original(hf, mm, tmp_path / "back")


@pytest.mark.parametrize(("variant", "mode"), [("qwen3_moe", "legacy"), ("qwen2_moe", "te"), ("v2_lite", "legacy")])
def test_every_moe_family_goes_there_and_back(tiny_llms, tiny_deepseeks, tmp_path: Path, variant: str, mode: str):
    """Qwen3-MoE (dense layers between), Qwen2-MoE (a gated shared expert), DeepSeek-V2-Lite: the same rule."""
    hf = tiny_deepseeks[variant] if variant in tiny_deepseeks else tiny_llms[variant]
    layers = json.loads((hf / "config.json").read_text())["num_hidden_layers"]
    layout = ParallelConfig(tp_size=2, ep_size=2, llm_pp_layers=[[layers]], moe_grouped_gemm=mode, expert_tp_size=1)
    mm = _hf_to_mm(hf, tmp_path / "mm", layout)
    assert infer_layout(inspect_hf(hf), open_checkpoint(mm)) == layout
    _back_is_original(hf, mm, tmp_path / "back")


def _resplit(hf: Path, src: Path, out: Path, target: ParallelConfig) -> Path:
    cfg = ResplitConfig(source_dir=src, target_dir=out, hf_config=HfConfig(hf_dir=hf), target_parallel_config=target)
    return _convert(hf, "resplit", cfg)


@pytest.mark.parametrize(
    ("model", "a", "b"),
    [
        ("mixtral", ("legacy", None), (False, None)),  # grouped -> sequential
        ("mixtral", (False, None), ("legacy", 1)),  # sequential -> grouped, whole experts
        ("mixtral", ("te", 1), ("legacy", None)),
        ("deepseek", ("legacy", 1), ("te", None)),
        ("deepseek", ("te", None), (False, None)),
    ],
)
def test_resplit_equals_a_direct_conversion(
    tiny_llms, tiny_deepseeks, converted, tmp_path: Path, model: str, a: tuple, b: tuple
) -> None:
    hf = _hf(model, tiny_llms, tiny_deepseeks)
    _same_tree(converted(model, *b), _resplit(hf, converted(model, *a), tmp_path / "b", _layout(model, *b)))


def test_resplit_to_another_shape_equals_a_direct_conversion(tiny_llms: dict[str, Path], converted, tmp_path):
    hf = tiny_llms["mixtral"]
    target = _layout("mixtral", "legacy", None, tp=1, ep=4, llm=[[1, 3]])  # one expert per rank, two stages
    direct = _hf_to_mm(hf, tmp_path / "direct", target)
    _same_tree(direct, _resplit(hf, converted("mixtral", "te", 1), tmp_path / "b", target))


def test_transformer_engine_grouped_linear_names(tiny_llms: dict[str, Path], tmp_path: Path) -> None:
    """TE's names: fused norms, and one `_extra_state` (None) per grouped linear, as TE saves it in torch format."""
    hf = tiny_llms["mixtral"]
    cfg = HfToMmConfig(
        mm_dir=tmp_path / "mm", hf_config=HfConfig(hf_dir=hf), parallel_config=_layout("mixtral", "te", None),
        transformer_impl="transformer_engine",
    )  # fmt: skip
    _convert(hf, "hf_to_mm", cfg)
    model = torch.load(tmp_path / "mm/release/mp_rank_01_001/model_optim_rng.pt", weights_only=True)["model"]
    layer0 = sorted(k.removeprefix("decoder.layers.0.") for k in model if k.startswith("decoder.layers.0."))
    assert layer0 == sorted(
        [
            "self_attention.linear_qkv.layer_norm_weight", "self_attention.linear_qkv.weight",
            "self_attention.linear_qkv._extra_state", "self_attention.linear_proj.weight",
            "self_attention.linear_proj._extra_state", "pre_mlp_layernorm.weight", "pre_mlp_layernorm._extra_state",
            "mlp.router.weight", "mlp.experts.linear_fc1.weight0", "mlp.experts.linear_fc1.weight1",
            "mlp.experts.linear_fc2.weight0", "mlp.experts.linear_fc2.weight1",
            "mlp.experts.linear_fc1._extra_state", "mlp.experts.linear_fc2._extra_state",
        ]
    )  # fmt: skip
    assert model["decoder.layers.0.mlp.experts.linear_fc1._extra_state"] is None
    _back_is_original(hf, tmp_path / "mm", tmp_path / "back")


def test_megatron_args_name_the_expert_layout(tiny_llms: dict[str, Path], tmp_path: Path) -> None:
    import argparse

    hf = tiny_llms["mixtral"]
    cfg = HfToMmConfig(
        mm_dir=tmp_path / "mm", hf_config=HfConfig(hf_dir=hf), parallel_config=_layout("mixtral", "legacy", 1),
        save_megatron_args=True,
    )  # fmt: skip
    _, plan = prepare(_job_of(hf, "hf_to_mm", cfg))
    args = plan.files[0].head["args"]
    assert isinstance(args, argparse.Namespace)
    assert (args.moe_grouped_gemm, args.expert_tensor_parallel_size, args.tensor_model_parallel_size) == (True, 1, 2)


def _job_of(hf: Path, command: str, cfg):
    from tests.engine.test_llm_families import _job

    return _job(hf, command, cfg)


# ---- bad values: one line, naming the field, the value and what is accepted ----


def test_layout_problems(tiny_llms: dict[str, Path]) -> None:
    moe, dense = inspect_hf(tiny_llms["mixtral"]), inspect_hf(tiny_llms["llama"])
    assert layout_problems(_layout("mixtral", False, 3), moe) == [
        "parallel_config.expert_tp_size 3: the experts' TP size must be 1 or tp_size 2 "
        "(as MindSpeed-LLM's --expert-tensor-parallel-size)"
    ]
    assert layout_problems(_layout("mixtral", False, 2, tp=1), moe)[0].startswith("parallel_config.expert_tp_size 2:")
    pc = ParallelConfig(llm_pp_layers=[[4]], moe_grouped_gemm="legacy")
    assert layout_problems(pc, dense) == [
        "parallel_config.moe_grouped_gemm legacy: Llama has no experts; use false"
    ]  # fmt: skip
    pc = ParallelConfig(llm_pp_layers=[[4]], tp_size=2, expert_tp_size=1)
    assert layout_problems(pc, dense) == [
        "parallel_config.expert_tp_size 1: Llama has no experts; leave it unset"
    ]  # fmt: skip


def test_a_sequential_layout_does_not_read_a_grouped_checkpoint(tiny_llms, converted, tmp_path: Path) -> None:
    hf, mm = tiny_llms["mixtral"], converted("mixtral", "legacy", None)
    cfg = MmToHfConfig(
        save_hf_dir=tmp_path / "back", mm_dir=mm, hf_config=HfConfig(hf_dir=hf),
        parallel_config=_layout("mixtral", False, None),
    )  # fmt: skip
    with pytest.raises(ConvertError, match=r"mlp\.experts\.weight1 is on disk but not in the layout"):
        prepare(_job_of(hf, "mm_to_hf", cfg))
    cfg.parallel_config = _layout("mixtral", "legacy", 1)  # the wrong expert TP: the shapes say so
    with pytest.raises(ConvertError, match=r"weight1 has shape \[64, 256\] on disk, the layout expects \[64, 512\]"):
        prepare(_job_of(hf, "mm_to_hf", cfg))
    assert not (tmp_path / "back").exists()


def test_command_line(tiny_llms: dict[str, Path], converted, tmp_path: Path) -> None:
    from tests.test_cli import mm_convert

    hf = tiny_llms["mixtral"]
    base = [
        "MixtralConverter", "hf_to_mm", "--cfg.hf_config.hf_dir", str(hf), "--cfg.parallel_config.llm_pp_layers",
        "[[4]]", "--cfg.parallel_config.tp_size", "2", "--cfg.parallel_config.ep_size", "2",
    ]  # fmt: skip
    r = mm_convert(*base, "--cfg.mm_dir", str(tmp_path / "cli"), "--cfg.parallel_config.moe_grouped_gemm", "te",
                   "--cfg.parallel_config.expert_tp_size", "1")  # fmt: skip
    assert r.returncode == 0, r.stderr
    _same_tree(converted("mixtral", "te", 1), tmp_path / "cli")
    r = mm_convert(*base, "--cfg.mm_dir", str(tmp_path / "bad"), "--cfg.parallel_config.expert_tp_size", "3")
    assert r.returncode == 2 and not (tmp_path / "bad").exists()
    (line,) = r.stderr.strip().splitlines()
    assert line.endswith("parallel_config.expert_tp_size 3: the experts' TP size must be 1 or tp_size 2 "
                         "(as MindSpeed-LLM's --expert-tensor-parallel-size)")  # fmt: skip
    r = mm_convert(*base, "--cfg.mm_dir", str(tmp_path / "bad"), "--cfg.parallel_config.moe_grouped_gemm", "fast")
    assert r.returncode == 2 and not (tmp_path / "bad").exists()
    (line,) = r.stderr.strip().splitlines()
    assert line == (
        "mm-convert: error: cfg.parallel_config.moe_grouped_gemm = 'fast': expected one of false, true (legacy), "
        "legacy (GroupedMLP's weight1/weight2), te (TEGroupedMLP's)"
    )


@pytest.mark.parametrize(("impl", "mode"), [("local", "legacy"), ("transformer_engine", "te")])
def test_convert_ckpt_moe_grouped_gemm(tiny_llms: dict[str, Path], converted, tmp_path: Path, impl: str, mode: str):
    """MindSpeed-LLM's --moe-grouped-gemm: GroupedMLP's tensors with the local layers, TEGroupedMLP's with TE."""
    from tests.test_convert_ckpt import _ranks, convert_ckpt

    hf = tiny_llms["mixtral"]
    r = convert_ckpt(
        "--load-model-type", "hf", "--save-model-type", "mg", "--load-dir", str(hf), "--save-dir", str(tmp_path / "mg"),
        "--target-tensor-parallel-size", "2", "--target-expert-parallel-size", "2", "--expert-tensor-parallel-size",
        "1", "--moe-grouped-gemm", "--transformer-impl", impl, "--model-type-hf", "mixtral",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    got = _ranks(tmp_path / "mg", "iter_0000001")
    assert (got["mp_rank_01_001"]["args"].moe_grouped_gemm, got["mp_rank_01_001"]["args"].expert_tensor_parallel_size) \
        == (True, 1)  # fmt: skip
    cfg = HfToMmConfig(
        mm_dir=tmp_path / "api", hf_config=HfConfig(hf_dir=hf), parallel_config=_layout("mixtral", mode, 1),
        transformer_impl=impl,
    )  # fmt: skip
    want = _load_dir(_convert(hf, "hf_to_mm", cfg))
    assert sorted(got) == sorted(want)
    for name, obj in want.items():
        assert sorted(got[name]["model"]) == sorted(obj["model"]), name
        assert all(t is None or torch.equal(got[name]["model"][k], t) for k, t in obj["model"].items()), name
    r = convert_ckpt("--load-model-type", "mg", "--save-model-type", "hf", "--load-dir", str(tmp_path / "mg"),
                     "--save-dir", str(tmp_path / "hf"), "--hf-cfg-dir", str(hf), "--model-type-hf", "mixtral")  # fmt: skip
    assert r.returncode == 0, r.stderr
    for p in hf.glob("*.safetensors"):
        assert (tmp_path / "hf" / p.name).read_bytes() == p.read_bytes(), p.name


# ---- the oracle: megatron-core 0.16's GroupedMLP (its gmm run on CPU by a shim) on our files == transformers ----


@pytest.mark.oracle
@pytest.mark.parametrize(("ep", "etp"), [(2, None), (1, 1)])  # TP 2 throughout; world sizes 4 and 2
def test_megatron_groupedmlp_reproduces_transformers_logits(
    tiny_llms: dict[str, Path], converted, tmp_path: Path, ep: int, etp: int | None
) -> None:
    pytest.importorskip("megatron.core")
    import dataclasses

    from mmtui.megatron_logits import megatron_logits
    from tests.engine.test_moe import TOKENS, _moe_arch
    from tests.fixtures.tiny_llm import tiny_llm_model

    hf = tiny_llms["mixtral"]
    if ep == 2:
        mm = converted("mixtral", "legacy", etp)
    else:
        mm = _hf_to_mm(hf, tmp_path / "mm", _layout("mixtral", "legacy", etp, ep=ep))
    ranks = [
        torch.load(
            mm / "release" / (f"mp_rank_{t:02d}" + (f"_{e:03d}" if ep > 1 else "")) / "model_optim_rng.pt",
            weights_only=True,
        )["model"]
        for e in range(ep)
        for t in range(2)
    ]
    extra = {"moe_grouped_gemm": True} | ({"expert_tensor_parallel_size": etp} if etp else {})
    got = megatron_logits(ranks, dataclasses.replace(_moe_arch(hf), extra=extra), TOKENS, ep=ep)
    model, _ = tiny_llm_model(hf)
    with torch.no_grad():
        want = model(input_ids=torch.tensor([TOKENS])).logits[0]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_verify_reads_grouped_experts(tiny_llms: dict[str, Path], converted) -> None:
    from tests.test_verify import verify

    hf, mm = tiny_llms["mixtral"], converted("mixtral", "legacy", 1)
    r = verify(str(hf), str(mm))  # the layout read from the disk
    assert r.returncode == 0 and "identical" in r.stdout, r.stdout + r.stderr
    layout = ["--b.tp_size", "2", "--b.ep_size", "2", "--b.llm_pp_layers", "[[4]]", "--b.expert_tp_size", "1"]
    r = verify(str(hf), str(mm), *layout, "--b.moe_grouped_gemm", "true")
    assert r.returncode == 0 and "identical" in r.stdout, r.stdout + r.stderr
    r = verify(str(hf), str(mm), *layout, "--b.moe_grouped_gemm", "te")
    assert r.returncode == 2
    (line,) = r.stderr.strip().splitlines()
    assert "decoder.layers.0.mlp.experts.weight1 is on disk but not in the layout" in line


def test_training_memory_shards_whole_experts_over_the_expert_data_parallel_group(tiny_llms: dict[str, Path]):
    """Expert TP 1 at TP 2: the expert data-parallel group has dp x TP / EP ranks (Megatron: world =
    TP x PP x dp = expert TP x EP x expert dp x PP), so the experts' optimizer state is cut four ways at dp 2."""
    from engine.planning.train_memory import train_memory

    hf = tiny_llms["mixtral"]
    state = load_hf_state(hf)
    experts = sum(t.numel() for k, t in state.items() if ".block_sparse_moe.experts." in k)
    layout = _layout("mixtral", "legacy", 1, ep=1)
    for rank in train_memory(inspect_hf(hf), layout, dp=2, distributed_optimizer=True):
        assert rank.expert_params == experts  # every TP rank holds every expert, whole
        dense = rank.params - experts
        assert rank.optimizer == 12 * (-(-dense // 2) + -(-experts // 4))
    with pytest.raises(ConvertError) as e:
        train_memory(inspect_hf(hf), _layout("mixtral", False, 1, ep=4), dp=1)
    assert str(e.value) == (
        "dp = 1: with ep_size 4 the data-parallel size must be a multiple of 2 "
        "(the expert data-parallel group has dp x 2 / ep ranks)"
    )


def _expert_adapter(hf: Path, out: Path) -> Path:
    """A PEFT adapter on Mixtral's expert w1/w2 of layer 1 (r 2, alpha 4), written by hand: peft targets
    transformers' fused experts, not the per-expert tensors of these checkpoints."""
    from safetensors.torch import save_file

    state = load_hf_state(hf)
    gen, tensors = torch.Generator().manual_seed(5), {}
    for e in range(4):
        for w in ("w1", "w2"):
            base = state[f"model.layers.1.block_sparse_moe.experts.{e}.{w}.weight"]
            name = f"base_model.model.model.layers.1.block_sparse_moe.experts.{e}.{w}"
            tensors[f"{name}.lora_A.weight"] = 0.1 * torch.randn(2, base.shape[1], generator=gen)
            tensors[f"{name}.lora_B.weight"] = 0.1 * torch.randn(base.shape[0], 2, generator=gen)
    out.mkdir()
    save_file(tensors, out / "adapter_model.safetensors")
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["w1", "w2"]}
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


def test_lora_merged_into_grouped_experts(tiny_llms: dict[str, Path], tmp_path: Path) -> None:
    """Merged while writing GroupedMLP's tensors: the same as merging first (merge_lora) and grouping after."""
    from engine.job import LoraConfig, LoraHfToMmConfig, MergeLoraConfig

    hf = tiny_llms["mixtral"]
    adapter = _expert_adapter(hf, tmp_path / "adapter")
    merged = _convert(
        hf, "merge_lora",
        MergeLoraConfig(save_hf_dir=tmp_path / "merged", hf_config=HfConfig(hf_dir=hf), lora=LoraConfig(adapter_dir=adapter)),
    )  # fmt: skip
    layout = _layout("mixtral", "legacy", None)
    cfg = HfToMmConfig(
        mm_dir=tmp_path / "mm", hf_config=HfConfig(hf_dir=hf), parallel_config=layout,
        lora=LoraConfig(adapter_dir=adapter),
    )  # fmt: skip
    got = _load_dir(_convert(hf, "hf_to_mm", cfg))
    _assert_same(got, _reference("mixtral", merged, "legacy", None))
    cfg = LoraHfToMmConfig(
        mm_dir=tmp_path / "lora_mm", hf_config=HfConfig(hf_dir=hf), parallel_config=layout,
        lora=LoraConfig(adapter_dir=adapter),
    )  # fmt: skip
    with pytest.raises(ConvertError, match=r"^decoder\.layers\.1\.mlp\.experts\.weight1: the adapter changes "):
        prepare(_job_of(hf, "lora_hf_to_mm", cfg))


def test_an_expert_tp_the_disk_reader_does_not_take_is_one_line(tiny_llms, tmp_path: Path) -> None:
    hf = tiny_llms["mixtral"]
    mm = _hf_to_mm(hf, tmp_path / "mm", _layout("mixtral", False, None, llm=[[1, 3]]))  # TP x PP x EP names
    path = mm / "release/mp_rank_00_000_000/model_optim_rng.pt"
    obj = torch.load(path, weights_only=True)
    key = "decoder.layers.0.mlp.experts.local_experts.0.linear_fc2.weight"
    full = load_hf_state(hf)["model.layers.0.block_sparse_moe.experts.0.w2.weight"].shape[1]
    obj["model"][key] = obj["model"][key][:, : full // 4].clone()  # a quarter: as if cut at expert TP 4
    torch.save(obj, path)
    with pytest.raises(ConvertError) as e:
        infer_layout(inspect_hf(hf), open_checkpoint(mm))
    assert str(e.value) == (
        f"mm_dir {mm}: {key} holds {full // 4} of an expert's {full} down-projection columns per rank: an expert TP "
        "size of 4; only 1 or the TP size 2 is read"
    )
