"""Run a Megatron-Core GPT state dict in megatron-core's own GPTModel on CPU, and return logits.

The strongest check of a conversion: if megatron-core, loading our files with strict key
checking, computes the same logits as transformers on the HF weights, the renames,
fusions and TP splits are right. One process per TP rank (spawned), gloo, local layer
spec. CPU-only accommodations, inside the children only: an inference RNG tracker (its
fork is a no-op) and `torch.cuda.current_device` answering "cpu" (rotary embeddings ask).
"""

from __future__ import annotations

import os
import socket
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, arch_d: dict, paths: list[str], tokens: list[int], out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.current_device = lambda: torch.device("cpu")  # rotary embeddings move inv_freq "to the GPU"
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.tensor_parallel.random import initialize_rng_tracker
    from megatron.core.transformer import TransformerConfig

    arch = GPTArch(**arch_d)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world)
    initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
    config = TransformerConfig(
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
        tensor_model_parallel_size=world,
        use_cpu_initialization=True,
        perform_initialization=False,
        params_dtype=torch.float32,
        attention_softmax_in_fp32=True,
    )
    model = GPTModel(
        config,
        get_gpt_layer_local_spec(qk_layernorm=arch.qk_layernorm, normalization="RMSNorm"),
        vocab_size=arch.vocab_size,
        max_sequence_length=max(64, len(tokens)),
        share_embeddings_and_output_weights=arch.tied,
        position_embedding_type="rope",
        rotary_base=int(arch.rotary_base),
        parallel_output=False,
    ).eval()
    state = torch.load(paths[rank], weights_only=True)
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    if missing or result.unexpected_keys:
        raise AssertionError(f"rank {rank}: missing {missing}, unexpected {result.unexpected_keys}")
    ids = torch.tensor([tokens])
    pos = torch.arange(len(tokens)).unsqueeze(0)
    mask = torch.triu(torch.ones(len(tokens), len(tokens), dtype=torch.bool), diagonal=1)[None, None]
    with torch.no_grad():
        logits = model(ids, pos, mask)
    if rank == 0:
        torch.save(logits[0].float().contiguous(), out)
    torch.distributed.barrier()
    parallel_state.destroy_model_parallel()
    torch.distributed.destroy_process_group()


def megatron_logits(rank_state_dicts: list[dict[str, torch.Tensor]], arch: GPTArch, tokens: list[int]) -> torch.Tensor:
    """rank_state_dicts[r]: TP rank r's language-model state (PP = 1, no module prefix)."""
    world = len(rank_state_dicts)
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for r, sd in enumerate(rank_state_dicts):
            paths.append(str(Path(tmp) / f"rank{r}.pt"))
            torch.save(sd, paths[-1])
        out = str(Path(tmp) / "logits.pt")
        mp.spawn(_worker, args=(world, _free_port(), asdict(arch), paths, tokens, out), nprocs=world, join=True)
        return torch.load(out, weights_only=True)
