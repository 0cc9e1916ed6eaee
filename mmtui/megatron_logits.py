"""Run a Megatron-Core GPT state dict in megatron-core's own GPTModel on CPU, and return logits.

The strongest check of a conversion: if megatron-core, loading our files with strict key
checking, computes the same logits as transformers on the HF weights, the renames, fusions
and TP splits are right. The tests' oracle and `mmtui verify --logits` both run it;
megatron-core is an optional dependency (the `logits` extra), imported in the children only.
One process per TP rank (spawned), gloo, local layer spec. CPU-only accommodations, inside
the children only: an inference RNG tracker (its fork is a no-op),
`torch.cuda.current_device` answering "cpu" (rotary embeddings ask), and the MoE router's
Transformer Engine GEMM hook defined as absent (megatron-core 0.16 reads the name even when
Transformer Engine is not installed). MoE models run megatron-core's own MoE layer
(SequentialMLP experts, all-gather token dispatcher) with experts split over expert-parallel
ranks.
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.multiprocessing as mp


@dataclass
class GPTArch:
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    ffn_hidden_size: int
    vocab_size: int
    rotary_base: float
    norm_epsilon: float
    add_qkv_bias: bool
    tied: bool
    qk_layernorm: bool = False
    kv_channels: int | None = None  # head size when it is not hidden_size / heads (Qwen3)
    num_moe_experts: int | None = None  # MoE: experts per MoE layer
    moe_router_topk: int = 2
    moe_ffn_hidden_size: int | None = None
    moe_layer_freq: list[int] | None = None  # 1 = MoE layer, 0 = dense MLP, per layer
    mla: dict | None = None  # multi-latent attention: MLATransformerConfig fields (q_lora_rank, kv_lora_rank, ...)
    extra: dict | None = None  # further TransformerConfig fields (router score function, shared experts, ...)
    rotary_percent: float = 1.0  # the share of each head's dims that rotate (GLM-4: 0.5)
    # GLM-4's sandwich norms: RMSNorms on the attention's and the MLP's outputs before each residual add, as
    # MindSpeed-MM's GLM layer adds them to megatron-core's (`post_self_attn_layernorm`, `post_mlp_layernorm`)
    post_norms: bool = False


def rendezvous(directory: str | Path) -> str:
    """Where spawned gloo ranks meet: a file in `directory` (a fresh temporary one). A free TCP port, found and
    then bound by the ranks, can be taken in between by another test running at the same time."""
    return f"file://{Path(directory) / 'gloo-rendezvous'}"


def init_gloo(url: str, rank: int, world: int) -> None:
    torch.distributed.init_process_group("gloo", init_method=url, rank=rank, world_size=world)


def _worker(
    rank: int, world: int, url: str, arch_d: dict, tp: int, paths: dict[str, str], tokens: list[int], out: str
) -> None:
    torch.cuda.current_device = lambda: torch.device("cpu")  # rotary embeddings move inv_freq "to the GPU"
    init_gloo(url, rank, world)
    from megatron.core import parallel_state

    model = build_gpt_model(GPTArch(**arch_d), tp, world // tp, len(tokens))
    where = f"{parallel_state.get_tensor_model_parallel_rank()},{parallel_state.get_expert_model_parallel_rank()}"
    state = torch.load(paths[where], weights_only=True)
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    if missing or result.unexpected_keys:
        raise AssertionError(f"rank {rank}: missing {missing}, unexpected {result.unexpected_keys}")
    if getattr(model, "mtp_process", False):  # loaded; the logits are the main model's (MTP's forward wants labels)
        model.mtp_process, model.config.mtp_num_layers = False, None
    logits = gpt_logits(model, tokens)
    if rank == 0:
        torch.save(logits, out)
    torch.distributed.barrier()
    parallel_state.destroy_model_parallel()
    torch.distributed.destroy_process_group()


def gpt_logits(model, tokens: list[int]) -> torch.Tensor:
    """The model's logits for one sequence, with an explicit causal mask (no fused CUDA kernels on CPU)."""
    ids = torch.tensor([tokens])
    pos = torch.arange(len(tokens)).unsqueeze(0)
    mask = torch.triu(torch.ones(len(tokens), len(tokens), dtype=torch.bool), diagonal=1)[None, None]
    with torch.no_grad():
        logits = model(ids, pos, mask)
    return logits[0].float().contiguous()


def build_gpt_model(arch: GPTArch, tp: int, ep: int, n_tokens: int):
    """megatron-core's GPTModel for `arch` (local spec, fp32, CPU) in a process whose gloo group is up; sets up
    megatron's model-parallel state for TP `tp` and EP `ep`."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec, get_gpt_layer_local_spec
    from megatron.core.tensor_parallel.random import initialize_rng_tracker
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):  # megatron-core 0.16 reads it even without Transformer Engine
        moe_utils.te_general_gemm = None
    etp = (arch.extra or {}).get("expert_tensor_parallel_size")  # with 1, each rank holds whole experts
    grouped = bool((arch.extra or {}).get("moe_grouped_gemm"))
    if grouped:
        _grouped_gemm_shim()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp, expert_model_parallel_size=ep, expert_tensor_parallel_size=etp
    )
    initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
    config_class, extra = TransformerConfig, dict(arch.extra or {})
    if arch.mla is not None:
        from megatron.core.transformer.transformer_config import MLATransformerConfig

        _mla_shims()
        config_class, extra = MLATransformerConfig, extra | {"multi_latent_attention": True} | arch.mla
    fields = dict(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_query_groups,
        kv_channels=arch.kv_channels,
        ffn_hidden_size=arch.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=arch.norm_epsilon,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        add_qkv_bias=arch.add_qkv_bias,
        qk_layernorm=arch.qk_layernorm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        tensor_model_parallel_size=tp,
        expert_model_parallel_size=ep,
        num_moe_experts=arch.num_moe_experts,
        moe_router_topk=arch.moe_router_topk,
        moe_ffn_hidden_size=arch.moe_ffn_hidden_size,
        moe_layer_freq=arch.moe_layer_freq or 1,
        moe_token_dispatcher_type="allgather",
        moe_router_load_balancing_type="none",
        use_cpu_initialization=True,
        perform_initialization=False,
        params_dtype=torch.float32,
        attention_softmax_in_fp32=True,
    )
    config = config_class(**(fields | extra))
    if arch.num_moe_experts:  # per-layer specs: MoE or dense MLP as moe_layer_freq says
        spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False, normalization="RMSNorm")
    else:
        spec = get_gpt_layer_local_spec(qk_layernorm=arch.qk_layernorm, normalization="RMSNorm")
    mtp_spec = None
    if config.mtp_num_layers:  # the MTP block (DeepSeek-V3), on this one stage; its keys must load strictly too
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_mtp_block_spec

        mtp_spec = get_gpt_mtp_block_spec(config, spec, use_transformer_engine=False)
    model = GPTModel(
        config,
        spec,
        mtp_block_spec=mtp_spec,
        vocab_size=arch.vocab_size,
        max_sequence_length=max(64, n_tokens),
        share_embeddings_and_output_weights=arch.tied,
        position_embedding_type="rope",
        rotary_base=int(arch.rotary_base),
        rotary_percent=arch.rotary_percent,
        parallel_output=False,
    ).eval()
    if arch.post_norms:
        _add_post_norms(model, arch)
    if grouped:
        _grouped_mlp_configs(model)
    return model


def _add_post_norms(model: torch.nn.Module, arch: GPTArch) -> None:
    """Each layer's attention and MLP output normed before its residual add (GLM-4's order: attention, norm, add;
    norm, MLP, norm, add): megatron-core's layer with two RMSNorms, its submodules' outputs passed through them."""
    for layer in model.decoder.layers:
        for module_name, norm_name in (("self_attention", "post_self_attn_layernorm"), ("mlp", "post_mlp_layernorm")):
            norm = torch.nn.RMSNorm(arch.hidden_size, eps=arch.norm_epsilon)
            layer.add_module(norm_name, norm)
            module = getattr(layer, module_name)

            def forward(*args, _inner=module.forward, _norm=norm, **kwargs):
                out, bias = _inner(*args, **kwargs)
                assert bias is None  # GLM-4's output projections have no bias to add after the norm
                return _norm(out), None

            module.forward = forward


def _grouped_mlp_configs(model: torch.nn.Module) -> None:
    """GroupedMLP's forward asserts `config.bf16` (its CUDA kernel's dtype): the experts alone see a copy of the
    config saying so, and compute in the weights' fp32 through the CPU gmm."""
    import copy

    from megatron.core.transformer.moe.experts import GroupedMLP

    for module in model.modules():
        if isinstance(module, GroupedMLP):
            module.config = copy.copy(module.config)
            module.config.bf16 = True


def _grouped_gemm_shim() -> None:
    """Megatron-Core's GroupedMLP on CPU: the `grouped_gemm` package's gmm (CUDA only) as one matmul per
    expert, on the expert's rows of the permuted tokens (`a[rows of expert i] @ b[i]`, as its kernel computes)."""
    import types

    from megatron.core.transformer.moe import grouped_gemm_util as gg

    def gmm(a: torch.Tensor, b: torch.Tensor, batch_sizes: torch.Tensor, trans_b: bool = False) -> torch.Tensor:
        out, start = [], 0
        for i, n in enumerate(batch_sizes.tolist()):
            out.append(a[start : start + n] @ (b[i].t() if trans_b else b[i]))
            start += n
        return torch.cat(out)

    gg.grouped_gemm = types.SimpleNamespace(ops=types.SimpleNamespace(gmm=gmm))
    gg.ops = gg.grouped_gemm.ops


def _mla_shims() -> None:
    """MLA on CPU without Transformer Engine: the local DotProductAttention takes no k/v channel sizes (it
    reads the value head size from kv_channels, set to v_head_dim), and MLA must not pick TE's layers."""
    from megatron.core.transformer import dot_product_attention, multi_latent_attention

    multi_latent_attention.HAVE_TE = False
    cls = dot_product_attention.DotProductAttention
    if getattr(cls, "_mmtui_shim", False):
        return
    init = cls.__init__

    def __init__(self, *args, k_channels=None, v_channels=None, **kwargs):  # the shim drops k/v channels
        init(self, *args, **kwargs)

    cls.__init__, cls._mmtui_shim = __init__, True


def megatron_logits(
    rank_state_dicts: list[dict[str, torch.Tensor]], arch: GPTArch, tokens: list[int], ep: int = 1
) -> torch.Tensor:
    """rank_state_dicts[e * tp + t]: the language-model state of TP rank t, EP rank e (PP = 1, no module prefix)."""
    world = len(rank_state_dicts)
    tp = world // ep
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for i, sd in enumerate(rank_state_dicts):
            where = f"{i % tp},{i // tp}"
            paths[where] = str(Path(tmp) / f"rank{where}.pt")
            torch.save(sd, paths[where])
        out = str(Path(tmp) / "logits.pt")
        mp.spawn(_worker, args=(world, rendezvous(tmp), asdict(arch), tp, paths, tokens, out), nprocs=world, join=True)
        return torch.load(out, weights_only=True)
