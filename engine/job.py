"""The job a user writes: one pydantic schema behind `mm-convert --cfg.*`, its `--config`
YAML, and the TOML that `mmtui --replay` reads and the wizard saves.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, PositiveInt, ValidationError, model_validator

from .errors import ConvertError
from .layout import ParallelConfig
from .planning.megatron_args import Iteration
from .planning.plan import TRACKER_NAME, Plan
from .planning.te_names import TransformerImpl
from .run.parts import PartText
from .run.target import check_inputs, check_target
from .source.hf_source import ModelInfo

ParamsDtype = Literal["bf16", "fp16", "fp32"]
OutFormat = Literal["legacy", "torch_dist", "dcp"]
Naming = Literal["megatron_core", "mindspeed_llm"]


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _CommandConfig(_Config):
    """What every command takes. Each command's config says how it plans (`plan`, in engine/planners.py)."""

    part: PartText = None
    """This process's share of a job split over N processes or nodes: i/N, 0-based (as SLURM_ARRAY_TASK_ID and
    torchrun's RANK); default: read from Slurm's or torchrun's environment; none: the whole job here."""

    def plan(self, job: Job) -> tuple[ModelInfo, Plan]:
        """The model and the plan of this command (engine/planners.py; no data read)."""
        raise NotImplementedError  # every command's config has its own


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

    def plan(self, job: Job) -> tuple[ModelInfo, Plan]:
        from .planners import hf_to_mm

        return hf_to_mm(job, self)


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

    def plan(self, job: Job) -> tuple[ModelInfo, Plan]:
        from .planners import mm_to_hf

        return mm_to_hf(job, self)


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

    def plan(self, job: Job) -> tuple[ModelInfo, Plan]:
        from .planners import resplit

        return resplit(job, self)


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

    def plan(self, job: Job) -> tuple[ModelInfo, Plan]:
        from .planners import hf_to_dcp

        return hf_to_dcp(job, self)


class DcpToHfConfig(_CommandConfig):
    """Convert a torch.distributed.checkpoint directory back to Hugging Face safetensors: MindSpeed-MM's FSDP2
    checkpoints (model.<dcp_prefix><HF name>, sharded across ranks) and hf_to_dcp's output."""

    save_hf_dir: Path | None = None
    """Output directory for the Hugging Face model (MindSpeed-MM: save_dir)."""
    dcp_dir: Path | None = None
    """The DCP checkpoint: a directory holding .metadata (release/, iter_NNNNNNN/), or the save directory whose
    latest_checkpointed_iteration.txt names it (MindSpeed-MM: load_dir)."""
    hf_config: HfConfig | None = None
    """The original Hugging Face directory: shard files, tensor order, config and tokenizer come from it
    (MindSpeed-MM: model_assets_dir, or hf_dir)."""
    dcp_prefix: str | None = None
    """What stands between `model.` and the HF name in the checkpoint (MindSpeed-MM's GenericDCPConverter
    dcp_prefix; its Qwen3-VL converter uses `model.`); default: read from the checkpoint."""
    hf_prefix: str = ""
    """The start of HF names that the checkpoint leaves out (GenericDCPConverter's hf_prefix)."""
    fused_linear_names: list[str] = ["gate_up_proj", "down_proj"]
    """HF tensors (MoE experts [experts, in, out]) that may be stored as their 2-D view [experts * in, out], as
    MindSpeed-MM's converters and FSDP2 models hold them (its fused_linear_names; these are its Qwen3-VL ones)."""
    hf_dtype: bool = False
    """Write each tensor in hf_dir's dtype: a float tensor saved in another (FSDP2's float32 master weights of a
    bfloat16 model) is rounded as tensor.to(dtype) rounds it; false: another dtype than hf_dir's is an error."""
    overwrite: bool = False
    """Replace an existing, non-empty save_hf_dir."""
    load_dir: Path | None = None
    """MindSpeed-MM's name for dcp_dir."""
    save_dir: Path | None = None
    """MindSpeed-MM's name for save_hf_dir."""
    model_assets_dir: Path | None = None
    """MindSpeed-MM's name for hf_config.hf_dir."""
    hf_dir: Path | None = None
    """MindSpeed-MM's DcpConverter name for hf_config.hf_dir."""

    @model_validator(mode="after")
    def _one_name_each(self) -> DcpToHfConfig:
        """MindSpeed-MM's names are read as ours: each directory given once, under either name."""
        hf = self.hf_config.hf_dir if self.hf_config else None
        for ours, theirs, mine in (
            ("dcp_dir", ("load_dir",), self.dcp_dir),
            ("save_hf_dir", ("save_dir",), self.save_hf_dir),
            ("hf_config.hf_dir", ("model_assets_dir", "hf_dir"), hf),
        ):
            given = {n: v for n, v in [(ours, mine), *((t, getattr(self, t)) for t in theirs)] if v is not None}
            if not given:
                raise ValueError(f"give {ours} (or {' or '.join(theirs)}, as MindSpeed-MM calls it)")
            if len({Path(v) for v in given.values()}) > 1:
                shown = ", ".join(map(str, given.values()))
                raise ValueError(f"{' and '.join(given)} name different directories ({shown}); give one")
            value = Path(next(iter(given.values())))
            for t in theirs:
                setattr(self, t, None)
            if ours == "dcp_dir":
                self.dcp_dir = value
            elif ours == "save_hf_dir":
                self.save_hf_dir = value
            else:
                self.hf_config = HfConfig(hf_dir=value)
        return self

    @property
    def out_dir(self) -> Path:
        assert self.save_hf_dir is not None
        return self.save_hf_dir

    def plan(self, job: Job) -> tuple[ModelInfo, Plan]:
        from .planners import dcp_to_hf

        return dcp_to_hf(job, self)


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

    def plan(self, job: Job) -> tuple[ModelInfo, Plan]:
        from .planners import merge_lora

        return merge_lora(job, self)


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

    def plan(self, job: Job) -> tuple[ModelInfo, Plan]:
        from .planners import lora_hf_to_mm

        return lora_hf_to_mm(job, self)


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

    def plan(self, job: Job) -> tuple[ModelInfo, Plan]:
        from .planners import lora_mm_to_hf

        return lora_mm_to_hf(job, self)


COMMANDS: dict[str, type[_Config]] = {
    "hf_to_mm": HfToMmConfig,
    "mm_to_hf": MmToHfConfig,
    "resplit": ResplitConfig,
    "hf_to_dcp": HfToDcpConfig,
    "dcp_to_hf": DcpToHfConfig,
    "merge_lora": MergeLoraConfig,
    "lora_hf_to_mm": LoraHfToMmConfig,
    "lora_mm_to_hf": LoraMmToHfConfig,
}


class Job(_Config):
    """A saved job: `converter = "Qwen2VLConverter"`, `command = "hf_to_mm"`, then `[cfg]`."""

    converter: str
    command: Literal[
        "hf_to_mm", "mm_to_hf", "resplit", "hf_to_dcp", "dcp_to_hf", "merge_lora", "lora_hf_to_mm", "lora_mm_to_hf"
    ]
    cfg: (
        HfToMmConfig
        | MmToHfConfig
        | ResplitConfig
        | HfToDcpConfig
        | DcpToHfConfig
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
        if isinstance(cfg, DcpToHfConfig):
            out.append(("dcp_dir", Path(cfg.dcp_dir or "")))
        if getattr(cfg, "lora", None) is not None:
            out.append(("lora.adapter_dir", Path(cfg.lora.adapter_dir)))
        return out

    @property
    def overwrite(self) -> bool:
        return self.cfg.overwrite


OUT_FIELDS = {
    "hf_to_mm": "mm_dir",
    "mm_to_hf": "save_hf_dir",
    "resplit": "target_dir",
    "hf_to_dcp": "dcp_dir",
    "dcp_to_hf": "save_hf_dir",
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
    if check_out:
        check_inputs(job.out_dir, job.inputs, job.out_field, job.overwrite)
        check_target(job.out_dir, job.overwrite, job.out_field)
    return job.cfg.plan(job)


def first_error(e: ValidationError, where: str, prefix: str = "") -> ConvertError:
    err = e.errors()[0]
    loc = (prefix + ".".join(str(p) for p in err["loc"])).rstrip(".")  # a whole-config check: "cfg"
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
