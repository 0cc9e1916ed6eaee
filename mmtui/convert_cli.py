"""`mm-convert`: the seed tool's command line, so existing scripts keep working, and job files.

    mm-convert Qwen2VLConverter hf_to_mm --cfg.mm_dir OUT --cfg.hf_config.hf_dir HF \\
        --cfg.parallel_config.llm_pp_layers [[1,10,10,7]] ...
    mm-convert --config job.toml [--cfg.FIELD VALUE ...]

A job file names its converter and command at the top, its fields under `cfg`: the TOML
the wizard saves, the YAML `--print_config` prints, and the seed tool's nested YAML all
run as they are, here and with `mmtui --replay`. `MM_CONVERT_...` environment variables
work when `JSONARGPARSE_DEFAULT_ENV=true`.

Only the parser of the command asked for is built (jsonargparse, from the pydantic job
schema: ~0.5 s each), and the help above it is plain text, so `-h` needs neither torch nor
a parser per converter. Flags are never abbreviated; a typo gets the closest real flag.
"""

from __future__ import annotations

import json
import os
import re
import sys
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from .cli_args import choice_error, fail, flags_of, with_hint
from .readable import readable

if TYPE_CHECKING:
    from engine.job import Job

# the commands in engine.job.COMMANDS' order (a test holds them equal), for help without importing the engine
COMMAND_HELP = {
    "hf_to_mm": "Hugging Face -> MindSpeed-MM / Megatron layout (TP, PP, VPP, EP)",
    "mm_to_hf": "MindSpeed-MM / Megatron -> Hugging Face safetensors",
    "resplit": "re-cut a MindSpeed-MM / Megatron checkpoint to another layout",
    "hf_to_dcp": "Hugging Face -> one torch.distributed.checkpoint directory",
    "dcp_to_hf": "torch.distributed.checkpoint (MindSpeed-MM FSDP2, or hf_to_dcp's) -> Hugging Face safetensors",
    "merge_lora": "merge a LoRA adapter into a Hugging Face checkpoint",
    "lora_hf_to_mm": "a PEFT LoRA adapter -> MindSpeed-MM / Megatron layout, unmerged",
    "lora_mm_to_hf": "a MindSpeed-MM / Megatron LoRA checkpoint -> PEFT adapter, unmerged",
}
CONFIG_HELP = (
    "a job file: TOML as the wizard saves it, or YAML as --print_config prints it; it names its "
    "converter and command, so they may be left out; options after it override its fields"
)
PRINT_CONFIG_HELP = "print the job as YAML (converter, command, cfg: every field) and exit; =comments adds the help"
TOP_FLAGS = ("-h", "--help", "--config", "--print_config")
GENERIC = "GenericDCPConverter"  # engine/planners.py GENERIC: the family from config.json, for dcp_to_hf


def _converters() -> dict[str, str]:
    """Converter name -> model family title(s): one per family's Megatron-Core preset (its other namings are the
    same converter), or two presets sharing MindSpeed-MM's one converter name (Qwen3VLMegatronConverter:
    Qwen3-VL dense and MoE, told apart by config.json)."""
    from engine.preset import default_presets

    out: dict[str, str] = {}
    for p in default_presets():
        out[p.converter] = f"{out[p.converter]} / {p.title}" if p.converter in out else p.title
    out[GENERIC] = "dcp_to_hf of any family above, told by config.json (MindSpeed-MM's FSDP2 name)"
    return out


def _rows(table: dict[str, str]) -> str:
    return "\n".join(f"  {name:22s}  {text}" for name, text in table.items())


def _wrapped(text: str) -> str:
    return textwrap.fill(text, 96, subsequent_indent=" " * 26, initial_indent=" " * 26).lstrip()


def top_help(converters: dict[str, str]) -> str:
    return f"""usage: mm-convert [-h] CONVERTER COMMAND [--config JOB] [--print_config] [--cfg.FIELD VALUE ...]
       mm-convert --config JOB [--cfg.FIELD VALUE ...]

Convert checkpoints between Hugging Face and MindSpeed-MM / Megatron layouts.

converters (one per model family):
{_rows(converters)}

commands:
{_rows(COMMAND_HELP)}

options:
  -h, --help              this help; `mm-convert CONVERTER COMMAND -h` lists a command's fields
  --config JOB            {_wrapped(CONFIG_HELP)}
  --print_config[=comments]
                          {_wrapped(PRINT_CONFIG_HELP)}

Example: mm-convert Qwen2VLConverter hf_to_mm --cfg.mm_dir OUT --cfg.hf_config.hf_dir HF \\
           --cfg.parallel_config.llm_pp_layers [[1,10,10,7]] --cfg.parallel_config.vit_pp_layers [[32,0,0,0]]
"""


def converter_help(converter: str, title: str) -> str:
    return f"""usage: mm-convert {converter} [-h] COMMAND [--config JOB] [--print_config] [--cfg.FIELD VALUE ...]

{title} checkpoints.

commands:
{_rows(COMMAND_HELP)}

`mm-convert {converter} COMMAND -h` lists a command's fields.
"""


def _job_file(value: str, prog: str) -> tuple[dict[str, Any], tuple[str, str] | None] | None:
    """A --config value that is a file: its data and its (converter, command), if it names them."""
    path = Path(value)
    if not path.is_file():
        if value.lstrip().startswith("{") or "\n" in value or ": " in value:
            return None  # a config given inline, as jsonargparse allows
        fail(prog, f"--config {value}: no such file")
    from engine.errors import ConvertError
    from engine.job import read_job_file

    try:
        data = read_job_file(path)
    except ConvertError as e:
        fail(prog, str(e))
    converter, command = data.get("converter"), data.get("command")
    if converter is None and command is None:
        return data, None
    if not (isinstance(converter, str) and isinstance(command, str)):
        fail(prog, f'{path}: give both converter and command at the top (converter = "Qwen2VLConverter", '
                   f'command = "hf_to_mm"), got converter = {converter!r}, command = {command!r}')  # fmt: skip
    if command not in COMMAND_HELP:
        fail(prog, f"{path}: command = {command!r}: {choice_error('command', command, COMMAND_HELP)}")
    return data, (converter, command)


def route(args: list[str], prog: str = "mm-convert") -> tuple[str, str, list[str]]:
    """(converter, command, the command's own arguments), from the command line or a job file it gives.

    Prints the help above the command level and exits; a wrong name is one line with the closest one.
    """
    converters = _converters()
    i = 0
    while i < len(args) and args[i] not in converters:
        i += 2 if args[i] == "--config" else 1
    lead, tail = args[:i], args[i:]
    want_help, head, head_file, own, configs, j = False, None, "", [], [], 0
    while j < len(lead):  # mm-convert's own options, then (with a job file) the command's
        a = lead[j]
        if a in ("-h", "--help"):
            want_help = True
        elif a == "--config" or a.startswith("--config="):
            value = a.partition("=")[2] if "=" in a else (lead[j + 1] if j + 1 < len(lead) else None)
            if value is None:
                fail(prog, "argument --config: expected one argument (a job file)")
            found = _job_file(value, prog)
            if head is None and found and found[1]:
                head, head_file = found[1], value
            configs.append(value)
            own += [a] if "=" in a else [a, value]
            j += 0 if "=" in a else 1
        elif a == "--print_config" or a.startswith("--print_config="):
            own.append(a)
        else:
            break
        j += 1
    if j < len(lead) and (tail or head is None):
        a = lead[j]
        if not a.startswith("-"):
            fail(prog, choice_error("converter", a, converters))
        message = f"unrecognized arguments: {a}"
        hinted = with_hint(message, TOP_FLAGS)
        fail(prog, hinted if hinted != message else f"{message} (options go after CONVERTER COMMAND)")
    own += lead[j:]
    if tail:
        converter = tail[0]
        if len(tail) < 2 or tail[1] in ("-h", "--help"):
            if want_help or len(tail) > 1:
                sys.stdout.write(converter_help(converter, converters[converter]))
                sys.exit(0)
            fail(prog, f"give a command after {converter}: {', '.join(COMMAND_HELP)}")
        if tail[1] not in COMMAND_HELP:
            fail(prog, choice_error("command", tail[1], COMMAND_HELP))
        command, tail = tail[1], tail[2:]
    elif head is not None:
        converter, command = head
        if converter not in converters:
            fail(prog, f"{head_file}: converter = {converter!r}: {choice_error('converter', converter, converters)}")
    elif want_help:
        sys.stdout.write(top_help(converters))
        sys.exit(0)
    elif configs:
        fail(prog, f'{configs[0]}: names no converter and command; add them at the top (converter = '
                   f'"Qwen2VLConverter", command = "hf_to_mm"), or give them: mm-convert CONVERTER COMMAND '
                   f'--config {configs[0]}')  # fmt: skip
    else:
        fail(prog, "give a converter and a command (mm-convert -h lists them), or --config JOB")
    if head is not None and head != (converter, command):
        fail(prog, f"{head_file}: names {head[0]} {head[1]}, the command line {converter} {command}")
    if converter == GENERIC and command != "dcp_to_hf":
        fail(prog, f"{GENERIC} {command}: {GENERIC} takes dcp_to_hf only; name the model's converter for {command}")
    return converter, command, (["-h"] if want_help else []) + own + tail


def _inline_configs(args: list[str], converter: str, command: str, prog: str) -> list[str]:
    """Each `--config FILE` naming its converter and command (or in TOML) as the `cfg` jsonargparse reads."""
    out, i = [], 0
    while i < len(args):
        a = args[i]
        if a == "--config" and i + 1 < len(args):
            value, i = args[i + 1], i + 2
        elif a.startswith("--config="):
            value, i = a.partition("=")[2], i + 1
        else:
            out.append(a)
            i += 1
            continue
        found = _job_file(value, prog)
        if found is not None and found[1] is not None and found[1] != (converter, command):
            fail(prog, f"{value}: names {found[1][0]} {found[1][1]}, the command line {converter} {command}")
        if found is not None and (found[1] is not None or Path(value).suffix == ".toml"):
            data = {"cfg": found[0].get("cfg") or {}} if found[1] else found[0]
            value = json.dumps(data, default=str)
        out += ["--config", value]
    return out


def _one_whole_job(args: list[str], converter: str, command: str, prog: str) -> Job | None:
    """`--config FILE` alone, the file naming this converter and command: the job exactly as `mmtui --replay`
    reads it (errors name the file)."""
    if os.environ.get("JSONARGPARSE_DEFAULT_ENV", "").lower() == "true":
        return None
    value = args[1] if args[:1] == ["--config"] and len(args) == 2 else None
    if len(args) == 1 and args[0].startswith("--config="):
        value = args[0].partition("=")[2]
    found = _job_file(value, prog) if value else None
    if found is None or found[1] != (converter, command):
        return None
    from engine.errors import ConvertError
    from engine.job import load_job

    try:
        return load_job(value)
    except ConvertError as e:
        fail(prog, str(e))


_HINTS = {
    "_pp_layers": "per-stage layer counts, one list per VPP chunk, such as [[1,10,10,7]] (quote it in the shell)",
    "moe_grouped_gemm": "one of false, true (legacy), legacy (GroupedMLP's weight1/weight2), te (TEGroupedMLP's)",
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


def schema_flags(model: Any, prefix: str = "--cfg") -> list[str]:
    """Every `--cfg.a.b` a job schema takes, nested models' fields included (jsonargparse lists those
    only in their own help), for the closest-flag hint."""
    out = []
    for name, field in model.model_fields.items():
        flag = f"{prefix}.{name}"
        out.append(flag)
        for sub in (field.annotation, *getattr(field.annotation, "__args__", ())):
            if hasattr(sub, "model_fields"):
                out += schema_flags(sub, flag)
    return out


def command_parser(converter: str, command: str, prog: str = "mm-convert"):
    """The jsonargparse parser of one command (the seed tool's flags, env names and --print_config)."""
    import jsonargparse

    from engine.job import COMMANDS

    os.environ.setdefault("JSONARGPARSE_DEPRECATION_WARNINGS", "off")
    jsonargparse.set_parsing_settings(docstring_parse_attribute_docstrings=True)
    flags: list[str] = []

    class Help(jsonargparse.DefaultHelpFormatter):
        def _get_type_str(self, action: Any) -> str | None:
            hint = getattr(action, "_typehint", None) or action.type
            if action.option_strings and action.option_strings[0].endswith(".help"):
                return None
            if hint is None:
                return super()._get_type_str(action)
            return readable(hint, action.option_strings[0] if action.option_strings else "")

        def _get_help_string(self, action: Any) -> str:
            flag = action.option_strings[0] if action.option_strings else ""
            if (action.help or "").startswith("Show the help for "):
                return f"list the fields of {flag.removesuffix('.help')} and exit"
            if action.help == "Path to a configuration file.":  # the per-object --cfg.x CONFIG
                return "its fields as YAML or JSON, or a file of them"
            return super()._get_help_string(action)

        def _expand_help(self, action: Any) -> str:
            text = super()._expand_help(action)
            return re.sub(r"default: (True|False)\b", lambda m: f"default: {m[1].lower()}", text)

    class Parser(jsonargparse.ArgumentParser):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            """Also for the parsers jsonargparse makes itself (`--cfg.lora.help` builds one)."""
            kwargs.setdefault("formatter_class", Help)
            kwargs.setdefault("prog", f"mm-convert {converter} {command}")
            kwargs["allow_abbrev"] = False
            if (text := kwargs.get("description") or "").startswith("Help for "):
                kwargs["description"] = f"The fields of {text.split()[2].split('=')[0].removesuffix('.help')}."
            super().__init__(*args, **kwargs)

        def error(self, message: str, ex: Exception | None = None) -> NoReturn:  # type: ignore[override]
            if not self.exit_on_error:  # an internal attempt jsonargparse catches itself
                super().error(message, ex)
            fail(prog, with_hint(one_line(message), flags))

        def dump(self, cfg: Any, *args: Any, **kwargs: Any) -> str:
            """--print_config: the job file as `mm-convert --config` and `mmtui --replay` read it."""
            return f"converter: {converter}\ncommand: {command}\n" + super().dump(cfg, *args, **kwargs)

    def run(cfg: Any) -> None:
        """Only its signature is read: one `cfg` of the command's schema."""

    run.__annotations__ = {"cfg": COMMANDS[command], "return": None}
    parser = Parser(
        prog=f"mm-convert {converter} {command}",
        description=f"{COMMAND_HELP[command]}. Every field can also come from --config JOB; later options win.",
        env_prefix=f"MM_CONVERT_{converter}__{command}_",  # the names the seed tool's nested parsers gave
    )
    parser.add_argument("--config", action=jsonargparse.ActionConfigFile, metavar="JOB", help=CONFIG_HELP)
    parser.add_function_arguments(run, as_group=False, sub_configs=True)
    for action in parser._actions:
        if isinstance(action, jsonargparse._actions._ActionPrintConfig):
            action.help = PRINT_CONFIG_HELP
    flags += [*flags_of(parser), *schema_flags(COMMANDS[command])]
    parser.job_flags = flags
    return parser


def _known_flags_only(parser: Any, args: list[str], prog: str) -> None:
    """Refuse a misspelt `--cfg.a.b` here: jsonargparse would take a nested model's as a value."""
    known = {s for a in parser._actions for s in a.option_strings} | set(parser.job_flags)
    for i, a in enumerate(args):
        if a.startswith("--") and a.partition("=")[0] not in known:
            value = args[i + 1] if "=" not in a and i + 1 < len(args) and not args[i + 1].startswith("--") else ""
            given = f"{a} {value}".strip()
            fail(prog, with_hint(f"unrecognized arguments: {given}", parser.job_flags))


def _instantiated(parser: Any, rest: list[str], prog: str) -> Any:
    """The command's configuration; a value its schema refuses (`--cfg.part 3/2`, two llm dirs that
    disagree) is one line naming the field, as jsonargparse's own refusals are."""
    from pydantic import ValidationError

    try:
        return parser.instantiate(parser.parse_args(rest)).cfg
    except ValidationError as e:
        err = e.errors()[0]
        value = err.get("input")
        shown = "" if isinstance(value, dict) else f" = {value!r}"
        fail(prog, f"{'.'.join(['cfg', *map(str, err['loc'])])}{shown}: {err['msg'].removeprefix('Value error, ')}")


def main(argv: list[str] | None = None, *, prog: str = "mm-convert") -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    converter, command, rest = route(args, prog)
    from engine.job import Job

    from .runner import run_job_cli

    job = _one_whole_job(rest, converter, command, prog)
    if job is None:
        rest = _inline_configs(rest, converter, command, prog)
        parser = command_parser(converter, command, prog)
        _known_flags_only(parser, rest, prog)
        cfg = _instantiated(parser, rest, prog)
        job = Job(converter=converter, command=command, cfg=cfg)
    run_job_cli(job, prog=prog)


if __name__ == "__main__":
    main(sys.argv[1:])
