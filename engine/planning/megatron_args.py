"""Megatron-LM's `args` and `iteration` for the rank files (`save_megatron_args`).

Megatron-LM's `tools/checkpoint` loaders and `--use-checkpoint-args`
(`megatron.training.checkpointing.load_args_from_checkpoint`) take the model's shape and
layout from an `argparse.Namespace` stored under `args` in every rank file, and the step
from `iteration`; MindSpeed-LLM's own converter reads its layout back from the same
Namespace. Only what those readers take is written, each field under the name they read
(Megatron-LM's argument names; `num_key_value_heads` and `num_layer_list` are
MindSpeed-LLM's). Training settings (batch sizes, learning rates) are left to the user,
and so is `tokenizer_model`: a path written here would override theirs on load.

Values come from config.json and from the weights themselves (biases, q/k norms, head
size, which layers are MoE), so the args say what the files hold.
"""

from __future__ import annotations

import argparse
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, NonNegativeInt

from ..errors import ConvertError
from ..formats.torch_zip import torch_global
from ..layout import ParallelConfig
from ..source.hf_source import ModelInfo
from ..source.tie import is_tied
from .targets import model_targets

CHECKPOINT_VERSION = 3.0  # what Megatron-LM and MindSpeed write (execute.py writes the same)
TOKENIZER_TYPE = "HuggingFaceTokenizer"  # Megatron-LM's tokenizer for a Hugging Face tokenizer directory


def _iteration(value: object) -> object:
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if value is None or value == "release" or (type(value) is int and value >= 0):
        return value
    raise ValueError("expected an iteration number (0 or more) or 'release'")


Iteration = Annotated[NonNegativeInt | Literal["release"] | None, BeforeValidator(_iteration)]
"""A job's `iteration`: a number (iter_0000001/ for 1), "release", or unset."""


def iteration_dir(value: int | str | None, default: str = "release") -> str:
    """`iter_0000001` for 1, `release` for "release", `default` for None (unset)."""
    if value is None:
        return default
    if value == "release":
        return "release"
    return f"iter_{int(value):07d}"


def iteration_number(name: str) -> int:
    """The `iteration` a rank file carries: the directory's number, 0 for `release` (Megatron-LM's rule)."""
    return 0 if name == "release" else int(name.removeprefix("iter_"))


def rank_head(info: ModelInfo, layout: ParallelConfig, iteration: str, with_args: bool) -> dict[str, object]:
    """What a rank file holds before its model entries, in the order Megatron-LM and MindSpeed-LLM save it.

    Nothing for `release` without args, so those files stay as they always were.
    """
    if not with_args and iteration == "release":
        return {}
    head: dict[str, object] = {}
    if with_args:
        head["args"] = megatron_args(info, layout)
    head["checkpoint_version"] = CHECKPOINT_VERSION
    head["iteration"] = iteration_number(iteration)
    return head


def _config(info: ModelInfo, name: str, megatron: str) -> Any:
    value = info.config.get(name)
    if value is None:
        raise ConvertError(
            f"{info.hf_dir}/config.json: save_megatron_args needs {name} (Megatron-LM's {megatron}), which is not set"
        )
    return value


def _number(value: float) -> int | float:
    """1000000.0 -> 1000000: Megatron-LM parses --rotary-base as an int."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def megatron_args(info: ModelInfo, layout: ParallelConfig) -> argparse.Namespace:
    """The Namespace Megatron-LM's readers take from `args`, for this model in this layout."""
    preset = info.preset
    if [m.name for m in preset.modules] != ["llm"] or preset.modules[0].target_prefix:
        raise ConvertError(
            f"save_megatron_args: Megatron-LM's args describe a GPT language model; {preset.title} is not one "
            "(the option is for the language-model presets)"
        )
    targets = model_targets(info)
    mtp = [t for t in targets if t.mtp]
    targets = [t for t in targets if not t.mtp]
    keys = {t.key for t in targets}
    heads = info.field_int("llm_heads")
    qkv = next((t for t in targets if t.layer == 0 and t.key.endswith("self_attention.linear_qkv.weight")), None)
    mla = qkv is None or qkv.mapping.kind == "concat"  # MindSpeed-LLM's MLA: linear_qkv = [q_a; kv_a]
    if mla:  # multi-latent attention: every head its own; Megatron-LM's MLA reads kv_channels as v's size
        groups, kv_channels = heads, _config(info, "v_head_dim", "v_head_dim")
    else:
        groups = info.field_int("llm_kv_heads")
        rows = qkv.sources[0].shape[0]
        kv_channels = rows // heads if qkv.mapping.kind == "qkv" else rows // (heads + 2 * groups)
    embedding = next(t for t in targets if t.key == "embedding.word_embeddings.weight")
    vocab = embedding.sources[0].shape[0]
    dtype = embedding.sources[0].dtype
    counts = layout.llm_pp_layers
    positions = sum(sum(chunk) for chunk in counts)
    ns = argparse.Namespace()
    a = ns.__dict__  # insertion order is the pickled order
    a["tensor_model_parallel_size"] = layout.tp_size
    a["pipeline_model_parallel_size"] = layout.pp_size
    a["expert_model_parallel_size"] = layout.ep_size
    cells = {n for chunk in counts for n in chunk}
    if layout.vpp_size > 1:
        a["virtual_pipeline_model_parallel_size"] = layout.vpp_size
        if len(cells) == 1:  # Megatron-LM's VPP takes one count for every chunk of every stage
            a["num_layers_per_virtual_pipeline_stage"] = cells.pop()
    elif layout.pp_size > 1 and len(cells) > 1:
        a["num_layer_list"] = ",".join(str(n) for n in counts[0])  # MindSpeed-LLM's uneven stages
    a["num_layers"] = positions  # empty (noop) layers count, as MindSpeed-LLM counts them
    a["hidden_size"] = info.field_int("hidden_size")
    a["ffn_hidden_size"] = info.field_int("intermediate_size")
    a["num_attention_heads"] = heads
    a["group_query_attention"] = groups != heads
    a["num_query_groups"] = groups
    a["num_key_value_heads"] = groups  # MindSpeed-LLM's name for it
    a["kv_channels"] = kv_channels
    max_positions = _config(info, "max_position_embeddings", "max_position_embeddings")
    a["max_position_embeddings"] = max_positions
    a["seq_length"] = max_positions
    a["vocab_size"] = vocab
    a["padded_vocab_size"] = layout.padded_vocab(vocab)
    # unset means no padding: 1 makes Megatron-LM's rule (a multiple of divisible_by x TP) give the vocabulary itself
    a["make_vocab_size_divisible_by"] = layout.make_vocab_size_divisible_by or 1
    a["position_embedding_type"] = "rope"
    a["use_rotary_position_embeddings"] = True
    a["add_position_embedding"] = True  # Megatron-LM's default; a RoPE model ignores it
    a["rotary_base"] = _number(_config(info, "rope_theta", "rotary_base"))
    a["rotary_percent"] = 1.0
    a["rotary_interleaved"] = False
    a["normalization"] = "RMSNorm"
    eps = _config(info, "rms_norm_eps", "norm_epsilon")
    a["norm_epsilon"] = eps
    a["layernorm_epsilon"] = eps  # the same field under the name newer Megatron-LM stores --norm-epsilon in
    a["swiglu"] = True
    a["untie_embeddings_and_output_weights"] = not is_tied(info)
    a["add_bias_linear"] = any(k.endswith(("self_attention.linear_proj.bias", "linear_fc1.bias")) for k in keys)
    a["add_qkv_bias"] = any(k.endswith("self_attention.linear_qkv.bias") for k in keys)
    a["qk_layernorm"] = any(k.endswith("self_attention.q_layernorm.weight") for k in keys)
    a["params_dtype"] = torch_global(dtype)
    a["bf16"] = dtype == "bfloat16"
    a["fp16"] = dtype == "float16"
    a["tokenizer_type"] = TOKENIZER_TYPE
    a["ckpt_format"] = "torch"
    if mla:
        a |= _mla_args(info)
    if mtp:
        a["mtp_num_layers"] = 1 + max(t.layer or 0 for t in mtp)
    experts = [t for t in targets if t.expert is not None]
    if experts:
        a |= _moe_args(info, layout, experts, positions, targets)
    return ns


def _mla_args(info: ModelInfo) -> dict[str, object]:
    """Megatron-Core's MLATransformerConfig fields (MindSpeed-LLM's deepseek3 reads the same names)."""
    return {
        "multi_latent_attention": True,
        "q_lora_rank": info.config.get("q_lora_rank"),  # None: the query in one projection
        "kv_lora_rank": _config(info, "kv_lora_rank", "kv_lora_rank"),
        "qk_head_dim": _config(info, "qk_nope_head_dim", "qk_head_dim"),
        "qk_pos_emb_head_dim": _config(info, "qk_rope_head_dim", "qk_pos_emb_head_dim"),
        "v_head_dim": _config(info, "v_head_dim", "v_head_dim"),
    }


def _moe_args(
    info: ModelInfo, layout: ParallelConfig, experts: list, positions: int, targets: list
) -> dict[str, object]:
    """Megatron-Core MoE fields: the experts' layout (grouped GEMM or SequentialMLP) and TP size; the router as
    config.json has it."""
    fc2 = next(t for t in experts if t.key.endswith("linear_fc2.weight"))
    moe_layers = {t.layer for t in experts}
    noops = set(layout.noops_of("llm"))
    real = [p for p in range(positions) if p not in noops]  # real layer i sits at position real[i]
    freq = [0] * positions
    for layer in moe_layers:
        freq[real[layer]] = 1
    # HF renormalises the top-k weights (Mixtral always; Qwen3-MoE with norm_topk_prob): Megatron-LM's
    # softmax over the top-k logits. Without it, the top-k of a softmax over all experts: pre-softmax.
    renormalised = info.config.get("norm_topk_prob", True)
    out: dict[str, object] = {
        "num_experts": info.field_int("num_experts"),
        "moe_router_topk": info.field_int("experts_per_token"),
        "moe_ffn_hidden_size": fc2.sources[0].shape[1],
        "moe_layer_freq": 1 if all(freq) else freq,
        "moe_router_pre_softmax": not renormalised,
        "moe_router_score_function": "softmax",
        "moe_grouped_gemm": layout.grouped is not None,
        "expert_tensor_parallel_size": layout.etp,
    }
    c = info.config
    if c.get("scoring_func") == "sigmoid":  # DeepSeek-V3: sigmoid scores, a bias to pick, group-limited top-k
        out["moe_router_score_function"] = "sigmoid"
        out["moe_router_pre_softmax"] = False
    if any(t.key.endswith("mlp.router.expert_bias") for t in targets):
        out["moe_router_enable_expert_bias"] = True
    for hf, megatron in (("n_group", "moe_router_num_groups"), ("topk_group", "moe_router_group_topk"),
                         ("routed_scaling_factor", "moe_router_topk_scaling_factor")):  # fmt: skip
        if c.get(hf) is not None:
            out[megatron] = c[hf]
    shared = next((t for t in targets if t.key.endswith("mlp.shared_experts.linear_fc2.weight")), None)
    if shared is not None:
        out["moe_shared_expert_intermediate_size"] = shared.sources[0].shape[1]
    return out
