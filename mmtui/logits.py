"""`mmtui verify --logits`: run both sides on the same tokens and compare the language model's logits.

An HF side runs in transformers (the class config.json names), a Megatron side in
megatron-core's GPTModel (one process per TP rank, CPU, fp32). A Megatron checkpoint is
first re-cut by the engine to its own TP and EP with one pipeline stage (in a temporary
directory), since the runner holds a whole model per rank. Both libraries are optional
(`pip install 'mmtui[logits]'`); without them the check is refused with exit 2.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from engine.errors import ConvertError
from engine.layout import ParallelConfig, one_stage
from engine.planning.build import build_plan
from engine.source.hf_source import ModelInfo, lookup

if TYPE_CHECKING:
    import torch

    from mmtui.megatron_logits import GPTArch


def default_tokens(vocab: int, n: int = 16) -> list[int]:
    """Fixed, spread-out token ids below the vocabulary size (no tokenizer needed)."""
    return [(i * 7919 + 3) % vocab for i in range(n)]


def _require(module: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise ConvertError(f"--logits needs the {module} package: pip install 'mmtui[logits]'")


def hf_logits(hf_dir: Path, tokens: list[int]) -> torch.Tensor:
    """Logits of the HF model for `tokens` (fp32, eval), shape [tokens, vocab]."""
    _require("transformers")
    import torch
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    config = transformers.AutoConfig.from_pretrained(hf_dir)
    arch = (config.architectures or ["?"])[0]
    cls = getattr(transformers, arch, None)
    if cls is None:
        raise ConvertError(f"{hf_dir}/config.json: transformers has no {arch} class to run; compare the tensors only")
    model = cls.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor([tokens])).logits[0].float()


def _config_value(info: ModelInfo, name: str, default: float) -> float:
    """A language-model config value next to where its layer count was found (text_config., llm_config., top)."""
    nest = info.field_path("llm_layers").rpartition(".")[0]
    for path in (f"{nest}.{name}" if nest else name, name):
        value = lookup(info.config, path)
        if value is not None:
            return float(value)
    return default


def gpt_arch(info: ModelInfo, vocab_rows: int) -> GPTArch:
    """megatron-core's architecture for the language model, from config.json and the plan's tensor names/shapes."""
    from mmtui.megatron_logits import GPTArch

    llm = next((m for m in info.preset.modules if m.name == "llm"), None)
    if llm is None:
        raise ConvertError(f"{info.preset.title} has no language model to run")
    n = info.field_int("llm_layers")
    entries = {e.key.removeprefix(llm.target_prefix): e for e in build_plan(info, one_stage(info)).files[0].entries}
    heads, groups = info.field_int("llm_heads"), info.field_int("llm_kv_heads")
    qkv = entries["decoder.layers.0.self_attention.linear_qkv.weight"]
    moe = [int(f"decoder.layers.{i}.mlp.router.weight" in entries) for i in range(n)]
    expert_fc2 = (
        entries.get(f"decoder.layers.{moe.index(1)}.mlp.experts.local_experts.0.linear_fc2.weight")
        if any(moe)
        else None
    )
    return GPTArch(
        num_layers=n,
        hidden_size=info.field_int("hidden_size"),
        num_attention_heads=heads,
        num_query_groups=groups,
        ffn_hidden_size=info.field_int("intermediate_size"),
        vocab_size=vocab_rows,
        rotary_base=_config_value(info, "rope_theta", 10000.0),
        norm_epsilon=_config_value(info, "rms_norm_eps", 1e-6),
        add_qkv_bias="decoder.layers.0.self_attention.linear_qkv.bias" in entries,
        tied=bool(info.fields.get("tie_word_embeddings")),
        qk_layernorm="decoder.layers.0.self_attention.q_layernorm.weight" in entries,
        kv_channels=qkv.shape[0] // (heads + 2 * groups),
        num_moe_experts=info.field_int(llm.experts) if llm.experts and any(moe) else None,
        moe_router_topk=int(_config_value(info, "num_experts_per_tok", 2)),
        moe_ffn_hidden_size=expert_fc2.shape[1] if expert_fc2 else None,
        moe_layer_freq=moe if any(moe) else None,
    )


def mm_logits(info: ModelInfo, mm_dir: Path, layout: ParallelConfig | None, tokens: list[int]) -> torch.Tensor:
    """Logits of a Megatron checkpoint's language model for `tokens`, shape [tokens, vocab] (padding cut off);
    `layout` None means the layout on disk."""
    _require("megatron.core")
    import torch

    from engine.formats.mm_source import open_checkpoint
    from engine.source.disk_layout import infer_layout

    layout = layout or infer_layout(info, open_checkpoint(mm_dir))

    from engine.job import HfConfig, Job, ResplitConfig, prepare
    from engine.run.execute import run
    from mmtui.megatron_logits import megatron_logits

    llm = next(m for m in info.preset.modules if m.name == "llm")
    padding = layout.make_vocab_size_divisible_by
    stage = one_stage(info, tp_size=layout.tp_size, ep_size=layout.ep_size, make_vocab_size_divisible_by=padding)
    vocab = info.field_int("vocab_size")
    with tempfile.TemporaryDirectory(prefix="mmtui-logits-") as tmp:
        out = Path(tmp) / "one_stage"
        cfg = ResplitConfig(
            source_dir=mm_dir,
            target_dir=out,
            hf_config=HfConfig(hf_dir=info.hf_dir),
            source_parallel_config=layout,
            target_parallel_config=stage,
            transformer_impl="local",  # megatron-core's local spec runs it; the source's names are read from the disk
        )
        _, plan = prepare(Job(converter=info.preset.converter, command="resplit", cfg=cfg))
        run(plan, out)
        ranks = []
        for f in plan.files:  # TP-major then EP, as the runner numbers them: e * tp + t
            model = torch.load(out / f.path, weights_only=True)["model"]
            ranks.append((f.ep_rank, f.tp_rank, {k.removeprefix(llm.target_prefix): v for k, v in model.items()
                                                 if k.startswith(llm.target_prefix)}))  # fmt: skip
        states = [sd for _, _, sd in sorted(ranks, key=lambda r: (r[0], r[1]))]
        arch = gpt_arch(info, stage.padded_vocab(vocab))
        logits = megatron_logits([{k: v.float() for k, v in sd.items()} for sd in states], arch, tokens, layout.ep_size)
    return logits[:, :vocab]
