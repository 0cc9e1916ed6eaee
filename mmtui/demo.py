"""A tiny Qwen2-VL checkpoint generated on the fly for `mmtui --demo` (no download, no transformers)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

H, HEADS, KV, INTER, VOCAB, LAYERS = 64, 4, 2, 128, 128, 4
E, VHEADS, VLAYERS = 32, 4, 3


def _shapes() -> dict[str, tuple[int, ...]]:
    hd = H // HEADS
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (VOCAB, H), "model.norm.weight": (H,)}
    out["lm_head.weight"] = (VOCAB, H)
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        out |= {
            p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,),
            p + "self_attn.q_proj.weight": (HEADS * hd, H), p + "self_attn.q_proj.bias": (HEADS * hd,),
            p + "self_attn.k_proj.weight": (KV * hd, H), p + "self_attn.k_proj.bias": (KV * hd,),
            p + "self_attn.v_proj.weight": (KV * hd, H), p + "self_attn.v_proj.bias": (KV * hd,),
            p + "self_attn.o_proj.weight": (H, HEADS * hd),
            p + "mlp.gate_proj.weight": (INTER, H), p + "mlp.up_proj.weight": (INTER, H),
            p + "mlp.down_proj.weight": (H, INTER),
        }  # fmt: skip
    out["visual.patch_embed.proj.weight"] = (E, 3, 2, 2, 2)
    for i in range(VLAYERS):
        p = f"visual.blocks.{i}."
        for n in ("norm1", "norm2"):
            out |= {f"{p}{n}.weight": (E,), f"{p}{n}.bias": (E,)}
        out |= {
            p + "attn.qkv.weight": (3 * E, E), p + "attn.qkv.bias": (3 * E,),
            p + "attn.proj.weight": (E, E), p + "attn.proj.bias": (E,),
            p + "mlp.fc1.weight": (2 * E, E), p + "mlp.fc1.bias": (2 * E,),
            p + "mlp.fc2.weight": (E, 2 * E), p + "mlp.fc2.bias": (E,),
        }  # fmt: skip
    out |= {
        "visual.merger.ln_q.weight": (E,), "visual.merger.ln_q.bias": (E,),
        "visual.merger.mlp.0.weight": (4 * E, 4 * E), "visual.merger.mlp.0.bias": (4 * E,),
        "visual.merger.mlp.2.weight": (H, 4 * E), "visual.merger.mlp.2.bias": (H,),
    }  # fmt: skip
    return out


def make_demo_checkpoint(path: Path | None = None) -> Path:
    import torch
    from safetensors.torch import save_file

    path = Path(path) if path else Path(tempfile.mkdtemp(prefix="mmtui-demo-")) / "Qwen2-VL-tiny"
    path.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    state = {k: torch.randn(s, generator=gen).to(torch.bfloat16) for k, s in _shapes().items()}
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    config = {
        "architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl", "torch_dtype": "bfloat16",
        "hidden_size": H, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS, "num_key_value_heads": KV,
        "intermediate_size": INTER, "vocab_size": VOCAB, "tie_word_embeddings": False, "rope_theta": 1e6,
        "vision_config": {"depth": VLAYERS, "embed_dim": E, "num_heads": VHEADS, "mlp_ratio": 2, "hidden_size": H},
    }  # fmt: skip
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path
