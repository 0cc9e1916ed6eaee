"""How each command plans: the model inspected, the source opened, the plan built (no data read).

Each job config (engine/job.py) names its planner here, so a new command or format is a new function,
not another branch of one chain.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import ConvertError
from .formats.mm_source import open_checkpoint
from .layout import ParallelConfig
from .planning.build import build_dcp_plan, build_plan
from .planning.hf_out import build_merge_plan, build_mm_to_hf_plan
from .planning.lora import Adapter, attach, read_peft_adapter
from .planning.lora_layout import open_mm_adapter, peft_plan, peft_to_mm_plan
from .planning.megatron_args import iteration_dir
from .planning.mtp import without_mtp
from .planning.plan import TRACKER_NAME, Plan
from .planning.te_names import TransformerImpl, check_preset, rename_plan, resolve
from .preset import DEFAULT_NAMING, builtin_presets, preset_for_converter
from .source.cast import with_params_dtype
from .source.disk_layout import infer_layout
from .source.hf_source import ModelInfo, inspect_hf, read_config, resolve_fields
from .source.mm_view import open_view, retarget
from .source.zero_parts import check_zero_parts

if TYPE_CHECKING:
    from .job import (
        DcpToHfConfig,
        HfToDcpConfig,
        HfToMmConfig,
        Job,
        LoraConfig,
        LoraHfToMmConfig,
        LoraMmToHfConfig,
        MergeLoraConfig,
        MmToHfConfig,
        ResplitConfig,
    )


def with_llm_source(info: ModelInfo, llm: ModelInfo) -> ModelInfo:
    """Language-model tensors and config fields from `llm`, the rest from `info`."""
    preset = info.preset
    lm = {m.name for m in preset.modules if m.name == "llm"}
    tensors = {k: v for k, v in info.tensors.items() if (m := preset.module_of_source(k)) and m.name not in lm}
    tensors |= {k: v for k, v in llm.tensors.items() if (m := preset.module_of_source(k)) and m.name in lm}
    fields = dict(info.fields)
    try:
        llm_fields = resolve_fields(preset, llm.config, llm.hf_dir / "config.json")
    except ConvertError:
        llm_fields = {}
    for name, paths in preset.fields.items():
        if not any(p.startswith("vision_config") for p in paths) and name in llm_fields:
            fields[name] = llm_fields[name]
    return dataclasses.replace(info, tensors=tensors, fields=fields, files=[*info.files, *llm.files])


def _inspect(job: Job, hf_dir: Path, naming: str | None = None) -> ModelInfo:
    """The model in the job's naming (or `naming`), without its MTP layers when the job says mtp = false."""
    info = _inspect_family(job, hf_dir, naming or getattr(job.cfg, "naming", DEFAULT_NAMING))
    return info if getattr(job.cfg, "mtp", True) else without_mtp(info)


GENERIC = "GenericDCPConverter"  # MindSpeed-MM's model-agnostic DCP converter: the family comes from config.json


def _inspect_family(job: Job, hf_dir: Path, naming: str) -> ModelInfo:
    if job.converter == GENERIC:
        if job.command != "dcp_to_hf":
            raise ConvertError(
                f"converter {GENERIC} takes dcp_to_hf only; name the model's converter for {job.command}"
            )
        return inspect_hf(hf_dir)
    seen = read_config(hf_dir).get("model_type")  # the family first: its fields would not be found
    preset = preset_for_converter(job.converter, seen, naming)
    if seen and seen not in preset.model_types:
        same = [p for p in builtin_presets().values() if p.converter == job.converter]  # Qwen3-VL: dense and MoE
        raise ConvertError(
            f"{hf_dir}/config.json: model_type {seen!r} is not a {' or '.join(p.title for p in same)} model "
            f"(converter {job.converter} expects {', '.join(t for p in same for t in p.model_types)})"
        )
    return inspect_hf(hf_dir, preset)


def mm_to_hf(job: Job, cfg: MmToHfConfig) -> tuple[ModelInfo, Plan]:
    info = _inspect(job, cfg.hf_config.hf_dir)
    ckpt = open_checkpoint(cfg.mm_dir)
    layout = cfg.parallel_config or infer_layout(info, ckpt)
    impl = resolve(info, ckpt, cfg.transformer_impl, "transformer_impl", "mm_dir")
    view = open_view(info, ckpt, layout, forward=_forward(info, layout, ckpt.iteration, impl))
    check_zero_parts(view, "mm_dir")
    adapter = _adapter(cfg.lora, info, layout)
    return info, build_mm_to_hf_plan(info, view, max_shard_size=cfg.max_shard_size, adapter=adapter)


def merge_lora(job: Job, cfg: MergeLoraConfig) -> tuple[ModelInfo, Plan]:
    info = _inspect(job, cfg.hf_config.hf_dir)
    adapter = _adapter(cfg.lora, info, None)
    assert adapter is not None
    return info, build_merge_plan(info, adapter, max_shard_size=cfg.max_shard_size)


def lora_hf_to_mm(job: Job, cfg: LoraHfToMmConfig) -> tuple[ModelInfo, Plan]:
    info = _inspect(job, cfg.hf_config.hf_dir)
    if cfg.lora.is_megatron:
        raise ConvertError(
            f"lora.adapter_dir {cfg.lora.adapter_dir}: a Megatron LoRA checkpoint; lora_hf_to_mm takes a PEFT "
            "adapter (adapter_config.json + adapter_model.safetensors)"
        )
    check_preset(info, cfg.transformer_impl, "transformer_impl")
    plan = peft_to_mm_plan(info, read_peft_adapter(cfg.lora.adapter_dir, info), cfg.parallel_config)
    return info, rename_plan(plan, cfg.transformer_impl)


def lora_mm_to_hf(job: Job, cfg: LoraMmToHfConfig) -> tuple[ModelInfo, Plan]:
    info = _inspect(job, cfg.hf_config.hf_dir)
    if not cfg.lora.is_megatron:
        raise ConvertError(
            f"lora.adapter_dir {cfg.lora.adapter_dir}: no {TRACKER_NAME}; lora_mm_to_hf takes a Megatron LoRA "
            "checkpoint (a PEFT adapter is already in Hugging Face form)"
        )
    check_preset(info, cfg.transformer_impl, "transformer_impl")
    adapter = _adapter(cfg.lora, info, None)
    assert adapter is not None
    return info, peft_plan(adapter)


def hf_to_dcp(job: Job, cfg: HfToDcpConfig) -> tuple[ModelInfo, Plan]:
    info = with_params_dtype(_inspect(job, cfg.hf_config.hf_dir), cfg.params_dtype)
    return info, _merged(build_dcp_plan(info), _adapter(cfg.lora, info, None))


def dcp_to_hf(job: Job, cfg: DcpToHfConfig) -> tuple[ModelInfo, Plan]:
    """MindSpeed-MM's DCP (HF names under a prefix) straight to hf_dir's files; hf_to_dcp's (Megatron names)
    through the TP 1 layout's view, as mm_to_hf reads a rank file."""
    from .formats.dcp_reader import dcp_forward, dcp_hf_plan, dcp_megatron_view, hf_tensors, naming, open_dcp

    assert cfg.hf_config is not None and cfg.dcp_dir is not None
    info = _inspect(job, cfg.hf_config.hf_dir)
    ckpt = open_dcp(cfg.dcp_dir)
    hf = hf_tensors(info.hf_dir)
    forward = dcp_forward(info)
    prefix = naming(ckpt, info, hf, forward, cfg.dcp_prefix, cfg.hf_prefix)
    if prefix is not None:
        names = tuple(cfg.fused_linear_names)
        return info, dcp_hf_plan(info, ckpt, hf, prefix, cfg.hf_prefix, hf_dtype=cfg.hf_dtype, fused_linear_names=names)
    return info, build_mm_to_hf_plan(info, dcp_megatron_view(info, ckpt, forward))


def resplit(job: Job, cfg: ResplitConfig) -> tuple[ModelInfo, Plan]:
    info = _inspect(job, cfg.hf_config.hf_dir)
    src = _inspect(job, cfg.hf_config.hf_dir, cfg.source_naming) if cfg.source_naming else info
    ckpt = open_checkpoint(cfg.source_dir, "source_dir")
    layout = cfg.source_parallel_config or infer_layout(src, ckpt, "source_dir")
    source_impl = resolve(src, ckpt, cfg.source_transformer_impl, "source_transformer_impl", "source_dir")
    view = open_view(src, ckpt, layout, "source_dir", forward=_forward(src, layout, ckpt.iteration, source_impl))
    check_zero_parts(view, "source_dir")
    iteration = iteration_dir(cfg.iteration, ckpt.iteration)
    plan = build_plan(info, cfg.target_parallel_config, iteration=iteration, megatron_args=cfg.save_megatron_args)
    if cfg.format != "legacy":
        plan = _formatted(plan, info, cfg.target_parallel_config, cfg.format, cfg.transformer_impl or source_impl)
        return info, retarget(_merged(plan, _adapter(cfg.lora, info, layout)), view)
    impl = cfg.transformer_impl or source_impl
    check_preset(info, impl, "transformer_impl")
    return info, rename_plan(retarget(_merged(plan, _adapter(cfg.lora, src, layout)), view), impl)


def hf_to_mm(job: Job, cfg: HfToMmConfig) -> tuple[ModelInfo, Plan]:
    info = with_params_dtype(_inspect(job, cfg.hf_config.hf_dir), cfg.params_dtype)
    check_preset(info, cfg.transformer_impl, "transformer_impl")
    if cfg.llm_hf_dir:
        llm = inspect_hf(cfg.llm_hf_dir, info.preset)
        info = with_llm_source(info, llm)
    if cfg.format == "dcp":
        plan = build_dcp_plan(info, iteration=iteration_dir(cfg.iteration))
        return info, _merged(plan, _adapter(cfg.lora, info, None))
    plan = build_plan(
        info, cfg.parallel_config, save_vit_only=cfg.save_vit_only, iteration=iteration_dir(cfg.iteration),
        megatron_args=cfg.save_megatron_args,
    )  # fmt: skip
    if cfg.format == "torch_dist":
        plan = _formatted(plan, info, cfg.parallel_config, cfg.format, cfg.transformer_impl)
        return info, _merged(plan, _adapter(cfg.lora, info, None))
    return info, rename_plan(_merged(plan, _adapter(cfg.lora, info, None)), cfg.transformer_impl)


def _formatted(plan: Plan, info: ModelInfo, layout: ParallelConfig, fmt: str, impl: TransformerImpl) -> Plan:
    """A legacy plan written in another format (engine/formats/)."""
    if fmt != "torch_dist":
        raise ConvertError(f"format = {fmt}: resplit writes legacy or torch_dist")
    from .formats.torch_dist_writer import to_torch_dist

    return to_torch_dist(plan, info, layout, impl)


def _forward(info: ModelInfo, layout: ParallelConfig, iteration: str, impl: TransformerImpl) -> Plan:
    """The plan a checkpoint on disk was written with, in its names: what open_view checks the disk against."""
    return rename_plan(build_plan(info, layout, iteration=iteration), impl)


def _adapter(lora: LoraConfig | None, info: ModelInfo, base_layout: ParallelConfig | None) -> Adapter | None:
    """The adapter to merge: a PEFT directory, or a Megatron LoRA checkpoint in its layout."""
    if lora is None:
        return None
    if not lora.is_megatron:
        return read_peft_adapter(lora.adapter_dir, info)
    layout = lora.parallel_config or base_layout
    if layout is None:
        layout = infer_layout(info, open_checkpoint(lora.adapter_dir, "lora.adapter_dir"), "lora.adapter_dir")
    return open_mm_adapter(
        info, lora.adapter_dir, layout, r=lora.r, alpha=lora.alpha, use_rslora=lora.use_rslora,
        target_modules=lora.target_modules,
    )  # fmt: skip


def _merged(plan: Plan, adapter: Adapter | None) -> Plan:
    """The plan with the adapter's blocks marked (before any retarget: they name canonical tensors)."""
    return attach(plan, adapter) if adapter else plan
