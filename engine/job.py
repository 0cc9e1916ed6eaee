"""The job a user writes: one pydantic schema behind `mm-convert --cfg.*`, its `--config`
YAML, and the TOML that `mmtui --replay` reads and the wizard saves.
"""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, PositiveInt, ValidationError, model_validator

from .cast import with_params_dtype
from .disk_layout import infer_layout
from .errors import ConvertError
from .hf_out import build_merge_plan, build_mm_to_hf_plan
from .hf_source import ModelInfo, inspect_hf, read_config, resolve_fields
from .layout import ParallelConfig
from .lora import Adapter, attach, read_peft_adapter
from .lora_layout import open_mm_adapter, peft_plan, peft_to_mm_plan
from .megatron_args import Iteration, iteration_dir
from .mm_source import open_checkpoint
from .mm_view import open_view, retarget
from .mtp import without_mtp
from .parts import PartText
from .plan import TRACKER_NAME, Plan, build_dcp_plan, build_plan
from .preset import DEFAULT_NAMING, builtin_presets, preset_for_converter
from .target import check_inputs, check_target
from .te_names import TransformerImpl, check_preset, rename_plan, resolve
from .zero_parts import check_zero_parts

ParamsDtype = Literal["bf16", "fp16", "fp32"]
OutFormat = Literal["legacy", "torch_dist", "dcp"]
Naming = Literal["megatron_core", "mindspeed_llm"]


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _CommandConfig(_Config):
    """What every command takes."""

    part: PartText = None
    """This process's share of a job split over N processes or nodes: i/N, 0-based (as SLURM_ARRAY_TASK_ID and
    torchrun's RANK); default: read from Slurm's or torchrun's environment; none: the whole job here."""


class HfConfig(_Config):
    """A Hugging Face model directory."""

    hf_dir: Path
    """Hugging Face model directory (config.json and *.safetensors)."""


class LoraConfig(_Config):
    """A LoRA adapter: PEFT, or a Megatron/MindSpeed LoRA checkpoint with its layout."""

    adapter_dir: Path
    """A PEFT adapter (adapter_config.json + adapter_model.safetensors) or a Megatron/MindSpeed LoRA checkpoint."""
    parallel_config: ParallelConfig | None = None
    """Layout of a Megatron LoRA checkpoint (default: the Megatron base's layout, else read from the disk)."""
    r: PositiveInt | None = None
    """--lora-r a Megatron LoRA checkpoint was trained with (not needed for one mmtui wrote)."""
    alpha: float | None = None
    """--lora-alpha a Megatron LoRA checkpoint was trained with (not needed for one mmtui wrote)."""
    use_rslora: bool = False
    """A Megatron LoRA checkpoint trained with rsLoRA (scale alpha / sqrt(r))."""
    target_modules: list[str] | None = None
    """Megatron modules whose adapters to take, e.g. [linear_qkv, linear_proj]; default: all on disk."""

    @property
    def is_megatron(self) -> bool:
        return (Path(self.adapter_dir) / TRACKER_NAME).is_file()


class CommonModelConfig(_Config):
    """Model options; only llm_hf_dir changes what is written, the rest come from config.json."""

    llm_hf_dir: Path | None = None
    """Take the language-model weights from this second HF directory."""


class HfToMmConfig(_CommandConfig):
    """Convert a Hugging Face checkpoint to MindSpeed-MM's Megatron layout."""

    mm_dir: Path
    """Output directory; written to a temporary sibling and renamed into place when complete."""
    hf_config: HfConfig
    """The Hugging Face checkpoint to convert."""
    parallel_config: ParallelConfig
    """Target layout: TP size and layers per pipeline stage for each module and VPP chunk."""
    llm_hf_config: HfConfig | None = None
    """Take the language-model weights from this second HF directory (same as common_model_config.llm_hf_dir)."""
    common_model_config: CommonModelConfig = CommonModelConfig()
    """Model options; only llm_hf_dir is read (the rest of a model's shape comes from its config.json)."""
    save_vit_only: bool = False
    """Write only the vision encoder and projector."""
    overwrite: bool = False
    """Replace an existing, non-empty mm_dir."""
    trust_remote_code: bool = False
    """Accepted for compatibility; mmtui never runs code from a checkpoint."""
    lora: LoraConfig | None = None
    """Merge this LoRA adapter into the weights it targets: W + alpha/r * B @ A, in float32."""
    iteration: Iteration = None
    """Write iter_NNNNNNN/ (tracker N, `iteration` N in every rank file), as MindSpeed-LLM does (it writes 1);
    unset: release/."""
    save_megatron_args: bool = False
    """Put Megatron-LM's `args` (an argparse.Namespace: layout and model shape) and `iteration` (0 for release)
    in every rank file, for its tools/checkpoint and --use-checkpoint-args (language models)."""
    transformer_impl: TransformerImpl = "local"
    """Megatron-LM's --transformer-impl the output is for: transformer_engine names the norms as TE's fused
    layers hold them (self_attention.linear_qkv.layer_norm_weight, ...); local (MindSpeed's) keeps input_layernorm."""
    params_dtype: ParamsDtype | None = None
    """Cast every float weight to this dtype while streaming (MindSpeed-LLM's --params-dtype); unset: each keeps
    its own, and FP8 block-quantised weights (DeepSeek-V3's hub files) are dequantised to bf16."""
    format: OutFormat = "legacy"
    """What to write: legacy (mp_rank_* rank files), torch_dist (Megatron-Core's distributed checkpoint, language
    models), or dcp (one torch.distributed.checkpoint of full tensors, as hf_to_dcp; the layout is not used)."""
    mtp: bool = True
    """Convert the multi-token-prediction layers (DeepSeek-V3's model.layers.61) when the model has them;
    false leaves them out (MindSpeed-LLM's --mtp-num-layers 0)."""
    naming: Naming = "megatron_core"
    """Whose key names: Megatron-Core's, or MindSpeed-LLM's where they differ (DeepSeek: MLA's fused linear_qkv,
    the final norms with MTP layers); the same for the other families."""

    @model_validator(mode="after")
    def _one_llm_dir(self) -> HfToMmConfig:
        a = self.llm_hf_config.hf_dir if self.llm_hf_config else None
        b = self.common_model_config.llm_hf_dir
        if a and b and Path(a) != Path(b):
            raise ValueError(f"llm_hf_config.hf_dir {a} and common_model_config.llm_hf_dir {b} disagree; give one")
        return self

    @property
    def llm_hf_dir(self) -> Path | None:
        return self.llm_hf_config.hf_dir if self.llm_hf_config else self.common_model_config.llm_hf_dir

    @property
    def out_dir(self) -> Path:
        return self.mm_dir


class MmToHfConfig(_CommandConfig):
    """Convert a MindSpeed-MM (Megatron) checkpoint back to Hugging Face safetensors."""

    save_hf_dir: Path
    """Output directory for the Hugging Face model."""
    mm_dir: Path
    """The Megatron/MindSpeed checkpoint (holds latest_checkpointed_iteration.txt)."""
    hf_config: HfConfig
    """The original Hugging Face directory: config.json, shard names and non-weight files come from it."""
    parallel_config: ParallelConfig | None = None
    """Layout of mm_dir as it was written; default: read from the disk (rank directories and keys)."""
    max_shard_size: str | None = None
    """Re-shard to files of at most this size (e.g. 5GB) instead of the original's shard files."""
    overwrite: bool = False
    """Replace an existing, non-empty save_hf_dir."""
    lora: LoraConfig | None = None
    """Merge this LoRA adapter into the weights it targets: W + alpha/r * B @ A, in float32."""
    transformer_impl: TransformerImpl | None = None
    """The names mm_dir was written with (local, or transformer_engine's fused norms); default: read from the disk."""
    mtp: bool = True
    """The multi-token-prediction layers are in mm_dir (the default when the model has them); false: mm_dir was
    written without them, and so is the output."""
    naming: Naming = "megatron_core"
    """The key names mm_dir was written with: Megatron-Core's, or MindSpeed-LLM's where they differ (DeepSeek:
    MLA's fused linear_qkv, the final norms with MTP layers); the same for the other families."""

    @property
    def out_dir(self) -> Path:
        return self.save_hf_dir


class ResplitConfig(_CommandConfig):
    """Re-cut a MindSpeed-MM (Megatron) checkpoint to another TP / PP / VPP layout."""

    source_dir: Path
    """The Megatron/MindSpeed checkpoint to re-cut."""
    target_dir: Path
    """Output directory for the re-cut checkpoint."""
    hf_config: HfConfig
    """The model's Hugging Face directory (config.json and safetensors headers are read; no weights)."""
    source_parallel_config: ParallelConfig | None = None
    """Layout of source_dir as it was written; default: read from the disk (rank directories and keys)."""
    target_parallel_config: ParallelConfig
    """Layout to write."""
    overwrite: bool = False
    """Replace an existing, non-empty target_dir."""
    lora: LoraConfig | None = None
    """Merge this LoRA adapter into the weights it targets: W + alpha/r * B @ A, in float32."""
    iteration: Iteration = None
    """Write iter_NNNNNNN/ (or release/); unset: the source's iteration directory, carried into the rank files."""
    save_megatron_args: bool = False
    """Put Megatron-LM's `args` (for the target layout) and `iteration` in every rank file (language models)."""
    source_transformer_impl: TransformerImpl | None = None
    """The names source_dir was written with (local, or transformer_engine's fused norms); default: the disk's."""
    transformer_impl: TransformerImpl | None = None
    """The names to write (local, or transformer_engine's fused norms); default: the source's."""
    format: OutFormat = "legacy"
    """What to write: legacy (mp_rank_* rank files) or torch_dist (Megatron-Core's distributed checkpoint, language
    models); the source's format is read from the disk."""
    mtp: bool = True
    """The multi-token-prediction layers are in source_dir and are written (when the model has them); false:
    neither."""
    naming: Naming = "megatron_core"
    """The key names the target gets (and source_dir has, unless source_naming says otherwise): Megatron-Core's,
    or MindSpeed-LLM's where they differ (DeepSeek: MLA's fused linear_qkv, the final norms with MTP layers)."""
    source_naming: Naming | None = None
    """The key names source_dir was written with; default: naming (a re-cut may also change the naming)."""

    @property
    def out_dir(self) -> Path:
        return self.target_dir


class HfToDcpConfig(_CommandConfig):
    """Convert a Hugging Face checkpoint to one torch.distributed.checkpoint directory (re-sharded at load)."""

    dcp_dir: Path
    """Output directory: latest_checkpointed_iteration.txt and release/{.metadata,__0_0.distcp}."""
    hf_config: HfConfig
    """The Hugging Face checkpoint to convert."""
    overwrite: bool = False
    """Replace an existing, non-empty dcp_dir."""
    lora: LoraConfig | None = None
    """Merge this LoRA adapter into the weights it targets: W + alpha/r * B @ A, in float32."""
    params_dtype: ParamsDtype | None = None
    """Cast every float weight to this dtype while streaming (MindSpeed-LLM's --params-dtype); unset: each keeps
    its own, and FP8 block-quantised weights (DeepSeek-V3's hub files) are dequantised to bf16."""

    @property
    def out_dir(self) -> Path:
        return self.dcp_dir


class MergeLoraConfig(_CommandConfig):
    """Merge a LoRA adapter into a Hugging Face checkpoint: merged HF safetensors, sharded like the base."""

    save_hf_dir: Path
    """Output directory for the merged Hugging Face model."""
    hf_config: HfConfig
    """The base Hugging Face checkpoint."""
    lora: LoraConfig
    """The adapter: W + alpha/r * B @ A (alpha/sqrt(r) with rsLoRA), computed in float32, cast to the base dtype."""
    max_shard_size: str | None = None
    """Re-shard to files of at most this size (e.g. 5GB) instead of the base's shard files."""
    overwrite: bool = False
    """Replace an existing, non-empty save_hf_dir."""

    @property
    def out_dir(self) -> Path:
        return self.save_hf_dir


class LoraHfToMmConfig(_CommandConfig):
    """Write a PEFT LoRA adapter in Megatron/MindSpeed layout (lora_A / lora_B beside each target), unmerged."""

    mm_dir: Path
    """Output directory for the adapter's rank files."""
    hf_config: HfConfig
    """The base Hugging Face model (config.json and safetensors headers; no weights are read)."""
    lora: LoraConfig
    """The PEFT adapter."""
    parallel_config: ParallelConfig
    """Layout to cut the adapter for (the base model's training layout)."""
    overwrite: bool = False
    """Replace an existing, non-empty mm_dir."""
    transformer_impl: TransformerImpl = "local"
    """Megatron-LM's --transformer-impl the base is trained with (adapter keys name no norms: the same either way)."""

    @property
    def out_dir(self) -> Path:
        return self.mm_dir


class LoraMmToHfConfig(_CommandConfig):
    """Write a Megatron/MindSpeed LoRA checkpoint as a PEFT adapter (adapter_config.json + safetensors), unmerged."""

    save_hf_dir: Path
    """Output directory for the PEFT adapter."""
    hf_config: HfConfig
    """The base Hugging Face model (config.json and safetensors headers; no weights are read)."""
    lora: LoraConfig
    """The Megatron LoRA checkpoint: adapter_dir, parallel_config, and r / alpha unless mmtui wrote it."""
    overwrite: bool = False
    """Replace an existing, non-empty save_hf_dir."""
    transformer_impl: TransformerImpl | None = None
    """Megatron-LM's --transformer-impl the adapter was trained with (adapter keys name no norms: the same either
    way)."""

    @property
    def out_dir(self) -> Path:
        return self.save_hf_dir


COMMANDS: dict[str, type[_Config]] = {
    "hf_to_mm": HfToMmConfig,
    "mm_to_hf": MmToHfConfig,
    "resplit": ResplitConfig,
    "hf_to_dcp": HfToDcpConfig,
    "merge_lora": MergeLoraConfig,
    "lora_hf_to_mm": LoraHfToMmConfig,
    "lora_mm_to_hf": LoraMmToHfConfig,
}


class Job(_Config):
    """A saved job: `converter = "Qwen2VLConverter"`, `command = "hf_to_mm"`, then `[cfg]`."""

    converter: str
    command: Literal["hf_to_mm", "mm_to_hf", "resplit", "hf_to_dcp", "merge_lora", "lora_hf_to_mm", "lora_mm_to_hf"]
    cfg: (
        HfToMmConfig
        | MmToHfConfig
        | ResplitConfig
        | HfToDcpConfig
        | MergeLoraConfig
        | LoraHfToMmConfig
        | LoraMmToHfConfig
    )

    @model_validator(mode="before")
    @classmethod
    def _cfg_of_command(cls, data: Any) -> Any:
        """Validate `cfg` against the command's schema only (clear errors, no union guessing)."""
        if isinstance(data, dict) and isinstance(data.get("cfg"), dict) and data.get("command") in COMMANDS:
            data = dict(data)
            data["cfg"] = COMMANDS[data["command"]].model_validate(data["cfg"])
        return data

    @property
    def out_dir(self) -> Path:
        return Path(self.cfg.out_dir)

    @property
    def out_field(self) -> str:
        return OUT_FIELDS[self.command]

    @property
    def inputs(self) -> list[tuple[str, Path]]:
        """(field, directory) of everything the job reads: the target may overlap none of them."""
        cfg = self.cfg
        out = [("hf_config.hf_dir", Path(cfg.hf_config.hf_dir))]
        if isinstance(cfg, HfToMmConfig) and cfg.llm_hf_dir:
            out.append(("llm_hf_dir", Path(cfg.llm_hf_dir)))
        if isinstance(cfg, MmToHfConfig):
            out.append(("mm_dir", Path(cfg.mm_dir)))
        if isinstance(cfg, ResplitConfig):
            out.append(("source_dir", Path(cfg.source_dir)))
        if cfg.lora is not None:
            out.append(("lora.adapter_dir", Path(cfg.lora.adapter_dir)))
        return out

    @property
    def overwrite(self) -> bool:
        return self.cfg.overwrite


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


def _inspect_family(job: Job, hf_dir: Path, naming: str) -> ModelInfo:
    seen = read_config(hf_dir).get("model_type")  # the family first: its fields would not be found
    preset = preset_for_converter(job.converter, seen, naming)
    if seen and seen not in preset.model_types:
        same = [p for p in builtin_presets().values() if p.converter == job.converter]  # Qwen3-VL: dense and MoE
        raise ConvertError(
            f"{hf_dir}/config.json: model_type {seen!r} is not a {' or '.join(p.title for p in same)} model "
            f"(converter {job.converter} expects {', '.join(t for p in same for t in p.model_types)})"
        )
    return inspect_hf(hf_dir, preset)


OUT_FIELDS = {
    "hf_to_mm": "mm_dir",
    "mm_to_hf": "save_hf_dir",
    "resplit": "target_dir",
    "hf_to_dcp": "dcp_dir",
    "merge_lora": "save_hf_dir",
    "lora_hf_to_mm": "mm_dir",
    "lora_mm_to_hf": "save_hf_dir",
}


def prepare(job: Job, *, check_out: bool = True) -> tuple[ModelInfo, Plan]:
    """Everything but writing: inspect, plan, check the target. Raises ConvertError on bad input.

    `check_out=False` skips the target check, for a preview made while the user types.
    """
    info, plan = _prepare(job, check_out)
    plan.inputs = job.inputs
    return info, plan


def _prepare(job: Job, check_out: bool) -> tuple[ModelInfo, Plan]:
    cfg = job.cfg
    if check_out:
        check_inputs(job.out_dir, job.inputs, job.out_field, job.overwrite)
        check_target(job.out_dir, job.overwrite, job.out_field)
    if isinstance(cfg, MmToHfConfig):
        info = _inspect(job, cfg.hf_config.hf_dir)
        ckpt = open_checkpoint(cfg.mm_dir)
        layout = cfg.parallel_config or infer_layout(info, ckpt)
        impl = resolve(info, ckpt, cfg.transformer_impl, "transformer_impl", "mm_dir")
        view = open_view(info, ckpt, layout, forward=_forward(info, layout, ckpt.iteration, impl))
        check_zero_parts(view, "mm_dir")
        adapter = _adapter(cfg.lora, info, layout)
        return info, build_mm_to_hf_plan(info, view, max_shard_size=cfg.max_shard_size, adapter=adapter)
    if isinstance(cfg, MergeLoraConfig):
        info = _inspect(job, cfg.hf_config.hf_dir)
        adapter = _adapter(cfg.lora, info, None)
        assert adapter is not None
        return info, build_merge_plan(info, adapter, max_shard_size=cfg.max_shard_size)
    if isinstance(cfg, LoraHfToMmConfig):
        info = _inspect(job, cfg.hf_config.hf_dir)
        if cfg.lora.is_megatron:
            raise ConvertError(
                f"lora.adapter_dir {cfg.lora.adapter_dir}: a Megatron LoRA checkpoint; lora_hf_to_mm takes a PEFT "
                "adapter (adapter_config.json + adapter_model.safetensors)"
            )
        check_preset(info, cfg.transformer_impl, "transformer_impl")
        plan = peft_to_mm_plan(info, read_peft_adapter(cfg.lora.adapter_dir, info), cfg.parallel_config)
        return info, rename_plan(plan, cfg.transformer_impl)
    if isinstance(cfg, LoraMmToHfConfig):
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
    if isinstance(cfg, HfToDcpConfig):
        info = with_params_dtype(_inspect(job, cfg.hf_config.hf_dir), cfg.params_dtype)
        return info, _merged(build_dcp_plan(info), _adapter(cfg.lora, info, None))
    if isinstance(cfg, ResplitConfig):
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
    assert isinstance(cfg, HfToMmConfig)
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


def first_error(e: ValidationError, where: str, prefix: str = "") -> ConvertError:
    err = e.errors()[0]
    loc = prefix + ".".join(str(p) for p in err["loc"])
    value = err.get("input")
    shown = "" if isinstance(value, dict) else f" = {value!r}"
    msg = err["msg"].removeprefix("Value error, ")
    return ConvertError(f"{where}: {loc}{shown}: {msg}")


def read_job_file(path: Path | str) -> dict[str, Any]:
    """A job file's data, unchecked: `converter` and `command` at the top, the fields under `cfg`.

    TOML as the wizard saves it, YAML as `mm-convert --print_config` prints it, and the seed
    tool's nested YAML (`Qwen2VLConverter: {hf_to_mm: {cfg: ...}}`) read as the same.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConvertError(f"{path}: cannot read ({e.strerror})") from None
    try:
        data: Any = yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else tomllib.loads(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as e:
        raise ConvertError(
            f"{path}: not valid {'YAML' if path.suffix in ('.yaml', '.yml') else 'TOML'} ({e})"
        ) from None
    if not isinstance(data, dict):
        raise ConvertError(f"{path}: expected converter, command and cfg, got {type(data).__name__} {data!r:.40}")
    outer = {k: v for k, v in data.items() if k != "subcommand"}
    if "converter" not in data and len(outer) == 1 and isinstance(inner := next(iter(outer.values())), dict):
        commands = [(k, v) for k, v in inner.items() if k in COMMANDS and isinstance(v, dict)]
        if len(commands) == 1:
            return {"converter": next(iter(outer)), "command": commands[0][0], "cfg": commands[0][1].get("cfg")}
    return data


def load_job(path: Path | str) -> Job:
    """Read a job from TOML (or YAML): one schema for both."""
    data = read_job_file(path)
    if isinstance(data, dict) and isinstance(data.get("cfg"), dict) and data.get("command") in COMMANDS:
        try:  # the command's own schema first, so the error names the field as written
            data = {**data, "cfg": COMMANDS[data["command"]].model_validate(data["cfg"])}
        except ValidationError as e:
            raise first_error(e, str(path), "cfg.") from None
    try:
        return Job.model_validate(data)
    except ValidationError as e:
        raise first_error(e, str(path)) from None


def job_to_dict(job: Job) -> dict[str, Any]:
    """Plain data for TOML: paths as strings, defaults left out."""
    return job.model_dump(mode="json", exclude_defaults=True, exclude_none=True)


def job_to_argv(job: Job) -> list[str]:
    """The same job as `mm-convert` arguments (the wizard offers it to copy into a script)."""
    import json

    argv = [job.converter, job.command]

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}", v)
        elif isinstance(value, list):
            argv.extend([f"--{prefix}", json.dumps(value, separators=(",", ":"))])
        elif isinstance(value, bool):
            argv.extend([f"--{prefix}", "true" if value else "false"])
        else:
            argv.extend([f"--{prefix}", str(value)])

    walk("cfg", job_to_dict(job)["cfg"])
    return argv
