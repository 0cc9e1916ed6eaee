"""A tiny Qwen2-VL checkpoint for `mmtui --demo` (no download, no transformers, no torch).

It is kept in the user's cache directory (`$XDG_CACHE_HOME/mmtui/demo`, else
`~/.cache/mmtui/demo`), built once, atomically (a temporary sibling renamed into place),
and rebuilt when its files are not the ones this version writes. Building it takes
milliseconds with numpy; importing torch for it would take longer than the whole screen.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
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


def _values(start: int, n: int):
    """n numbers in [-2, 2) from splitmix64 of the counters start.., exact in float32 and bfloat16, so the
    files are the same bytes on every machine and numpy version (numpy's own streams may change)."""
    import numpy as np

    z = np.arange(start, start + n, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)  # wraps mod 2**64
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    top = (z >> np.uint64(57)).astype(np.float32)  # 7 bits: a bfloat16 holds k / 32 - 2 exactly
    return (top / np.float32(32) - np.float32(2)).astype(np.float32)


def _bf16(values) -> bytes:
    """float32 -> little-endian bfloat16 bytes (the top half; exact for the values above)."""
    import numpy as np

    return (values.view(np.uint32) >> np.uint32(16)).astype("<u2").tobytes()


def demo_files() -> dict[str, bytes]:
    """File name -> bytes of the demo checkpoint, the same on every run."""
    from engine.formats.safetensors_writer import header_bytes

    shapes, data, start = _shapes(), {}, 0
    for name in sorted(shapes):
        n = math.prod(shapes[name])
        data[name] = _bf16(_values(start, n))
        start += n
    header = header_bytes([(k, "bfloat16", shapes[k], len(v)) for k, v in data.items()], {"format": "pt"})
    config = {
        "architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl", "torch_dtype": "bfloat16",
        "hidden_size": H, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS, "num_key_value_heads": KV,
        "intermediate_size": INTER, "vocab_size": VOCAB, "tie_word_embeddings": False, "rope_theta": 1e6,
        "vision_config": {"depth": VLAYERS, "embed_dim": E, "num_heads": VHEADS, "mlp_ratio": 2, "hidden_size": H},
    }  # fmt: skip
    return {"config.json": json.dumps(config, indent=2).encode(), "model.safetensors": header + b"".join(data.values())}


# sha256 of demo_files() (a test holds them equal): a cached copy is checked without building one to compare
DIGESTS = {
    "config.json": "d292b9ddf50187f85fabe92d6968da3cfa16053477ec5c52b819e32680313205",
    "model.safetensors": "b897cf18f19a7061b28083300c0416d8cf8dcfd84554587a87913cf1ae3e0359",
}


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mmtui" / "demo"


def _holds(path: Path) -> bool:
    try:
        return all(hashlib.sha256((path / name).read_bytes()).hexdigest() == d for name, d in DIGESTS.items())
    except OSError:
        return False


def make_demo_checkpoint(path: Path | None = None) -> Path:
    """Write the demo checkpoint to `path`; without one, the cached copy (built or repaired if needed)."""
    if path is not None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        for name, data in demo_files().items():
            (path / name).write_bytes(data)
        return path
    target = cache_dir() / "Qwen2-VL-tiny"
    if _holds(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        make_demo_checkpoint(tmp)
        if target.exists() and not _holds(target):  # stale or broken: set it aside, then replace it
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}-old-", dir=target.parent))
            os.rename(target, old / target.name)
            shutil.rmtree(old, ignore_errors=True)
        os.rename(tmp, target)
    except OSError:
        if not _holds(target):  # another mmtui --demo may have put the same files in place meanwhile
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
