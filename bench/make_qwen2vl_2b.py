"""Write a random bf16 checkpoint shaped exactly like Qwen2-VL-2B-Instruct (~4.4 GB, 2 shards).

Streams each shard (header, then tensor bytes) so the generator itself stays small in
memory. Values are random normal * 0.02 from one reused block: content does not matter
for timing, shapes and sizes do.

    python bench/make_qwen2vl_2b.py /work/bench-data/qwen2vl-2b
    python bench/make_qwen2vl_2b.py /tmp/qwen2vl-7b --size 7b --sparse   # headers only, for planning
    python bench/make_qwen2vl_2b.py /tmp/qwen2vl-72b --size 72b --sparse  # 146 GB of holes: preview bench

`--sparse` writes the headers and leaves the data as holes (zeros, no disk used): enough
for everything that reads metadata only (inspect, plan, `mmtui suggest`).
"""

from __future__ import annotations

import argparse
import json
import struct
from pathlib import Path

import torch

SIZES = {
    "2b": {"hidden": 1536, "layers": 28, "heads": 12, "kv": 2, "inter": 8960, "vocab": 151936, "tied": True},
    "7b": {"hidden": 3584, "layers": 28, "heads": 28, "kv": 4, "inter": 18944, "vocab": 152064, "tied": False},
    "72b": {"hidden": 8192, "layers": 80, "heads": 64, "kv": 8, "inter": 29568, "vocab": 152064, "tied": False},
    # 1.1 GB, with a small ViT: big enough that holding it, or a few of its tensors, shows in a process's RSS
    "mid": {
        "hidden": 2048,
        "layers": 8,
        "heads": 16,
        "kv": 4,
        "inter": 5632,
        "vocab": 32000,
        "tied": False,
        "vit": {"depth": 4, "dim": 1024, "heads": 16, "mlp": 4096},
    },
    # ~290 MB: long enough to be interrupted at chosen moments (tests/test_faults.py), quick to write
    "small": {
        "hidden": 1024,
        "layers": 6,
        "heads": 8,
        "kv": 2,
        "inter": 2816,
        "vocab": 32000,
        "tied": False,
        "vit": {"depth": 2, "dim": 512, "heads": 8, "mlp": 2048},
    },
}
LLM = dict(SIZES["2b"])
VIT_2B = {"depth": 32, "dim": 1280, "heads": 16, "mlp": 5120, "out": 1536, "patch": 14, "tpatch": 2, "merge": 2}
VIT = dict(VIT_2B)

CONFIG = {
    "architectures": ["Qwen2VLForConditionalGeneration"],
    "model_type": "qwen2_vl",
    "torch_dtype": "bfloat16",
    "hidden_size": LLM["hidden"],
    "intermediate_size": LLM["inter"],
    "num_hidden_layers": LLM["layers"],
    "num_attention_heads": LLM["heads"],
    "num_key_value_heads": LLM["kv"],
    "vocab_size": LLM["vocab"],
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "max_position_embeddings": 32768,
    "tie_word_embeddings": LLM["tied"],
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "vision_config": {
        "depth": VIT["depth"], "embed_dim": VIT["dim"], "num_heads": VIT["heads"], "mlp_ratio": 4,
        "hidden_size": LLM["hidden"], "in_chans": 3, "patch_size": VIT["patch"],
        "spatial_merge_size": VIT["merge"], "temporal_patch_size": VIT["tpatch"],
    },
}  # fmt: skip


def shapes() -> dict[str, tuple[int, ...]]:
    h, kvd = LLM["hidden"], LLM["kv"] * (LLM["hidden"] // LLM["heads"])
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (LLM["vocab"], h)}
    for i in range(LLM["layers"]):
        p = f"model.layers.{i}."
        out |= {
            p + "input_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (h, h), p + "self_attn.q_proj.bias": (h,),
            p + "self_attn.k_proj.weight": (kvd, h), p + "self_attn.k_proj.bias": (kvd,),
            p + "self_attn.v_proj.weight": (kvd, h), p + "self_attn.v_proj.bias": (kvd,),
            p + "self_attn.o_proj.weight": (h, h),
            p + "post_attention_layernorm.weight": (h,),
            p + "mlp.gate_proj.weight": (LLM["inter"], h), p + "mlp.up_proj.weight": (LLM["inter"], h),
            p + "mlp.down_proj.weight": (h, LLM["inter"]),
        }  # fmt: skip
    out["model.norm.weight"] = (h,)
    if not LLM["tied"]:
        out["lm_head.weight"] = (LLM["vocab"], h)
    d, m = VIT["dim"], VIT["mlp"]
    out["visual.patch_embed.proj.weight"] = (d, 3, VIT["tpatch"], VIT["patch"], VIT["patch"])
    for i in range(VIT["depth"]):
        p = f"visual.blocks.{i}."
        out |= {
            p + "norm1.weight": (d,), p + "norm1.bias": (d,), p + "norm2.weight": (d,), p + "norm2.bias": (d,),
            p + "attn.qkv.weight": (3 * d, d), p + "attn.qkv.bias": (3 * d,),
            p + "attn.proj.weight": (d, d), p + "attn.proj.bias": (d,),
            p + "mlp.fc1.weight": (m, d), p + "mlp.fc1.bias": (m,),
            p + "mlp.fc2.weight": (d, m), p + "mlp.fc2.bias": (d,),
        }  # fmt: skip
    md = d * VIT["merge"] ** 2
    out |= {
        "visual.merger.ln_q.weight": (d,), "visual.merger.ln_q.bias": (d,),
        "visual.merger.mlp.0.weight": (md, md), "visual.merger.mlp.0.bias": (md,),
        "visual.merger.mlp.2.weight": (LLM["hidden"], md), "visual.merger.mlp.2.bias": (LLM["hidden"],),
    }  # fmt: skip
    return out


def numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def write_shard(path: Path, tensors: dict[str, tuple[int, ...]], block: bytes, sparse: bool = False) -> int:
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in tensors.items():
        nbytes = numel(shape) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        if sparse:
            f.truncate(8 + len(raw) + offset)
            return offset
        for shape in tensors.values():
            left = numel(shape) * 2
            while left:
                n = min(left, len(block))
                f.write(block[:n])
                left -= n
    return offset


def write_checkpoint(out: Path, size: str = "2b", *, sparse: bool = False, seed: int = 0) -> int:
    """Write the checkpoint of this size into `out`; its tensor bytes."""
    LLM.update({k: v for k, v in SIZES[size].items() if k != "vit"})
    VIT.update({**VIT_2B, **SIZES[size].get("vit", {})})  # every size but mid has the 2B's ViT
    CONFIG.update(
        hidden_size=LLM["hidden"], intermediate_size=LLM["inter"], num_attention_heads=LLM["heads"],
        num_hidden_layers=LLM["layers"],
        num_key_value_heads=LLM["kv"], vocab_size=LLM["vocab"], tie_word_embeddings=LLM["tied"],
    )  # fmt: skip
    CONFIG["vision_config"].update(
        hidden_size=LLM["hidden"], depth=VIT["depth"], embed_dim=VIT["dim"], num_heads=VIT["heads"],
        mlp_ratio=VIT["mlp"] // VIT["dim"],
    )  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    block = (torch.randn(32 << 20, dtype=torch.float32) * 0.02).to(torch.bfloat16).view(torch.uint8).numpy().tobytes()
    all_shapes = shapes()
    names = list(all_shapes)
    total = sum(numel(s) * 2 for s in all_shapes.values())
    half, acc, cut = total // 2, 0, len(names)
    for i, n in enumerate(names):
        acc += numel(all_shapes[n]) * 2
        if acc >= half:
            cut = i + 1
            break
    parts = [names[:cut], names[cut:]]
    weight_map = {}
    for i, part in enumerate(parts):
        fname = f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors"
        write_shard(out / fname, {n: all_shapes[n] for n in part}, block, sparse)
        weight_map |= dict.fromkeys(part, fname)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (out / "config.json").write_text(json.dumps(CONFIG, indent=2))
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", choices=sorted(SIZES), default="2b", help="Qwen2-VL-2B, -7B, -72B shapes; mid; small")
    ap.add_argument("--sparse", action="store_true", help="headers only; tensor data left as holes")
    args = ap.parse_args()
    total = write_checkpoint(args.out, args.size, sparse=args.sparse, seed=args.seed)
    print(f"wrote {total / 1e9:.2f} GB in 2 shards to {args.out}")


if __name__ == "__main__":
    main()
