"""`mm-convert`: the seed tool's command line, so existing scripts keep working.

`mm-convert Qwen2VLConverter hf_to_mm --cfg.mm_dir OUT --cfg.hf_config.hf_dir HF
--cfg.parallel_config.llm_pp_layers [[1,10,10,7]] ...`, `--config job.yaml`,
`--print_config[=comments]`, and `MM_CONVERT_...` environment variables when
`JSONARGPARSE_DEFAULT_ENV=true`. jsonargparse builds all of it from the pydantic job
schema; one converter class per preset, generated, so a new preset file is a new
subcommand.
"""

from __future__ import annotations

import os
import sys

from engine.job import (
    COMMANDS,
    HfToDcpConfig,
    HfToMmConfig,
    Job,
    LoraHfToMmConfig,
    LoraMmToHfConfig,
    MergeLoraConfig,
    MmToHfConfig,
    ResplitConfig,
)
from engine.preset import builtin_presets

from .runner import run_job_cli


def _converter_class(converter: str, title: str, only: str | None = None) -> type:
    def hf_to_mm(cfg: HfToMmConfig) -> None:
        """Convert a Hugging Face checkpoint to MindSpeed-MM (Megatron) layout."""
        run_job_cli(Job(converter=converter, command="hf_to_mm", cfg=cfg), prog="mm-convert")

    def mm_to_hf(cfg: MmToHfConfig) -> None:
        """Convert a MindSpeed-MM (Megatron) checkpoint back to Hugging Face safetensors."""
        run_job_cli(Job(converter=converter, command="mm_to_hf", cfg=cfg), prog="mm-convert")

    def resplit(cfg: ResplitConfig) -> None:
        """Re-cut a MindSpeed-MM (Megatron) checkpoint to another TP / PP / VPP layout."""
        run_job_cli(Job(converter=converter, command="resplit", cfg=cfg), prog="mm-convert")

    def hf_to_dcp(cfg: HfToDcpConfig) -> None:
        """Convert a Hugging Face checkpoint to one torch.distributed.checkpoint directory."""
        run_job_cli(Job(converter=converter, command="hf_to_dcp", cfg=cfg), prog="mm-convert")

    def merge_lora(cfg: MergeLoraConfig) -> None:
        """Merge a LoRA adapter (PEFT) into a Hugging Face checkpoint, written as HF safetensors."""
        run_job_cli(Job(converter=converter, command="merge_lora", cfg=cfg), prog="mm-convert")

    def lora_hf_to_mm(cfg: LoraHfToMmConfig) -> None:
        """Write a PEFT LoRA adapter in Megatron/MindSpeed layout, cut for a TP / PP layout, unmerged."""
        run_job_cli(Job(converter=converter, command="lora_hf_to_mm", cfg=cfg), prog="mm-convert")

    def lora_mm_to_hf(cfg: LoraMmToHfConfig) -> None:
        """Write a Megatron/MindSpeed LoRA checkpoint as a PEFT adapter, unmerged."""
        run_job_cli(Job(converter=converter, command="lora_mm_to_hf", cfg=cfg), prog="mm-convert")

    commands = (hf_to_mm, mm_to_hf, resplit, hf_to_dcp, merge_lora, lora_hf_to_mm, lora_mm_to_hf)
    methods = {fn.__name__: staticmethod(fn) for fn in commands if only in (None, fn.__name__)}
    return type(converter, (), {"__doc__": f"{title} checkpoints.", **methods})


def converter_classes() -> list[type]:
    return [_converter_class(p.converter, p.title) for p in builtin_presets().values()]


def main(argv: list[str] | None = None) -> None:
    import jsonargparse

    os.environ.setdefault("JSONARGPARSE_DEPRECATION_WARNINGS", "off")
    jsonargparse.set_parsing_settings(docstring_parse_attribute_docstrings=True)
    args = sys.argv[1:] if argv is None else argv
    # every converter's parser takes ~1.5 s to build; a job names its converter and command first
    presets = {p.converter: p for p in builtin_presets().values()}
    if args and args[0] in presets:
        command = args[1] if len(args) > 1 and args[1] in COMMANDS else None
        components = {args[0]: _converter_class(args[0], presets[args[0]].title, command)}
    else:
        components = {c.__name__: c for c in converter_classes()}
    jsonargparse.auto_cli(components, as_positional=False, args=args, prog="mm-convert")


if __name__ == "__main__":
    main(sys.argv[1:])
