"""MindSpeed-LLM's layout (`iteration`) and Megatron-LM's `args` (`save_megatron_args`) in the rank files.

The expected field names are Megatron-LM's, as its readers name them (tools/checkpoint/loader_base.py
`ensure_required_arguments` / `build_checkpoint_metadata`, and megatron/training/checkpointing.py
`load_args_from_checkpoint` / `check_checkpoint_args`), plus the two MindSpeed-LLM's converter reads
back under its own names (`num_key_value_heads`, `num_layer_list`). Values are worked out here from
config.json and the safetensors headers, not from the code under test.
"""

from __future__ import annotations

import argparse
import json
import pickle
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from engine.errors import ConvertError
from engine.formats.mm_source import read_rank_file
from engine.job import HfConfig, HfToMmConfig, Job, MmToHfConfig, ResplitConfig, load_job, prepare
from engine.layout import ParallelConfig
from engine.planning.check import check_plan
from engine.run.execute import run

CONVERTER = {
    "llama": "LlamaConverter", "qwen2": "Qwen2Converter", "qwen3": "Qwen3Converter",
    "mixtral": "MixtralConverter", "qwen3_moe": "Qwen3MoeConverter",
}  # fmt: skip

DOWN = re.compile(r"model\.layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts\.0\.(?:down_proj|w2)\.weight")
# load_args_from_checkpoint's _set_arg names (model, MoE, tokenizer, vocabulary, parallelism)
SET_ARG = [
    "num_layers", "hidden_size", "ffn_hidden_size", "seq_length", "num_attention_heads", "num_query_groups",
    "group_query_attention", "kv_channels", "max_position_embeddings", "position_embedding_type",
    "add_position_embedding", "use_rotary_position_embeddings", "rotary_base", "rotary_percent",
    "rotary_interleaved", "add_bias_linear", "add_qkv_bias", "swiglu", "untie_embeddings_and_output_weights",
    "normalization", "num_experts", "moe_layer_freq", "moe_ffn_hidden_size", "moe_router_topk",
    "moe_router_pre_softmax", "moe_grouped_gemm", "moe_router_score_function", "tokenizer_type",
    "padded_vocab_size", "ckpt_format", "tensor_model_parallel_size", "pipeline_model_parallel_size",
    "virtual_pipeline_model_parallel_size", "num_layers_per_virtual_pipeline_stage", "expert_model_parallel_size",
]  # fmt: skip
# tools/checkpoint's loader: ensure_required_arguments (bert_binary_head and the rest come from its own
# parser) and the fields it copies or reads from the checkpoint's args
LOADER_READS = ["fp16", "bf16", "normalization", "params_dtype", "tokenizer_type", "make_vocab_size_divisible_by"]
# check_checkpoint_args compares these without a default (an AttributeError if absent)
COMPARED = [
    "num_layers", "hidden_size", "num_attention_heads", "max_position_embeddings", "make_vocab_size_divisible_by",
    "padded_vocab_size", "tokenizer_type", "tensor_model_parallel_size", "pipeline_model_parallel_size",
]  # fmt: skip


def _hf_to_mm(hf: Path, out: Path, layout: ParallelConfig, **cfg: Any) -> Path:
    family = json.loads((hf / "config.json").read_text())["model_type"]
    job_cfg = HfToMmConfig(mm_dir=out, hf_config=HfConfig(hf_dir=hf), parallel_config=layout, **cfg)
    _, plan = prepare(Job(converter=CONVERTER[family], command="hf_to_mm", cfg=job_cfg))
    assert check_plan(plan) == []
    run(plan, out)
    return out


def _load(path: Path) -> dict[str, Any]:
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, weights_only=True)


def _headers(hf: Path) -> dict[str, tuple[list[int], str]]:
    out = {}
    for f in sorted(hf.glob("*.safetensors")):
        with safe_open(f, "pt") as s:
            for k in s.keys():  # noqa: SIM118 (safe_open is not a mapping)
                sl = s.get_slice(k)
                out[k] = (sl.get_shape(), sl.get_dtype())
    return out


def _expected(hf: Path, tp: int, pp_layers: list[list[int]], ep: int = 1, divisible_by: int | None = None) -> dict:
    """Megatron-LM's args for this model, worked out from config.json and the tensor shapes."""
    c = json.loads((hf / "config.json").read_text())
    shapes = _headers(hf)
    heads, kv = c["num_attention_heads"], c["num_key_value_heads"]
    vocab, dtype = shapes["model.embed_tokens.weight"][0][0], shapes["model.embed_tokens.weight"][1]
    step = (divisible_by or 1) * tp
    padded = -(-vocab // step) * step
    layers = sum(sum(chunk) for chunk in pp_layers)
    want: dict[str, Any] = {
        "tensor_model_parallel_size": tp,
        "pipeline_model_parallel_size": len(pp_layers[0]),
        "expert_model_parallel_size": ep,
    }
    cells = {n for chunk in pp_layers for n in chunk}
    if len(pp_layers) > 1:
        want["virtual_pipeline_model_parallel_size"] = len(pp_layers)
        if len(cells) == 1:
            want["num_layers_per_virtual_pipeline_stage"] = next(iter(cells))
    elif len(pp_layers[0]) > 1 and len(cells) > 1:
        want["num_layer_list"] = ",".join(map(str, pp_layers[0]))
    want |= {
        "num_layers": layers,
        "hidden_size": c["hidden_size"],
        "ffn_hidden_size": c["intermediate_size"],
        "num_attention_heads": heads,
        "group_query_attention": kv != heads,
        "num_query_groups": kv,
        "num_key_value_heads": kv,
        "kv_channels": shapes["model.layers.0.self_attn.q_proj.weight"][0][0] // heads,
        "max_position_embeddings": c["max_position_embeddings"],
        "seq_length": c["max_position_embeddings"],
        "vocab_size": vocab,
        "padded_vocab_size": padded,
        "make_vocab_size_divisible_by": divisible_by or 1,
        "position_embedding_type": "rope",
        "use_rotary_position_embeddings": True,
        "add_position_embedding": True,
        "rotary_base": int(c["rope_theta"]),
        "rotary_percent": 1.0,
        "rotary_interleaved": False,
        "normalization": "RMSNorm",
        "norm_epsilon": c["rms_norm_eps"],
        "layernorm_epsilon": c["rms_norm_eps"],
        "swiglu": True,
        "untie_embeddings_and_output_weights": not c["tie_word_embeddings"],
        "add_bias_linear": "model.layers.0.self_attn.o_proj.bias" in shapes,
        "add_qkv_bias": "model.layers.0.self_attn.q_proj.bias" in shapes,
        "qk_layernorm": "model.layers.0.self_attn.q_norm.weight" in shapes,
        "params_dtype": {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}[dtype],
        "bf16": dtype == "BF16",
        "fp16": dtype == "F16",
        "tokenizer_type": "HuggingFaceTokenizer",
        "ckpt_format": "torch",
    }
    experts = c.get("num_local_experts") or c.get("num_experts")
    if experts:
        # an expert's down projection: Qwen3-MoE's mlp.experts.E.down_proj, Mixtral's block_sparse_moe.experts.E.w2
        down = {int(m[1]): shapes[k][0] for k in shapes if (m := DOWN.fullmatch(k))}
        moe = [i in down for i in range(layers)]
        want |= {
            "num_experts": experts,
            "moe_router_topk": c["num_experts_per_tok"],
            "moe_ffn_hidden_size": down[0][1],
            "moe_layer_freq": 1 if all(moe) else [int(m) for m in moe],
            "moe_router_pre_softmax": not c.get("norm_topk_prob", True),
            "moe_router_score_function": "softmax",
            "moe_grouped_gemm": False,
            "expert_tensor_parallel_size": tp,
        }
    return want


def _megatron_load_args(state: dict[str, Any]) -> argparse.Namespace:
    """What load_args_from_checkpoint + the tools/checkpoint loader do with a rank file, minus Megatron:
    `args` and `iteration` taken, every _set_arg copied over a parser's None, the loader's reads done."""
    ckpt = state["args"]
    margs = argparse.Namespace(iteration=state["iteration"])
    for name in SET_ARG:
        value = getattr(ckpt, name, None)
        if value is not None:
            setattr(margs, name, value)
    margs.fp16, margs.bf16 = ckpt.fp16, ckpt.bf16
    for name in LOADER_READS + COMPARED:
        getattr(ckpt, name)  # raises if absent
    for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "num_layers", "hidden_size",
                 "seq_length", "num_attention_heads", "max_position_embeddings", "position_embedding_type",
                 "tokenizer_type", "iteration"):  # fmt: skip
        assert getattr(margs, name, None) is not None, name  # ensure_required_arguments
    return margs


@pytest.mark.parametrize(
    ("variant", "tp", "pp_layers", "ep"),
    [
        ("llama", 2, [[1, 3]], 1),
        ("qwen2_tied", 1, [[2, 2]], 1),
        ("qwen3", 2, [[1, 1], [1, 1]], 1),
        ("mixtral", 1, [[4]], 2),
        ("qwen3_moe", 2, [[2, 2]], 2),
    ],
)
def test_args_hold_megatrons_fields(
    tiny_llms: dict[str, Path], tmp_path: Path, variant: str, tp: int, pp_layers: list[list[int]], ep: int
) -> None:
    hf = tiny_llms[variant]
    layout = ParallelConfig(tp_size=tp, llm_pp_layers=pp_layers, ep_size=ep)
    mm = _hf_to_mm(hf, tmp_path / "mm", layout, save_megatron_args=True)
    assert (mm / "latest_checkpointed_iteration.txt").read_text() == "release"
    want = _expected(hf, tp, pp_layers, ep)
    files = sorted(mm.glob("release/*/model_optim_rng.pt"))
    assert len(files) == tp * len(pp_layers[0]) * ep
    for path in files:
        state = _load(path)
        chunks = ["model"] if len(pp_layers) == 1 else [f"model{i}" for i in range(len(pp_layers))]
        assert list(state) == ["args", "checkpoint_version", "iteration", *chunks]
        assert state["checkpoint_version"] == 3.0 and state["iteration"] == 0  # release: 0
        assert type(state["args"]) is argparse.Namespace
        assert vars(state["args"]) == want
        margs = _megatron_load_args(state)
        assert margs.iteration == 0 and margs.tensor_model_parallel_size == tp
        assert margs.untie_embeddings_and_output_weights == (variant != "qwen2_tied")
    # the way back reads them (args are inert metadata) and gives the original tensors
    cfg = MmToHfConfig(save_hf_dir=tmp_path / "back", mm_dir=mm, hf_config=HfConfig(hf_dir=hf), parallel_config=layout)
    family = json.loads((hf / "config.json").read_text())["model_type"]
    run(prepare(Job(converter=CONVERTER[family], command="mm_to_hf", cfg=cfg))[1], tmp_path / "back")
    original = {k: v for f in hf.glob("*.safetensors") for k, v in load_file(f).items()}
    back = {k: v for f in (tmp_path / "back").glob("*.safetensors") for k, v in load_file(f).items()}
    assert back.keys() == original.keys() and all(torch.equal(back[k], original[k]) for k in original)


def test_expected_values_of_the_tiny_models(tiny_llms: dict[str, Path]) -> None:
    """A few values spelled out, so the worked-out expectations above are themselves checked."""
    qwen2 = _expected(tiny_llms["qwen2_tied"], 1, [[4]])
    assert qwen2["add_qkv_bias"] and not qwen2["add_bias_linear"] and not qwen2["untie_embeddings_and_output_weights"]
    assert (qwen2["kv_channels"], qwen2["num_query_groups"], qwen2["rotary_base"]) == (16, 2, 1000000)
    assert _expected(tiny_llms["qwen3"], 1, [[4]])["kv_channels"] == 32  # head_dim, not hidden / heads
    moe = _expected(tiny_llms["qwen3_moe"], 1, [[4]])
    assert (moe["moe_layer_freq"], moe["moe_ffn_hidden_size"], moe["moe_router_pre_softmax"]) == (
        [1, 0, 1, 1],
        48,
        False,
    )
    assert _expected(tiny_llms["mixtral"], 1, [[4]])["moe_layer_freq"] == 1


def test_bf16_padding_and_a_vpp_of_unequal_chunks(tiny_llms: dict[str, Path], tmp_path: Path) -> None:
    hf = tmp_path / "bf16"
    shutil.copytree(tiny_llms["llama"], hf)
    for f in hf.glob("*.safetensors"):
        save_file({k: v.to(torch.bfloat16) for k, v in load_file(f).items()}, f, metadata={"format": "pt"})
    layout = ParallelConfig(tp_size=2, llm_pp_layers=[[1], [3]], make_vocab_size_divisible_by=48)
    mm = _hf_to_mm(hf, tmp_path / "mm", layout, save_megatron_args=True)
    args = vars(_load(mm / "release/mp_rank_01/model_optim_rng.pt")["args"])
    assert args == _expected(hf, 2, [[1], [3]], divisible_by=48)
    assert args["params_dtype"] is torch.bfloat16 and args["bf16"] and not args["fp16"]
    assert args["padded_vocab_size"] == 192 and args["virtual_pipeline_model_parallel_size"] == 2
    assert "num_layers_per_virtual_pipeline_stage" not in args  # the chunks differ: Megatron-LM takes one count


def test_noop_layers_count_in_num_layers(tiny_llms: dict[str, Path], tmp_path: Path) -> None:
    """MindSpeed-LLM counts empty layers in num_layers; MoE layers keep their positions in moe_layer_freq."""
    hf = tiny_llms["qwen3_moe"]
    layout = ParallelConfig(llm_pp_layers=[[3, 3]], noop_layers=[0, 5])
    mm = _hf_to_mm(hf, tmp_path / "mm", layout, save_megatron_args=True)
    args = _load(mm / "release/mp_rank_00_001/model_optim_rng.pt")["args"]
    assert args.num_layers == 6 and args.pipeline_model_parallel_size == 2 and not hasattr(args, "num_layer_list")
    assert args.moe_layer_freq == [0, 1, 0, 1, 1, 0]  # HF layer 1 is dense; positions 0 and 5 are empty


def test_files_need_namespace_allowed_for_weights_only(tiny_llms: dict[str, Path], tmp_path: Path) -> None:
    mm = _hf_to_mm(tiny_llms["llama"], tmp_path / "mm", ParallelConfig(llm_pp_layers=[[4]]), save_megatron_args=True)
    path = mm / "release/mp_rank_00/model_optim_rng.pt"
    with pytest.raises(pickle.UnpicklingError, match=r"argparse\.Namespace"):
        torch.load(path, weights_only=True)  # torch refuses the Namespace until it is allowed
    assert type(_load(path)["args"]) is argparse.Namespace
    # our own reader takes it as inert metadata
    assert list(read_rank_file(path)) == ["model"]


def test_iteration_writes_mindspeed_llms_layout(tiny_llms: dict[str, Path], tmp_path: Path) -> None:
    """MindSpeed-LLM writes iter_0000001/, the tracker holding 1, and args, checkpoint_version 3.0, iteration 1
    before the model; no optimizer or RNG state."""
    hf = tiny_llms["llama"]
    layout = ParallelConfig(tp_size=2, llm_pp_layers=[[2, 2]])
    mm = _hf_to_mm(hf, tmp_path / "mm", layout, iteration=1, save_megatron_args=True)
    assert (mm / "latest_checkpointed_iteration.txt").read_text() == "1"
    assert sorted(p.name for p in mm.iterdir()) == ["iter_0000001", "latest_checkpointed_iteration.txt"]
    dirs = sorted(p.name for p in (mm / "iter_0000001").iterdir())
    assert dirs == ["mp_rank_00_000", "mp_rank_00_001", "mp_rank_01_000", "mp_rank_01_001"]
    release = _hf_to_mm(hf, tmp_path / "release", layout)
    for d in dirs:
        state = _load(mm / "iter_0000001" / d / "model_optim_rng.pt")
        assert list(state) == ["args", "checkpoint_version", "iteration", "model"]
        assert (state["checkpoint_version"], state["iteration"]) == (3.0, 1)
        assert _megatron_load_args(state).iteration == 1
        plain = torch.load(release / "release" / d / "model_optim_rng.pt", weights_only=True)
        assert list(plain) == ["model", "checkpoint_version"]  # release without args: as it always was
        assert plain["model"].keys() == state["model"].keys()
        assert all(torch.equal(plain["model"][k], state["model"][k]) for k in plain["model"])

    # iteration alone: the number in every file, no args
    only = _hf_to_mm(hf, tmp_path / "only", layout, iteration=12)
    assert (only / "latest_checkpointed_iteration.txt").read_text() == "12"
    state = torch.load(only / "iter_0000012/mp_rank_01_001/model_optim_rng.pt", weights_only=True)
    assert list(state) == ["checkpoint_version", "iteration", "model"] and state["iteration"] == 12


def test_resplit_carries_the_iteration(tiny_llms: dict[str, Path], tmp_path: Path) -> None:
    hf = tiny_llms["qwen3_moe"]
    a = ParallelConfig(tp_size=2, llm_pp_layers=[[1, 3]], ep_size=2)
    b = ParallelConfig(llm_pp_layers=[[2, 1, 1]])
    src = _hf_to_mm(hf, tmp_path / "a", a, iteration=5, save_megatron_args=True)

    def resplit(out: str, **cfg: Any) -> Path:
        job_cfg = ResplitConfig(
            source_dir=src, target_dir=tmp_path / out, hf_config=HfConfig(hf_dir=hf),
            source_parallel_config=a, target_parallel_config=b, **cfg,
        )  # fmt: skip
        _, plan = prepare(Job(converter="Qwen3MoeConverter", command="resplit", cfg=job_cfg))
        assert check_plan(plan) == []
        run(plan, tmp_path / out)
        return tmp_path / out

    kept = resplit("kept")  # the source's iteration, in the directory and every file; no args unless asked
    assert (kept / "latest_checkpointed_iteration.txt").read_text() == "5"
    state = torch.load(kept / "iter_0000005/mp_rank_00_002/model_optim_rng.pt", weights_only=True)
    assert list(state) == ["checkpoint_version", "iteration", "model"] and state["iteration"] == 5
    _same_files(_hf_to_mm(hf, tmp_path / "direct5", b, iteration=5), kept)

    with_args = resplit("args", save_megatron_args=True)  # args for the target layout
    assert vars(_load(with_args / "iter_0000005/mp_rank_00_000/model_optim_rng.pt")["args"]) == _expected(
        hf, 1, [[2, 1, 1]]
    )
    _same_files(_hf_to_mm(hf, tmp_path / "direct_args", b, iteration=5, save_megatron_args=True), with_args)

    renamed = resplit("renamed", iteration="release")
    assert (renamed / "latest_checkpointed_iteration.txt").read_text() == "release"
    _same_files(_hf_to_mm(hf, tmp_path / "direct_release", b), renamed)


def _same_files(a: Path, b: Path) -> None:
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files_a == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for rel in files_a:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


def test_args_are_for_language_models(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    cfg = HfToMmConfig(
        mm_dir=tmp_path / "mm", hf_config=HfConfig(hf_dir=tiny_dirs["qwen2_vl"]),
        parallel_config=ParallelConfig(llm_pp_layers=[[4]], vit_pp_layers=[[3]]), save_megatron_args=True,
    )  # fmt: skip
    with pytest.raises(ConvertError) as e:
        prepare(Job(converter="Qwen2VLConverter", command="hf_to_mm", cfg=cfg))
    assert str(e.value) == (
        "save_megatron_args: Megatron-LM's args describe a GPT language model; Qwen2-VL is not one "
        "(the option is for the language-model presets)"
    )
    assert not (tmp_path / "mm").exists()


def test_a_config_without_what_args_need_is_named(tiny_llms: dict[str, Path], tmp_path: Path) -> None:
    hf = tmp_path / "hf"
    shutil.copytree(tiny_llms["llama"], hf)
    config = json.loads((hf / "config.json").read_text())
    del config["rms_norm_eps"]
    (hf / "config.json").write_text(json.dumps(config))
    cfg = HfToMmConfig(
        mm_dir=tmp_path / "mm", hf_config=HfConfig(hf_dir=hf), parallel_config=ParallelConfig(llm_pp_layers=[[4]]),
        save_megatron_args=True,
    )  # fmt: skip
    with pytest.raises(ConvertError) as e:
        prepare(Job(converter="LlamaConverter", command="hf_to_mm", cfg=cfg))
    assert str(e.value) == (
        f"{hf}/config.json: save_megatron_args needs rms_norm_eps (Megatron-LM's norm_epsilon), which is not set"
    )


@pytest.mark.parametrize("bad", ["-1", "'one'", "1.5", "true"])
def test_bad_iteration_is_one_line(tiny_llms: dict[str, Path], tmp_path: Path, bad: str) -> None:
    job = tmp_path / "job.toml"
    job.write_text(
        f'converter = "LlamaConverter"\ncommand = "hf_to_mm"\n[cfg]\nmm_dir = "{tmp_path / "mm"}"\n'
        f'iteration = {bad}\n[cfg.hf_config]\nhf_dir = "{tiny_llms["llama"]}"\n'
        "[cfg.parallel_config]\nllm_pp_layers = [[4]]\n"
    )
    with pytest.raises(
        ConvertError, match=r"job.toml: cfg.iteration = .*: expected an iteration number \(0 or more\) or .release.$"
    ) as e:
        load_job(job)
    assert "\n" not in str(e.value)


def test_command_line(tiny_llms: dict[str, Path], tmp_path: Path) -> None:
    from tests.test_cli import mm_convert

    hf = tiny_llms["llama"]
    common = ["LlamaConverter", "hf_to_mm", "--cfg.hf_config.hf_dir", str(hf), "--cfg.parallel_config.llm_pp_layers"]
    r = mm_convert(*common, "[[2,2]]", "--cfg.mm_dir", str(tmp_path / "mm"), "--cfg.iteration", "1",
                   "--cfg.save_megatron_args", "true")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "mm/latest_checkpointed_iteration.txt").read_text() == "1"
    args = _load(tmp_path / "mm/iter_0000001/mp_rank_00_001/model_optim_rng.pt")["args"]
    assert vars(args) == _expected(hf, 1, [[2, 2]])
    r = mm_convert(*common, "[[2,2]]", "--cfg.mm_dir", str(tmp_path / "bad"), "--cfg.iteration", "-3")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "cfg.iteration" in r.stderr, r.stderr
    assert not (tmp_path / "bad").exists()
