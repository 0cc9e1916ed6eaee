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
import re
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


_HINTS = {
    "_pp_layers": "per-stage layer counts, one list per VPP chunk, such as [[1,10,10,7]] (quote it in the shell)",
}


def one_line(message: str) -> str:
    """jsonargparse's several-line report as one line: the field, the value given, what is accepted."""
    lines = [line.strip().removeprefix("- ") for line in message.strip().splitlines() if line.strip()]
    head = re.match(r'Parser key "([^"]+)"', lines[0]) if lines else None
    if head is None or len(lines) == 1:
        return " ".join(lines)
    field = head.group(1)
    value = next((line.split("value:", 1)[1].strip() for line in reversed(lines) if "Given value:" in line
                  or "Got value:" in line), None)  # fmt: skip
    hint = next((h for suffix, h in _HINTS.items() if field.endswith(suffix)), None)
    if hint is None:
        found = next((line for line in lines[1:] if line.startswith(("Input should", "Expected", "Value error"))), "")
        hint = re.sub(r"\s*\[type=.*$", "", found or lines[1]).split(". Got value:")[0]
    shown = f" = {value!r}" if value is not None else ""
    return f"{field}{shown}: expected {hint}" if hint[0].islower() else f"{field}{shown}: {hint}"


def _parser_class() -> type:
    import jsonargparse

    class OneLineErrors(jsonargparse.ArgumentParser):
        """Bad input is one line and exit 2, as everywhere in mmtui (not usage + a multi-line report)."""

        def error(self, message: str, ex: Exception | None = None):  # type: ignore[override]
            if not self.exit_on_error:  # an internal attempt jsonargparse catches itself
                return super().error(message, ex)
            sys.stderr.write(f"mm-convert: error: {one_line(message)}\n")
            sys.exit(2)

    return OneLineErrors


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
    jsonargparse.auto_cli(components, as_positional=False, args=args, prog="mm-convert", parser_class=_parser_class())


if __name__ == "__main__":
    main(sys.argv[1:])
