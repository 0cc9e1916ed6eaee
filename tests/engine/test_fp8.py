"""FP8 block-quantised weights (DeepSeek-V3's hub files) dequantised while streaming, against a naive dequantisation."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.errors import ConvertError
from engine.job import HfConfig, HfToMmConfig, prepare
from engine.layout import ParallelConfig
from engine.source.hf_source import inspect_hf
from tests.engine.test_hf_to_mm import _assert_same, _load_dir
from tests.engine.test_llm_families import _convert, _job
from tests.fixtures.reference_deepseek import expected_checkpoint
from tests.fixtures.tiny_deepseek import naive_dequantised
from tests.fixtures.tiny_vlm import load_hf_state

BLOCK = (16, 32)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _to_mm(hf: Path, out: Path, layout: ParallelConfig, **kw) -> Path:
    return _convert(
        hf, "hf_to_mm", HfToMmConfig(mm_dir=out, hf_config=HfConfig(hf_dir=hf), parallel_config=layout, **kw)
    )


def test_the_fixture_is_what_the_hub_ships(tiny_deepseeks: dict[str, Path]) -> None:
    state = load_hf_state(tiny_deepseeks["v3_fp8"])
    w, s = (
        state["model.layers.1.self_attn.kv_a_proj_with_mqa.weight"],
        state["model.layers.1.self_attn.kv_a_proj_with_mqa.weight_scale_inv"],
    )
    assert w.dtype == torch.float8_e4m3fn and w.shape == (24, 64)
    assert s.dtype == torch.float32 and s.shape == (2, 2)  # 24 rows in blocks of 16: one partial block
    assert state["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert state["model.layers.1.mlp.gate.weight"].dtype == torch.bfloat16  # the router is not quantised


@pytest.mark.parametrize("params_dtype", ["bf16", "fp32"])
@pytest.mark.parametrize(("tp", "ep", "llm"), [(1, 1, [[3]]), (2, 2, [[1, 2]])])
def test_output_equals_the_naive_dequantisation(
    tiny_deepseeks: dict[str, Path], tmp_path: Path, params_dtype: str, tp: int, ep: int, llm: list
) -> None:
    hf = tiny_deepseeks["v3_fp8"]
    kw = {} if params_dtype == "bf16" else {"params_dtype": params_dtype}
    _to_mm(hf, tmp_path / "out", ParallelConfig(tp_size=tp, ep_size=ep, llm_pp_layers=llm), **kw)
    state = naive_dequantised(load_hf_state(hf), BLOCK, DTYPES[params_dtype])
    if kw:  # an explicit params_dtype casts every float weight, as MindSpeed-LLM's --params-dtype does
        state = {k: v.to(DTYPES[params_dtype]) if v.is_floating_point() else v for k, v in state.items()}
    want = expected_checkpoint(state, tp=tp, pp_layers=llm, ep=ep, experts=4)
    _assert_same(_load_dir(tmp_path / "out"), want)


def test_plan_reads_fp8_as_one_tensor(tiny_deepseeks: dict[str, Path]) -> None:
    info = inspect_hf(tiny_deepseeks["v3_fp8"])
    assert not [n for n in info.tensors if n.endswith("_scale_inv")]
    meta = info.tensors["model.layers.2.mlp.experts.3.down_proj.weight"]
    assert (meta.dtype, meta.shape, meta.nbytes) == ("bfloat16", (64, 32), 64 * 32 * 2)


def _edited(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    for f in sorted(dst.glob("*.safetensors")):
        state = load_file(f)
        if edit(state) is not False:
            save_file(state, f, metadata={"format": "pt"})
    index = dst / "model.safetensors.index.json"
    if index.is_file():
        data = json.loads(index.read_text())
        names = {k for f in dst.glob("*.safetensors") for k in load_file(f)}
        data["weight_map"] = {k: v for k, v in data["weight_map"].items() if k in names}
        for f in dst.glob("*.safetensors"):
            data["weight_map"] |= dict.fromkeys(load_file(f), f.name)
        index.write_text(json.dumps(data))
    return dst


KEY = "model.layers.1.self_attn.kv_b_proj.weight"


def test_a_weight_without_its_scale_is_one_line(tiny_deepseeks: dict[str, Path], tmp_path: Path) -> None:
    hf = _edited(tiny_deepseeks["v3_fp8"], tmp_path / "hf", lambda s: s.pop(KEY + "_scale_inv", None))
    with pytest.raises(ConvertError, match=rf"tensor '{KEY}' is float8_e4m3fn but has no weight_scale_inv beside it"):
        inspect_hf(hf)


def test_a_scale_of_the_wrong_shape_is_one_line(tiny_deepseeks: dict[str, Path], tmp_path: Path) -> None:
    def edit(s):
        if KEY + "_scale_inv" in s:
            s[KEY + "_scale_inv"] = torch.ones(2, 2)

    hf = _edited(tiny_deepseeks["v3_fp8"], tmp_path / "hf", edit)
    with pytest.raises(ConvertError, match=rf"'{KEY}_scale_inv' has shape \[2, 2\]; {KEY} \[128, 16\] in blocks of \[16, 32\] needs \[8, 1\]"):  # fmt: skip
        inspect_hf(hf)


def test_a_scale_without_an_fp8_weight_is_one_line(tiny_deepseeks: dict[str, Path], tmp_path: Path) -> None:
    def edit(s):
        if KEY in s:
            s[KEY] = s[KEY].to(torch.bfloat16)

    hf = _edited(tiny_deepseeks["v3_fp8"], tmp_path / "hf", edit)
    with pytest.raises(ConvertError, match=rf"tensor '{KEY}_scale_inv' scales a weight that is not float8_e4m3fn"):
        inspect_hf(hf)


@pytest.mark.parametrize("size", [[128], [0, 128], "128"])
def test_a_bad_block_size_is_one_line(tiny_deepseeks: dict[str, Path], tmp_path: Path, size) -> None:
    hf = tmp_path / "hf"
    shutil.copytree(tiny_deepseeks["v3_fp8"], hf)
    cfg = json.loads((hf / "config.json").read_text())
    cfg["quantization_config"]["weight_block_size"] = size
    (hf / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConvertError) as err:
        inspect_hf(hf)
    assert str(err.value) == (
        f"{hf}/config.json: quantization_config.weight_block_size = {size!r}; expected two positive integers, "
        "e.g. [128, 128]"
    )


def test_params_dtype_is_checked(tiny_deepseeks: dict[str, Path], tmp_path: Path) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="params_dtype"):
        HfToMmConfig(
            mm_dir=tmp_path / "x", hf_config=HfConfig(hf_dir=tiny_deepseeks["v3_fp8"]),
            parallel_config=ParallelConfig(llm_pp_layers=[[3]]), params_dtype="int8",
        )  # fmt: skip
    _, plan = prepare(_job(tiny_deepseeks["v3_fp8"], "hf_to_mm", HfToMmConfig(
        mm_dir=tmp_path / "y", hf_config=HfConfig(hf_dir=tiny_deepseeks["v3_fp8"]),
        parallel_config=ParallelConfig(llm_pp_layers=[[3]]), params_dtype="fp16",
    )))  # fmt: skip
    dtypes = {e.key: e.dtype for e in plan.files[0].entries}
    assert dtypes["decoder.layers.0.self_attention.linear_proj.weight"] == "float16"
    # an explicit params_dtype casts every float weight (MindSpeed-LLM's --params-dtype), quantised or not
    assert dtypes["decoder.layers.0.input_layernorm.weight"] == "float16"
    assert dtypes["decoder.layers.1.mlp.router.expert_bias"] == "float16"
    _, plan = prepare(_job(tiny_deepseeks["v3_fp8"], "hf_to_mm", HfToMmConfig(
        mm_dir=tmp_path / "z", hf_config=HfConfig(hf_dir=tiny_deepseeks["v3_fp8"]),
        parallel_config=ParallelConfig(llm_pp_layers=[[3]]),
    )))  # fmt: skip
    dtypes = {e.key: e.dtype for e in plan.files[0].entries}  # unset: FP8 to bf16, the rest as stored
    assert dtypes["decoder.layers.0.self_attention.linear_proj.weight"] == "bfloat16"
    assert dtypes["decoder.layers.1.mlp.router.expert_bias"] == "float32"


def test_resplit_equals_direct_conversion(tiny_deepseeks: dict[str, Path], tmp_path: Path) -> None:
    from tests.engine.test_llm_families import assert_resplit_is_direct

    a = ParallelConfig(tp_size=2, ep_size=2, llm_pp_layers=[[1, 2]])
    b = ParallelConfig(ep_size=4, llm_pp_layers=[[1, 1, 1]])
    assert_resplit_is_direct(tiny_deepseeks["v3_fp8"], tmp_path, a, b)


def test_the_way_back_writes_the_dequantised_weights(tiny_deepseeks: dict[str, Path], tmp_path: Path) -> None:
    from engine.job import MmToHfConfig

    hf = tiny_deepseeks["v3_fp8"]
    layout = ParallelConfig(tp_size=2, ep_size=2, llm_pp_layers=[[1, 2]])
    mm = _to_mm(hf, tmp_path / "mm", layout)
    back = _convert(
        hf, "mm_to_hf", MmToHfConfig(save_hf_dir=tmp_path / "back", mm_dir=mm, hf_config=HfConfig(hf_dir=hf))
    )
    got, want = load_hf_state(back), naive_dequantised(load_hf_state(hf), BLOCK)
    assert sorted(got) == sorted(want)
    for k, t in want.items():
        assert got[k].dtype == t.dtype and torch.equal(got[k], t), k
    config = json.loads((back / "config.json").read_text())
    original = json.loads((hf / "config.json").read_text())
    assert "quantization_config" not in config and config == {
        k: v for k, v in original.items() if k != "quantization_config"
    }
    index = json.loads((back / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == sorted(want)
