"""LoRA merge: W + scale * B @ A in float32, into any output format and layout, from an HF or a Megatron base."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.errors import ConvertError
from engine.job import (
    HfConfig,
    HfToMmConfig,
    LoraConfig,
    LoraHfToMmConfig,
    LoraMmToHfConfig,
    MergeLoraConfig,
    MmToHfConfig,
    ResplitConfig,
)
from engine.layout import ParallelConfig
from tests.engine.test_hf_to_mm import _assert_same, _load_dir
from tests.engine.test_llm_families import TOKENS, _arch, _convert, _hf_to_mm, _rank_models
from tests.engine.test_way_back import _same_tree
from tests.fixtures.reference_internvl import expected_internvl, expected_internvl_lora, megatron_name
from tests.fixtures.tiny_lora import build_peft_adapter, reference_merge
from tests.fixtures.tiny_vlm import legacy_name, load_hf_state
from tests.test_cli import _bad, _nothing_written, mm_convert

TP2_PP2 = ParallelConfig(tp_size=2, llm_pp_layers=[[1, 3]])


@pytest.fixture(scope="module")
def adapters(tiny_llms: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lora")
    build_peft_adapter(tiny_llms["llama"], root / "llama")
    build_peft_adapter(tiny_llms["qwen2_tied"], root / "qwen2_rslora", r=8, alpha=16, rslora=True, seed=1)
    return {"llama": root / "llama", "qwen2_rslora": root / "qwen2_rslora"}


def _merge(hf: Path, adapter: Path, out: Path) -> Path:
    lora = LoraConfig(adapter_dir=adapter)
    return _convert(hf, "merge_lora", MergeLoraConfig(save_hf_dir=out, hf_config=HfConfig(hf_dir=hf), lora=lora))


def _files_state(d: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(d.glob("*.safetensors")) for k, v in load_file(f).items()}


@pytest.mark.parametrize(("variant", "adapter"), [("llama", "llama"), ("qwen2_tied", "qwen2_rslora")])
def test_merged_hf_equals_reference_merge(
    tiny_llms: dict[str, Path], adapters: dict[str, Path], tmp_path: Path, variant: str, adapter: str
) -> None:
    hf = tiny_llms[variant]
    out = _merge(hf, adapters[adapter], tmp_path / "merged")
    base = _files_state(hf)
    want = reference_merge(base, adapters[adapter])
    got = _files_state(out)
    assert got.keys() == want.keys()
    changed = [k for k in want if not torch.equal(want[k], base[k])]
    assert len(changed) == 7 * 4  # seven linear layers in each of four layers
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
    # the base's shard files, index and non-weight files
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in hf.iterdir())


def test_peft_merge_and_unload_agrees(tiny_llms: dict[str, Path], tmp_path: Path) -> None:
    hf = tiny_llms["llama"]
    peft_model = build_peft_adapter(hf, tmp_path / "adapter", r=4, alpha=16, seed=3)
    peft_state = {k: v.detach() for k, v in peft_model.merge_and_unload().state_dict().items()}
    got = _files_state(_merge(hf, tmp_path / "adapter", tmp_path / "merged"))
    for k, v in got.items():
        torch.testing.assert_close(v, peft_state[k], rtol=1e-6, atol=1e-7)


def test_merged_on_the_way_equals_merge_then_convert(
    tiny_llms: dict[str, Path], adapters: dict[str, Path], tmp_path: Path
) -> None:
    """hf_to_mm, resplit and mm_to_hf with cfg.lora write what converting the merged HF model writes."""
    hf, adapter = tiny_llms["llama"], adapters["llama"]
    lora = LoraConfig(adapter_dir=adapter)
    merged = _merge(hf, adapter, tmp_path / "merged")
    direct = _hf_to_mm(merged, tmp_path / "direct", TP2_PP2)
    on_the_way = _convert(
        hf, "hf_to_mm", HfToMmConfig(mm_dir=tmp_path / "mm", hf_config=HfConfig(hf_dir=hf), parallel_config=TP2_PP2,
                                     lora=lora),
    )  # fmt: skip
    _same_tree(direct, on_the_way)
    # a Megatron base: merge while re-cutting, and while going back to HF
    base_mm = _hf_to_mm(hf, tmp_path / "base_mm", ParallelConfig(llm_pp_layers=[[2, 2]]))
    resplit = _convert(
        hf, "resplit", ResplitConfig(source_dir=base_mm, target_dir=tmp_path / "resplit", hf_config=HfConfig(hf_dir=hf),
                                     source_parallel_config=ParallelConfig(llm_pp_layers=[[2, 2]]),
                                     target_parallel_config=TP2_PP2, lora=lora),
    )  # fmt: skip
    _same_tree(direct, resplit)
    back = _convert(
        hf, "mm_to_hf", MmToHfConfig(save_hf_dir=tmp_path / "back", mm_dir=base_mm, hf_config=HfConfig(hf_dir=hf),
                                     parallel_config=ParallelConfig(llm_pp_layers=[[2, 2]]), lora=lora),
    )  # fmt: skip
    _same_tree(merged, back)


def test_vision_language_adapter_in_new_spelling(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    """transformers 5 names Qwen2-VL's modules model.language_model.*; the files use model.*: both map."""
    hf = tiny_dirs["qwen2_vl"]
    build_peft_adapter(hf, tmp_path / "adapter", target_modules=["q_proj", "v_proj", "down_proj"])
    keys = load_file(tmp_path / "adapter" / "adapter_model.safetensors").keys()
    assert any(k.startswith("base_model.model.model.language_model.layers.") for k in keys)
    out = _merge(hf, tmp_path / "adapter", tmp_path / "merged")
    want = reference_merge(load_hf_state(hf), tmp_path / "adapter", legacy_name)
    got = load_hf_state(out)
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert not torch.equal(
        got["model.layers.0.self_attn.q_proj.weight"], load_hf_state(hf)["model.layers.0.self_attn.q_proj.weight"]
    )


def test_bf16_merge_rounds_once(tiny_llms: dict[str, Path], adapters: dict[str, Path], tmp_path: Path) -> None:
    """A bf16 base: the sum is formed in float32 and rounded to bf16 once (as the reference does)."""
    hf = tmp_path / "bf16"
    hf.mkdir()
    for p in tiny_llms["llama"].iterdir():
        if p.suffix == ".safetensors":
            save_file({k: v.bfloat16() for k, v in load_file(p).items()}, hf / p.name, metadata={"format": "pt"})
        else:
            (hf / p.name).write_bytes(p.read_bytes())
    got = _files_state(_merge(hf, adapters["llama"], tmp_path / "merged"))
    want = reference_merge(_files_state(hf), adapters["llama"])
    assert all(got[k].dtype == torch.bfloat16 and torch.equal(got[k], want[k]) for k in want)


def _merge_cli(hf: Path, adapter: Path, out: Path):
    return mm_convert(
        "LlamaConverter", "merge_lora", "--cfg.save_hf_dir", str(out), "--cfg.hf_config.hf_dir", str(hf),
        "--cfg.lora.adapter_dir", str(adapter),
    )  # fmt: skip


def _copy_adapter(adapter: Path, to: Path) -> Path:
    to.mkdir()
    for p in adapter.iterdir():
        (to / p.name).write_bytes(p.read_bytes())
    return to


def test_bad_adapters_are_one_clear_line(tiny_llms: dict[str, Path], adapters: dict[str, Path], tmp_path: Path) -> None:
    hf = tiny_llms["llama"]
    work = tmp_path / "work"
    work.mkdir()
    assert _merge_cli(hf, adapters["llama"], work / "ok").returncode == 0
    # r in adapter_config.json that the tensors do not have
    bad_r = _copy_adapter(adapters["llama"], tmp_path / "bad_r")
    cfg = json.loads((bad_r / "adapter_config.json").read_text())
    (bad_r / "adapter_config.json").write_text(json.dumps({**cfg, "r": 8}))
    _bad(_merge_cli(hf, bad_r, work / "a"), "lora_A.weight is [4, 128] but adapter_config.json has r = 8")
    # a target module the base does not have
    absent = _copy_adapter(adapters["llama"], tmp_path / "absent")
    (absent / "adapter_config.json").write_text(json.dumps({**cfg, "target_modules": ["q_proj", "qkv_proj"]}))
    _bad(_merge_cli(hf, absent, work / "b"), "target_modules names 'qkv_proj', which matches no module")
    # adapter shapes made for another model
    other = _copy_adapter(adapters["llama"], tmp_path / "other")
    tensors = load_file(other / "adapter_model.safetensors")
    key = "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"
    tensors[key] = torch.zeros(32, 4)
    save_file(tensors, other / "adapter_model.safetensors")
    _bad(_merge_cli(hf, other, work / "c"), "do not fit model.layers.1.mlp.down_proj.weight [64, 128]")
    # a layer the base does not have
    deeper = _copy_adapter(adapters["llama"], tmp_path / "deeper")
    tensors = load_file(deeper / "adapter_model.safetensors")
    for ab in "AB":
        tensors[f"base_model.model.model.layers.7.self_attn.q_proj.lora_{ab}.weight"] = tensors[
            f"base_model.model.model.layers.0.self_attn.q_proj.lora_{ab}.weight"
        ].clone()
    save_file(tensors, deeper / "adapter_model.safetensors")
    _bad(_merge_cli(hf, deeper, work / "d"), "targets model.layers.7.self_attn.q_proj.weight, which the base model in")
    _nothing_written(work, "ok")


@pytest.mark.oracle
@pytest.mark.parametrize("tp", [1, 2])
def test_merged_megatron_reproduces_peft_logits(tiny_llms: dict[str, Path], tmp_path: Path, tp: int) -> None:
    """megatron-core on the merged TP-split output == transformers + PEFT with the adapter active (1e-5, fp32)."""
    pytest.importorskip("megatron.core")
    from mmtui.megatron_logits import megatron_logits

    hf = tiny_llms["llama"]
    peft_model = build_peft_adapter(hf, tmp_path / "adapter", seed=5)
    layout = ParallelConfig(tp_size=tp, llm_pp_layers=[[4]])
    cfg = HfToMmConfig(mm_dir=tmp_path / "mm", hf_config=HfConfig(hf_dir=hf), parallel_config=layout,
                       lora=LoraConfig(adapter_dir=tmp_path / "adapter"))  # fmt: skip
    mm = _convert(hf, "hf_to_mm", cfg)
    got = megatron_logits(_rank_models(mm, tp), _arch(hf), TOKENS)
    with torch.no_grad():
        want = peft_model(input_ids=torch.tensor([TOKENS])).logits[0]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


# ---- adapters in Megatron layout, unmerged ----------------------------------------------------------


def _lora_to_mm(hf: Path, adapter: Path, out: Path, layout: ParallelConfig) -> Path:
    cfg = LoraHfToMmConfig(mm_dir=out, hf_config=HfConfig(hf_dir=hf), lora=LoraConfig(adapter_dir=adapter),
                           parallel_config=layout)  # fmt: skip
    return _convert(hf, "lora_hf_to_mm", cfg)


def _lora_to_peft(hf: Path, mm: Path, out: Path, layout: ParallelConfig, **lora) -> Path:
    cfg = LoraMmToHfConfig(save_hf_dir=out, hf_config=HfConfig(hf_dir=hf),
                           lora=LoraConfig(adapter_dir=mm, parallel_config=layout, **lora))  # fmt: skip
    return _convert(hf, "lora_mm_to_hf", cfg)


@pytest.mark.parametrize(("variant", "adapter"), [("llama", "llama"), ("qwen2_tied", "qwen2_rslora")])
def test_peft_to_megatron_and_back_is_byte_identical(
    tiny_llms: dict[str, Path], adapters: dict[str, Path], tmp_path: Path, variant: str, adapter: str
) -> None:
    hf = tiny_llms[variant]
    mm = _lora_to_mm(hf, adapters[adapter], tmp_path / "mm", TP2_PP2)
    assert sorted(p.name for p in (mm / "release").iterdir()) == [
        "mp_rank_00_000", "mp_rank_00_001", "mp_rank_01_000", "mp_rank_01_001",
    ]  # fmt: skip
    back = _lora_to_peft(hf, mm, tmp_path / "back", TP2_PP2)
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (back / name).read_bytes() == (adapters[adapter] / name).read_bytes(), name


def _rank_state(mm: Path, rank: str) -> dict[str, torch.Tensor]:
    return torch.load(mm / "release" / rank / "model_optim_rng.pt", weights_only=True)["model"]


def test_megatron_adapter_updates_are_the_peft_updates(
    tiny_llms: dict[str, Path], adapters: dict[str, Path], tmp_path: Path
) -> None:
    """On every rank, alpha_mm / R x lora_B @ lora_A is that rank's block of the merged weight's update."""
    hf, adapter = tiny_llms["llama"], adapters["llama"]
    mm = _lora_to_mm(hf, adapter, tmp_path / "mm", TP2_PP2)
    side = json.loads((mm / "lora_layout.json").read_text())
    assert (side["lora_r"], side["lora_alpha"], side["blocks_per_target"]) == (12, 24, 3)  # q, k, v: 3 x r = 4
    base = _hf_to_mm(hf, tmp_path / "base", TP2_PP2)
    lora = LoraConfig(adapter_dir=adapter)
    merged = _convert(hf, "hf_to_mm", HfToMmConfig(mm_dir=tmp_path / "merged", hf_config=HfConfig(hf_dir=hf),
                                                   parallel_config=TP2_PP2, lora=lora))  # fmt: skip
    scale = side["lora_alpha"] / side["lora_r"]
    checked = 0
    for rank in ("mp_rank_00_000", "mp_rank_01_001"):
        w0, w1, ab = _rank_state(base, rank), _rank_state(merged, rank), _rank_state(mm, rank)
        for key, a in ab.items():
            if ".lora_A." not in key:
                continue
            target = key.replace(".lora_A.default.weight", ".weight")
            update = scale * ab[key.replace(".lora_A.", ".lora_B.")].float() @ a.float()
            torch.testing.assert_close(w0[target] + update, w1[target], rtol=0, atol=1e-6)
            checked += 1
    assert checked == (1 + 3) * 4  # qkv, proj, fc1, fc2 of stage 0 (1 layer) and stage 1 (3 layers)


def test_merging_a_megatron_adapter_equals_merging_the_peft_one(
    tiny_llms: dict[str, Path], adapters: dict[str, Path], tmp_path: Path
) -> None:
    hf, adapter = tiny_llms["llama"], adapters["llama"]
    mm = _lora_to_mm(hf, adapter, tmp_path / "mm", TP2_PP2)
    lora = LoraConfig(adapter_dir=mm, parallel_config=TP2_PP2)
    from_mm = _convert(hf, "merge_lora", MergeLoraConfig(save_hf_dir=tmp_path / "a", hf_config=HfConfig(hf_dir=hf),
                                                         lora=lora))  # fmt: skip
    _same_tree(_merge(hf, adapter, tmp_path / "b"), from_mm)


def _mindspeed_adapter(hf: Path, out: Path, r: int) -> dict[str, torch.Tensor]:
    """A LoRA checkpoint as MindSpeed training writes one (TP 1, PP 1): one A per module, on linear_qkv and
    linear_fc2 only; built here with plain torch."""
    cfg = json.loads((hf / "config.json").read_text())
    hidden, inter, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    heads, groups = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    qkv_rows = (heads + 2 * groups) * hidden // heads
    gen = torch.Generator().manual_seed(7)
    state = {}
    for i in range(layers):
        pre = f"decoder.layers.{i}."
        state[pre + "self_attention.linear_qkv.lora_A.default.weight"] = torch.randn(r, hidden, generator=gen)
        state[pre + "self_attention.linear_qkv.lora_B.default.weight"] = torch.randn(qkv_rows, r, generator=gen)
        state[pre + "mlp.linear_fc2.lora_A.default.weight"] = torch.randn(r, inter, generator=gen)
        state[pre + "mlp.linear_fc2.lora_B.default.weight"] = torch.randn(hidden, r, generator=gen)
    _save_ranks(out, [state])
    return state


def _save_ranks(out: Path, ranks: list[dict[str, torch.Tensor]]) -> None:
    for t, state in enumerate(ranks):
        (out / "release" / f"mp_rank_{t:02d}").mkdir(parents=True)
        obj = {"model": state, "checkpoint_version": 3.0}
        torch.save(obj, out / "release" / f"mp_rank_{t:02d}" / "model_optim_rng.pt")
    (out / "latest_checkpointed_iteration.txt").write_text("release")


def _tp2(state: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """MindSpeed's TP split of a LoRA: lora_B of a column-parallel layer by rows, lora_A of a row-parallel one by
    columns, the rest whole on both ranks (grouped QKV rows split at KV-group boundaries: 2 groups, 1 each)."""
    ranks: list[dict[str, torch.Tensor]] = [{}, {}]
    for key, t in state.items():
        column_parallel = "linear_qkv" in key
        split = ".lora_B." if column_parallel else ".lora_A."
        parts = t.chunk(2, dim=0 if column_parallel else 1) if split in key else (t, t)
        for r in range(2):
            ranks[r][key] = parts[r].clone()
    return ranks


def test_a_mindspeed_trained_adapter_becomes_peft(tiny_llms: dict[str, Path], tmp_path: Path) -> None:
    """One A per module: q, k and v each get that A and their rows of B (grouped order undone)."""
    hf = tiny_llms["llama"]
    state = _mindspeed_adapter(hf, tmp_path / "ms", r=4)
    one = ParallelConfig(llm_pp_layers=[[4]])
    with pytest.raises(ConvertError, match=r"give lora\.r and lora\.alpha"):
        _lora_to_peft(hf, tmp_path / "ms", tmp_path / "x", one)
    with pytest.raises(ConvertError, match=r"has shape \[4, 64\] on disk, the layout expects \[8, 64\]"):
        _lora_to_peft(hf, tmp_path / "ms", tmp_path / "y", one, r=8, alpha=16)
    peft = _lora_to_peft(hf, tmp_path / "ms", tmp_path / "peft", one, r=4, alpha=16)
    cfg = json.loads((peft / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["target_modules"]) == (4, 16, ["down_proj", "k_proj", "q_proj", "v_proj"])
    got = load_file(peft / "adapter_model.safetensors")
    assert len(got) == 4 * 4 * 2
    b = state["decoder.layers.2.self_attention.linear_qkv.lora_B.default.weight"]
    groups = b.reshape(2, (2 + 2) * 16, 4)  # 2 KV groups of [2 q heads; k; v], head size 16
    key = "base_model.model.model.layers.2.self_attn.{}.lora_{}.weight"
    assert torch.equal(got[key.format("q_proj", "B")], groups[:, :32].reshape(-1, 4))
    assert torch.equal(got[key.format("k_proj", "B")], groups[:, 32:48].reshape(-1, 4))
    assert torch.equal(got[key.format("v_proj", "B")], groups[:, 48:].reshape(-1, 4))
    a = state["decoder.layers.2.self_attention.linear_qkv.lora_A.default.weight"]
    assert all(torch.equal(got[key.format(m, "A")], a) for m in ("q_proj", "k_proj", "v_proj"))
    # the same adapter cut for TP 2 as MindSpeed cuts it reads back to the same PEFT files
    _save_ranks(tmp_path / "ms_tp2", _tp2(state))
    tp2 = ParallelConfig(tp_size=2, llm_pp_layers=[[4]])
    peft2 = _lora_to_peft(hf, tmp_path / "ms_tp2", tmp_path / "peft2", tp2, r=4, alpha=16)
    assert (peft2 / "adapter_model.safetensors").read_bytes() == (peft / "adapter_model.safetensors").read_bytes()
    # merging it directly gives what merging its PEFT form gives
    lora = LoraConfig(adapter_dir=tmp_path / "ms", parallel_config=one, r=4, alpha=16)
    direct = _convert(hf, "merge_lora", MergeLoraConfig(save_hf_dir=tmp_path / "m1", hf_config=HfConfig(hf_dir=hf),
                                                        lora=lora))  # fmt: skip
    _same_tree(_merge(hf, peft, tmp_path / "m2"), direct)


def test_an_adapter_trained_on_after_conversion_is_read_whole(
    tiny_llms: dict[str, Path], adapters: dict[str, Path], tmp_path: Path
) -> None:
    """Training in MindSpeed fills the zero blocks: the way back must keep them (one A of rank K x r per module)."""
    hf = tiny_llms["llama"]
    one = ParallelConfig(llm_pp_layers=[[4]])
    mm = _lora_to_mm(hf, adapters["llama"], tmp_path / "mm", one)
    path = mm / "release" / "mp_rank_00" / "model_optim_rng.pt"
    obj = torch.load(path, weights_only=True)
    obj["model"]["decoder.layers.1.self_attention.linear_qkv.lora_B.default.weight"][0, 11] = 0.5  # q row, v block
    torch.save(obj, path)
    peft = _lora_to_peft(hf, mm, tmp_path / "peft", one)
    assert json.loads((peft / "adapter_config.json").read_text())["r"] == 12
    lora = LoraConfig(adapter_dir=mm, parallel_config=one)
    direct = _convert(hf, "merge_lora", MergeLoraConfig(save_hf_dir=tmp_path / "m1", hf_config=HfConfig(hf_dir=hf),
                                                        lora=lora))  # fmt: skip
    _same_tree(_merge(hf, peft, tmp_path / "m2"), direct)
    q = "model.layers.1.self_attn.q_proj.weight"
    assert not torch.equal(load_file(direct / "model-00001-of-00002.safetensors").get(q, torch.zeros(1)),
                           _files_state(_merge(hf, adapters["llama"], tmp_path / "m3"))[q])  # fmt: skip


def test_lora_commands_on_the_command_line(tiny_llms: dict[str, Path], adapters: dict[str, Path], tmp_path: Path):
    hf = tiny_llms["llama"]
    r = mm_convert(
        "LlamaConverter", "lora_hf_to_mm", "--cfg.mm_dir", str(tmp_path / "mm"), "--cfg.hf_config.hf_dir", str(hf),
        "--cfg.lora.adapter_dir", str(adapters["llama"]), "--cfg.parallel_config.llm_pp_layers", "[[1,3]]",
        "--cfg.parallel_config.tp_size", "2",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    side = json.loads((tmp_path / "mm" / "lora_layout.json").read_text())
    flags = f"--lora-r {side['lora_r']} --lora-alpha {side['lora_alpha']:g}"
    assert f"note: LoRA in Megatron layout: R = {side['lora_r']} " in r.stderr
    assert r.stdout.rstrip().endswith(f" MB; train on with {flags}"), r.stdout
    r = mm_convert(
        "LlamaConverter", "lora_mm_to_hf", "--cfg.save_hf_dir", str(tmp_path / "peft"), "--cfg.hf_config.hf_dir",
        str(hf), "--cfg.lora.adapter_dir", str(tmp_path / "mm"), "--cfg.lora.parallel_config.llm_pp_layers", "[[2,2]]",
        "--cfg.lora.parallel_config.tp_size", "2",
    )  # fmt: skip
    _bad(
        r,
        "layers.1.self_attention.linear_qkv.lora_A.default.weight is missing; the layout (tp_size=2, llm_pp_layers=[[2, 2]])",
    )
    assert not (tmp_path / "peft").exists()
    # each direction refuses the other's input
    r = mm_convert(
        "LlamaConverter", "lora_mm_to_hf", "--cfg.save_hf_dir", str(tmp_path / "peft"), "--cfg.hf_config.hf_dir",
        str(hf), "--cfg.lora.adapter_dir", str(adapters["llama"]),
    )  # fmt: skip
    _bad(r, "latest_checkpointed_iteration.txt; lora_mm_to_hf takes a Megatron LoRA checkpoint")
    r = mm_convert(
        "LlamaConverter", "lora_hf_to_mm", "--cfg.mm_dir", str(tmp_path / "mm2"), "--cfg.hf_config.hf_dir", str(hf),
        "--cfg.lora.adapter_dir", str(tmp_path / "mm"), "--cfg.parallel_config.llm_pp_layers", "[[4]]",
    )  # fmt: skip
    _bad(r, "a Megatron LoRA checkpoint; lora_hf_to_mm takes a PEFT adapter")
    assert not (tmp_path / "peft").exists() and not (tmp_path / "mm2").exists()


def test_vision_language_adapter_round_trip(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    """Qwen2.5-VL: adapters on the ViT's per-head QKV and gated MLP and the LLM's grouped QKV, TP2 / PP2, and back."""
    hf = tiny_dirs["qwen2_5_vl"]
    targets = ["qkv", "gate_proj", "q_proj", "k_proj", "v_proj", "o_proj"]
    build_peft_adapter(hf, tmp_path / "adapter", target_modules=targets)
    layout = ParallelConfig(tp_size=2, llm_pp_layers=[[1, 3]], vit_pp_layers=[[3, 0]])
    mm = _lora_to_mm(hf, tmp_path / "adapter", tmp_path / "mm", layout)
    keys = set(_rank_state(mm, "mp_rank_01_000"))
    assert "image_encoder.encoder.blocks.layers.0.self_attention.linear_qkv.lora_B.default.weight" in keys
    assert "image_encoder.encoder.blocks.layers.0.mlp.linear_fc1.lora_A.default.weight" in keys
    back = _lora_to_peft(hf, mm, tmp_path / "back", layout)
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (back / name).read_bytes() == (tmp_path / "adapter" / name).read_bytes(), name


def test_an_adapter_on_a_tied_output_layer_is_refused(tiny_llms: dict[str, Path], tmp_path: Path) -> None:
    """Tied embeddings: the output layer is written from the embedding, so a LoRA on lm_head would be lost."""
    hf = tmp_path / "tied"
    hf.mkdir()
    for p in tiny_llms["qwen2_tied"].iterdir():
        (hf / p.name).write_bytes(p.read_bytes())
    state = load_file(hf / "model.safetensors")
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()  # some checkpoints still carry it
    save_file(state, hf / "model.safetensors", metadata={"format": "pt"})
    build_peft_adapter(hf, tmp_path / "adapter", target_modules=["q_proj", "lm_head"])
    weights = tmp_path / "adapter" / "adapter_model.safetensors"  # as saved with save_embedding_layers=False
    save_file({k: v for k, v in load_file(weights).items() if "base_layer" not in k}, weights)
    cfg = HfToMmConfig(mm_dir=tmp_path / "mm", hf_config=HfConfig(hf_dir=hf), parallel_config=TP2_PP2,
                       lora=LoraConfig(adapter_dir=tmp_path / "adapter"))  # fmt: skip
    with pytest.raises(ConvertError, match=r"changes lm_head\.weight, which this output does not write as itself"):
        _convert(hf, "hf_to_mm", cfg)
    assert not (tmp_path / "mm").exists()


# ---- InternVL: the projector is a plain nn.Linear, so its adapter is whole on every rank (issue 18) ----------

INTERNVL_TARGETS = ["qkv", "proj", "fc1", "fc2", "mlp1.1", "mlp1.3", "wqkv", "wo", "w2"]
INTERNVL_TP2_HETERO = ParallelConfig(tp_size=2, llm_pp_layers=[[0, 2, 2]], vit_pp_layers=[[2, 1, 0]])


def _internvl_adapter(hf: Path, out: Path, r: int = 4, alpha: float = 8.0) -> dict[str, torch.Tensor]:
    """A PEFT adapter for a hand-written InternVL (transformers cannot build one), as peft saves it: one lora_A
    [r, in] and lora_B [out, r] per targeted nn.Linear, named base_model.model.<module>.lora_A.weight."""
    state = load_hf_state(hf)
    gen = torch.Generator().manual_seed(5)
    tensors = {}
    for key, w in state.items():
        module = key.removesuffix(".weight")
        if key.endswith(".weight") and any(module.endswith("." + t) or module == t for t in INTERNVL_TARGETS):
            tensors[f"base_model.model.{module}.lora_A.weight"] = 0.1 * torch.randn(r, w.shape[1], generator=gen)
            tensors[f"base_model.model.{module}.lora_B.weight"] = 0.1 * torch.randn(w.shape[0], r, generator=gen)
    out.mkdir(parents=True)
    save_file(tensors, out / "adapter_model.safetensors", metadata={"format": "pt"})
    config = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": INTERNVL_TARGETS, "bias": "none"}
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return tensors


def _internvl_megatron_name(module: str) -> str:
    """PEFT module path -> the Megatron weight (InternViT and projector from the reference, InternLM2 by hand)."""
    vit = megatron_name(module + ".weight")
    if vit:
        return vit
    layer, rest = module.removeprefix("language_model.model.layers.").split(".", 1)
    name = {"attention.wqkv": "self_attention.linear_qkv", "attention.wo": "self_attention.linear_proj",
            "feed_forward.w2": "mlp.linear_fc2"}[rest]  # fmt: skip
    return f"text_decoder.decoder.layers.{layer}.{name}.weight"


@pytest.mark.parametrize(
    "layout",
    [INTERNVL_TP2_HETERO, ParallelConfig(tp_size=4, llm_pp_layers=[[1, 3]], vit_pp_layers=[[3, 0]])],
    ids=["tp2_hetero", "tp4_pp2"],
)
def test_internvl_adapter_layout_matches_reference(tiny_internvls: dict[str, Path], tmp_path: Path, layout) -> None:
    """Beside the projector lora_A and lora_B are whole on every rank; beside InternViT's and InternLM2's
    parallel layers they are cut like the layer; and the way back gives the PEFT files byte for byte."""
    hf = tiny_internvls["internlm2"]
    peft = _internvl_adapter(hf, tmp_path / "adapter")
    mm = _lora_to_mm(hf, tmp_path / "adapter", tmp_path / "mm", layout)
    side = json.loads((mm / "lora_layout.json").read_text())
    assert (side["lora_r"], side["lora_alpha"], side["blocks_per_target"]) == (4, 8, 1)  # one source per target
    modules = {k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] for k in peft}
    want = expected_internvl_lora(
        peft, {m: _internvl_megatron_name(m) for m in modules}, vit_heads=6, tp=layout.tp_size,
        llm_pp_layers=layout.llm_pp_layers, vit_pp_layers=layout.vit_pp_layers,
    )  # fmt: skip
    _assert_same(_load_dir(mm), want)
    fc1_a = "image_encoder.projector.linear_fc1.lora_A.default.weight"
    holders = [r for r, obj in want.items() if fc1_a in obj["model"]]
    assert len(holders) == layout.tp_size
    assert all(torch.equal(want[r]["model"][fc1_a], peft["base_model.model.mlp1.1.lora_A.weight"]) for r in holders)
    back = _lora_to_peft(hf, mm, tmp_path / "back", layout)
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (back / name).read_bytes() == (tmp_path / "adapter" / name).read_bytes(), name


def test_internvl_merged_on_the_way_equals_reference(tiny_internvls: dict[str, Path], tmp_path: Path) -> None:
    """hf_to_mm with the adapter writes the reference layout of the reference merge: the merged projector
    whole on every rank; and merging the Megatron adapter back into HF gives the reference merge."""
    hf = tiny_internvls["internlm2"]
    _internvl_adapter(hf, tmp_path / "adapter")
    merged = reference_merge(load_hf_state(hf), tmp_path / "adapter")
    lora = LoraConfig(adapter_dir=tmp_path / "adapter")
    layout = INTERNVL_TP2_HETERO
    mm = _convert(hf, "hf_to_mm", HfToMmConfig(mm_dir=tmp_path / "mm", hf_config=HfConfig(hf_dir=hf),
                                               parallel_config=layout, lora=lora))  # fmt: skip
    cfg = json.loads((hf / "config.json").read_text())
    want = expected_internvl(
        merged, llm="internlm2", heads=cfg["llm_config"]["num_attention_heads"],
        kv_heads=cfg["llm_config"]["num_key_value_heads"], vit_heads=6, tied=False, tp=2,
        llm_pp_layers=layout.llm_pp_layers, vit_pp_layers=layout.vit_pp_layers,
    )  # fmt: skip
    _assert_same(_load_dir(mm), want)
    adapter_mm = _lora_to_mm(hf, tmp_path / "adapter", tmp_path / "adapter_mm", layout)
    lora_mm = LoraConfig(adapter_dir=adapter_mm, parallel_config=layout)
    out = _convert(hf, "merge_lora", MergeLoraConfig(save_hf_dir=tmp_path / "merged", hf_config=HfConfig(hf_dir=hf),
                                                     lora=lora_mm))  # fmt: skip
    got = load_hf_state(out)
    assert sorted(got) == sorted(merged)
    assert all(torch.equal(got[k], merged[k]) for k in merged)
    assert not torch.equal(got["mlp1.1.weight"], load_hf_state(hf)["mlp1.1.weight"])
