"""Write a headers-only (sparse) checkpoint shaped like DeepSeek-V3's hub release: FP8 weights with
128 x 128 block scales, bf16 embeddings / norms / router, float32 router bias, shards of about 5 GB.

The data are holes (zeros, no disk used): enough for everything that reads metadata (inspect, plan,
preview, `mmtui suggest`), and for memory tests, whose zeros dequantise to zeros.

    python bench/make_deepseek_v3.py /tmp/dsv3-671b                 # 61 layers + MTP, 256 experts: ~700 GB of holes
    python bench/make_deepseek_v3.py /tmp/dsv3-mid --size mid       # ~0.5 GB of FP8, for memory tests
    python bench/make_deepseek_v3.py /tmp/dsv3-bf16 --bf16          # bf16 weights, as after DeepSeek's fp8_cast_bf16
"""

from __future__ import annotations

import argparse
import json
import os
import struct
from pathlib import Path

SIZES = {
    # DeepSeek-V3 / V3.1 / R1 (671B)
    "671b": {
        "hidden_size": 7168, "num_hidden_layers": 61, "num_attention_heads": 128, "intermediate_size": 18432,
        "moe_intermediate_size": 2048, "n_routed_experts": 256, "n_shared_experts": 1, "first_k_dense_replace": 3,
        "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
        "v_head_dim": 128, "vocab_size": 129280, "num_experts_per_tok": 8, "n_group": 8, "topk_group": 4,
        "num_nextn_predict_layers": 1,  # the hub's model.layers.61
    },
    # ~0.5 GB of FP8 weights: a memory test's model
    "mid": {
        "hidden_size": 2048, "num_hidden_layers": 4, "num_attention_heads": 16, "intermediate_size": 4096,
        "moe_intermediate_size": 1024, "n_routed_experts": 16, "n_shared_experts": 1, "first_k_dense_replace": 1,
        "q_lora_rank": 512, "kv_lora_rank": 256, "qk_nope_head_dim": 64, "qk_rope_head_dim": 32,
        "v_head_dim": 64, "vocab_size": 32000, "num_experts_per_tok": 4, "n_group": 4, "topk_group": 2,
        "num_nextn_predict_layers": 0,
    },
}  # fmt: skip
BLOCK = 128
ST = {"F8_E4M3": 1, "BF16": 2, "F32": 4}
SHARD_BYTES = 5 << 30


def config(size: str, bf16: bool = False) -> dict:
    c = {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "torch_dtype": "bfloat16",
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False, "norm_topk_prob": True,
        "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "topk_method": "noaux_tc",
        "max_position_embeddings": 163840,
        "quantization_config": {
            "activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [BLOCK, BLOCK],
        },
        **SIZES[size],
    }  # fmt: skip
    if bf16:
        del c["quantization_config"]
    return c


def tensors(c: dict) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Name -> (safetensors dtype, shape), in the hub's order: layer by layer."""
    h, heads = c["hidden_size"], c["num_attention_heads"]
    qk = c["qk_nope_head_dim"] + c["qk_rope_head_dim"]
    out: dict[str, tuple[str, tuple[int, ...]]] = {"model.embed_tokens.weight": ("BF16", (c["vocab_size"], h))}

    bf16 = "quantization_config" not in c

    def linear(name: str, rows: int, cols: int) -> None:
        if bf16:
            out[name + ".weight"] = ("BF16", (rows, cols))
            return
        out[name + ".weight"] = ("F8_E4M3", (rows, cols))
        out[name + ".weight_scale_inv"] = ("F32", (-(-rows // BLOCK), -(-cols // BLOCK)))

    def mlp(prefix: str, inter: int) -> None:
        linear(prefix + "gate_proj", inter, h)
        linear(prefix + "up_proj", inter, h)
        linear(prefix + "down_proj", h, inter)

    for i in range(c["num_hidden_layers"] + c["num_nextn_predict_layers"]):
        p = f"model.layers.{i}."
        mtp = i >= c["num_hidden_layers"]  # the hub's model.layers.61: an MoE layer with the MTP module's own
        if mtp:
            out[p + "embed_tokens.weight"] = ("BF16", (c["vocab_size"], h))
            out[p + "enorm.weight"] = ("BF16", (h,))
            out[p + "hnorm.weight"] = ("BF16", (h,))
            linear(p + "eh_proj", h, 2 * h)
        out[p + "input_layernorm.weight"] = ("BF16", (h,))
        linear(p + "self_attn.q_a_proj", c["q_lora_rank"], h)
        out[p + "self_attn.q_a_layernorm.weight"] = ("BF16", (c["q_lora_rank"],))
        linear(p + "self_attn.q_b_proj", heads * qk, c["q_lora_rank"])
        linear(p + "self_attn.kv_a_proj_with_mqa", c["kv_lora_rank"] + c["qk_rope_head_dim"], h)
        out[p + "self_attn.kv_a_layernorm.weight"] = ("BF16", (c["kv_lora_rank"],))
        linear(p + "self_attn.kv_b_proj", heads * (c["qk_nope_head_dim"] + c["v_head_dim"]), c["kv_lora_rank"])
        linear(p + "self_attn.o_proj", h, heads * c["v_head_dim"])
        out[p + "post_attention_layernorm.weight"] = ("BF16", (h,))
        if i < c["first_k_dense_replace"]:
            mlp(p + "mlp.", c["intermediate_size"])
            continue
        out[p + "mlp.gate.weight"] = ("BF16", (c["n_routed_experts"], h))
        out[p + "mlp.gate.e_score_correction_bias"] = ("F32", (c["n_routed_experts"],))
        for e in range(c["n_routed_experts"]):
            mlp(p + f"mlp.experts.{e}.", c["moe_intermediate_size"])
        mlp(p + "mlp.shared_experts.", c["moe_intermediate_size"] * c["n_shared_experts"])
        if mtp:
            out[p + "shared_head.norm.weight"] = ("BF16", (h,))
            out[p + "shared_head.head.weight"] = ("BF16", (c["vocab_size"], h))
    out["model.norm.weight"] = ("BF16", (h,))
    out["lm_head.weight"] = ("BF16", (c["vocab_size"], h))
    return out


def _nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    n = ST[dtype]
    for s in shape:
        n *= s
    return n


def write_sparse(out: Path, size: str = "671b", bf16: bool = False) -> int:
    """Write config.json, the index and sparse shards; the tensors' bytes."""
    c = config(size, bf16)
    all_tensors = tensors(c)
    shards: list[list[str]] = [[]]
    acc = 0
    for name, (dtype, shape) in all_tensors.items():
        n = _nbytes(dtype, shape)
        if shards[-1] and acc + n > SHARD_BYTES:
            shards.append([])
            acc = 0
        shards[-1].append(name)
        acc += n
    out.mkdir(parents=True, exist_ok=True)
    weight_map, total = {}, 0
    for i, names in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):06d}.safetensors"
        header, at = {"__metadata__": {"format": "pt"}}, 0
        for name in names:
            dtype, shape = all_tensors[name]
            n = _nbytes(dtype, shape)
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [at, at + n]}
            at += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with open(out / fname, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            f.truncate(8 + len(raw) + at)
        os.utime(out / fname)
        weight_map |= dict.fromkeys(names, fname)
        total += at
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (out / "config.json").write_text(json.dumps(c, indent=2))
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--size", choices=list(SIZES), default="671b")
    ap.add_argument("--bf16", action="store_true", help="bf16 weights, no block scales (the hub's FP8 cast to bf16)")
    args = ap.parse_args()
    total = write_sparse(args.out, args.size, args.bf16)
    print(f"{args.out}: {total / 1e9:.1f} GB of tensors (sparse)")


if __name__ == "__main__":
    main()
