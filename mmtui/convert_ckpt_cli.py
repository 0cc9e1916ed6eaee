"""`convert-ckpt`: MindSpeed-LLM's `convert_ckpt.py` / `convert_ckpt_v2.py` command lines, verbatim.

Both spellings are taken: v1's as its documentation gives them (`--model-type GPT
--use-mcore-models --tokenizer-model ...`) and v2's (`--hf-cfg-dir`, `--mtp-num-layers`,
...). The flags build the same job `mm-convert` runs (`--print-job` shows it as a job
file for `mm-convert --config`), written in MindSpeed-LLM's own layout: `iter_0000001/`,
the tracker holding `1`, and Megatron's `args` and `iteration` in every rank file, and with MindSpeed-LLM's
key names (`naming = "mindspeed_llm"`: DeepSeek's MLA and MTP differ from Megatron-Core's). As MindSpeed-LLM,
the multi-token-prediction layers are converted only with `--mtp-num-layers` (all of them, or 0).

Megatron -> HF follows v1 when `--save-dir` holds a config.json (the original HF
directory: the model goes to `<save-dir>/mg2hf/`), v2 otherwise (`--save-dir` itself,
config.json from `--hf-cfg-dir`). The Megatron side's layout is read from the disk.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, NoReturn

from .cli_args import closest, flags_of

PROG = "convert-ckpt"

# --model-type-hf -> our converter: every family we have, under MindSpeed-LLM's names (v1 and v2) and the obvious ones
FAMILIES = {
    "llama2": "LlamaConverter",
    "llama3": "LlamaConverter",
    "llama": "LlamaConverter",
    "mistral": "MistralConverter",
    "magistral": "MistralConverter",
    "mixtral": "MixtralConverter",
    "qwen25": "Qwen2Converter",
    "qwen2": "Qwen2Converter",
    "qwen3": "Qwen3Converter",
    "qwen3-moe": "Qwen3MoeConverter",
    "qwen2-moe": "Qwen2MoeConverter",
    "deepseek2": "DeepseekV2Converter",
    "deepseek2-lite": "DeepseekV2Converter",
    "deepseek3": "DeepseekV3Converter",
    "internlm2": "InternLM2Converter",
}

# flags that mean nothing here: the model's structure comes from config.json, and nothing is queued or loaded whole
IGNORED_VALUE = [
    "--loader", "--saver", "--tokenizer-model", "--vocab-file", "--max-queue-size", "--ckpt-cfg-path",
    "--megatron-path", "--true-vocab-size", "--num-layers", "--first-k-dense-replace", "--hidden-size",
    "--input-tp-rank", "--input-pp-rank", "--mamba-state-dim", "--mamba-num-groups", "--mamba-head-dim",
]  # fmt: skip
IGNORED_SWITCH = [
    "--use-mcore-models", "--no-checking", "--load-checkpoint-loosely", "--save-layer-by-layer", "--add-qkv-bias",
    "--add-dense-bias", "--add-output-layer-bias", "--embed-layernorm", "--post-norm", "--w-pack", "--load-from-legacy",
    "--save-to-legacy", "--load-hf-from-config",
]  # fmt: skip
# flags with a meaning we do not convert yet: refused in one line rather than ignored
UNSUPPORTED_SWITCH = {
    "--moe-tp-extend-ep": "experts spread over the TP group",
    "--mla-mm-split": "MindSpeed-LLM's split MLA up-projections",
}
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        if message.startswith("unrecognized arguments: "):
            flag = message.removeprefix("unrecognized arguments: ").split()[0]
            near = closest(flag.split("=")[0], flags_of(self))  # the one rule every mmtui command line uses
            hint = f"; did you mean {near}?" if near else ""
            message = f"{flag} is not a flag of MindSpeed-LLM's convert_ckpt that mmtui takes{hint}"
        fail(message)


def fail(message: str) -> NoReturn:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    sys.exit(2)


def parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG,
        allow_abbrev=False,
        description="MindSpeed-LLM's convert_ckpt.py / convert_ckpt_v2.py flags, run by mmtui's streaming engine.",
    )
    p.add_argument("--model-type", default="GPT", help="v1: GPT (BERT is not converted)")
    p.add_argument("--load-model-type", choices=["hf", "mg"], help="what --load-dir holds")
    p.add_argument("--save-model-type", choices=["hf", "mg"], help="what to write to --save-dir")
    p.add_argument("--load-dir", type=Path, required=True, help="the checkpoint to read")
    p.add_argument("--save-dir", type=Path, required=True, help="where to write (v1 Megatron -> HF: the HF dir)")
    p.add_argument("--model-type-hf", default=None, help=f"the family: {', '.join(FAMILIES)}")
    p.add_argument("--hf-cfg-dir", type=Path, help="v2: the HF directory whose config.json describes the model")
    p.add_argument("--target-tensor-parallel-size", type=int, default=1)
    p.add_argument("--target-pipeline-parallel-size", type=int, default=1)
    p.add_argument("--target-expert-parallel-size", type=int, default=1)
    p.add_argument("--expert-tensor-parallel-size", type=int, default=None, help="1 or the TP size")
    p.add_argument("--num-layer-list", help="layers per pipeline stage, e.g. 8,8,8,8")
    p.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, help="layers per VPP chunk and stage")
    p.add_argument("--noop-layers", help="empty layer positions, e.g. 0,31")
    p.add_argument("--make-vocab-size-divisible-by", type=int, default=None)
    p.add_argument("--params-dtype", choices=list(DTYPES), help="weights' dtype (default: as the source)")
    p.add_argument("--transformer-impl", choices=["local", "transformer_engine"], default="local")
    p.add_argument("--moe-grouped-gemm", action="store_true", help="experts as GroupedMLP's weight1/2 (TE: weightN)")
    p.add_argument("--mtp-num-layers", type=int, default=0, help="MTP layers to convert: 0 (leave out) or all")
    p.add_argument("--schedules-method", default=None)
    p.add_argument("--ckpt-format", default="torch")
    p.add_argument("--spec", nargs="*", default=None)
    p.add_argument("--lora-load", type=Path, help="a Megatron LoRA checkpoint to merge (with --save-lora-to-hf: save)")
    p.add_argument("--lora-r", type=int)
    p.add_argument("--lora-alpha", type=float)
    p.add_argument("--lora-target-modules", nargs="+", default=[])
    p.add_argument("--save-lora-to-hf", action="store_true", help="write the LoRA adapter alone, as PEFT")
    p.add_argument("--overwrite", action="store_true", help="mmtui: replace a non-empty --save-dir")
    p.add_argument("--print-job", action="store_true", help="mmtui: print the equivalent mm-convert job and exit")
    p.add_argument(
        "--part",
        metavar="i/N",
        type=_part,
        help="mmtui: write part i of N (0-based) of a job split over processes or nodes; "
        "default: from Slurm's or torchrun's environment; none: the whole job here",
    )
    for flag in IGNORED_VALUE:
        p.add_argument(flag, help=argparse.SUPPRESS)
    for flag in [*IGNORED_SWITCH, *UNSUPPORTED_SWITCH]:
        p.add_argument(flag, action="store_true", help=argparse.SUPPRESS)
    return p


def _part(text: str) -> str:
    from engine.run.parts import parse_part

    try:
        parse_part(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: {e}") from None
    return text


def _ints(flag: str, text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        fail(f"{flag} {text!r}: expected whole numbers separated by commas, e.g. 8,8,8,8")


def _converter(args: argparse.Namespace, hf_dir: Path) -> str:
    from engine.source.hf_source import detect_preset, read_config

    if args.model_type_hf is not None:
        if args.model_type_hf not in FAMILIES:
            fail(f"--model-type-hf {args.model_type_hf!r}: not a family mmtui converts; one of {', '.join(FAMILIES)}")
        return FAMILIES[args.model_type_hf]
    return detect_preset(read_config(hf_dir), hf_dir / "config.json").converter


def _layout(args: argparse.Namespace, layers: int) -> dict[str, Any]:
    tp, pp = args.target_tensor_parallel_size, args.target_pipeline_parallel_size
    noops = _ints("--noop-layers", args.noop_layers) if args.noop_layers else []
    total = layers + len(noops)
    if args.num_layer_list:
        if args.num_layers_per_virtual_pipeline_stage:
            fail("--num-layer-list and --num-layers-per-virtual-pipeline-stage: give one (MindSpeed-LLM takes one)")
        stages = _ints("--num-layer-list", args.num_layer_list)
        if len(stages) != pp:
            fail(f"--num-layer-list {args.num_layer_list}: {len(stages)} stages, --target-pipeline-parallel-size {pp}")
        chunks = [stages]
    elif args.num_layers_per_virtual_pipeline_stage:
        per = args.num_layers_per_virtual_pipeline_stage
        if per < 1 or total % (per * pp):
            fail(f"--num-layers-per-virtual-pipeline-stage {per}: {total} layers are not chunks of {per} x {pp} stages")
        chunks = [[per] * pp for _ in range(total // (per * pp))]
    else:
        if total % pp:
            fail(f"--target-pipeline-parallel-size {pp}: {total} layers do not divide; give --num-layer-list")
        chunks = [[total // pp] * pp]
    out: dict[str, Any] = {"tp_size": tp, "ep_size": args.target_expert_parallel_size, "llm_pp_layers": chunks}
    if args.expert_tensor_parallel_size is not None and args.expert_tensor_parallel_size != tp:
        out["expert_tp_size"] = args.expert_tensor_parallel_size
    if args.moe_grouped_gemm:  # MindSpeed-LLM: TEGroupedMLP's names with Transformer Engine, else GroupedMLP's
        out["moe_grouped_gemm"] = "te" if args.transformer_impl == "transformer_engine" else "legacy"
    if noops:
        out["noop_layers"] = noops
    if args.make_vocab_size_divisible_by and args.make_vocab_size_divisible_by > 1:
        out["make_vocab_size_divisible_by"] = args.make_vocab_size_divisible_by
    return out


def _check_supported(args: argparse.Namespace) -> None:
    if args.model_type != "GPT":
        fail(f"--model-type {args.model_type}: only GPT models are converted")
    for flag, what in UNSUPPORTED_SWITCH.items():
        if getattr(args, flag.removeprefix("--").replace("-", "_")):
            fail(f"{flag}: {what} are not converted yet")
    etp = args.expert_tensor_parallel_size
    if etp is not None and etp not in (1, args.target_tensor_parallel_size):
        fail(
            f"--expert-tensor-parallel-size {etp}: MindSpeed-LLM takes 1 or the TP size "
            f"(--target-tensor-parallel-size {args.target_tensor_parallel_size})"
        )
    if args.schedules_method:
        fail(f"--schedules-method {args.schedules_method}: not converted yet")
    if args.ckpt_format not in ("torch", "torch_dist"):
        fail(f"--ckpt-format {args.ckpt_format}: torch (legacy rank files) or torch_dist (Megatron-Core's) are written")


def _check_moe(args: argparse.Namespace, preset: Any) -> None:
    """The experts' flags on a model without experts: one line, not a layout error about fields it never named."""
    if any(m.experts for m in preset.modules):
        return
    etp = args.expert_tensor_parallel_size
    given = {
        "--moe-grouped-gemm": args.moe_grouped_gemm,
        "--expert-tensor-parallel-size": etp not in (None, args.target_tensor_parallel_size),
    }
    for flag, said in given.items():
        if said:
            fail(f"{flag}: {preset.title} has no experts; leave it out")


def _layers(preset: Any, hf_dir: Path) -> int:
    from engine.source.hf_source import read_config, resolve_fields

    llm = next(m for m in preset.modules if m.name == "llm")
    return int(resolve_fields(preset, read_config(hf_dir), hf_dir / "config.json")[llm.layers])


def _mtp(args: argparse.Namespace, converter: str, hf_dir: Path) -> bool | None:
    """--mtp-num-layers: 0 (MindSpeed-LLM's default) leaves the MTP layers out, else it is config.json's count;
    None for a family without MTP layers."""
    from engine.planning.mtp import mtp_count
    from engine.preset import preset_for_converter
    from engine.source.hf_source import read_config

    n, preset = args.mtp_num_layers, preset_for_converter(converter)
    if preset.mtp is None:
        if n:
            fail(f"--mtp-num-layers {n}: {preset.title} has no multi-token-prediction layers; leave it out")
        return None
    have = mtp_count(preset, read_config(hf_dir), hf_dir / "config.json")
    if n and n != have:
        fail(
            f"--mtp-num-layers {n}: {hf_dir}/config.json's {preset.mtp.field[0]} is {have}; give {have}, "
            "or 0 to leave them out"
        )
    return n > 0


def _check_dtype(args: argparse.Namespace, hf_dir: Path, cfg_command: str, cfg: dict[str, Any]) -> None:
    """HF -> Megatron casts to --params-dtype; the way back and re-cuts do not cast yet: the weights' own dtype
    is fine, another is refused."""
    from engine.source.hf_source import read_config

    if args.params_dtype is None:
        return
    config = read_config(hf_dir)
    if cfg_command == "hf_to_mm":  # every float weight cast while streaming (FP8 ones dequantised to it)
        cfg["params_dtype"] = args.params_dtype
        return
    own = config.get("torch_dtype") or config.get("dtype") or config.get("text_config", {}).get("torch_dtype")
    if DTYPES[args.params_dtype] != own:
        fail(
            f"--params-dtype {args.params_dtype}: casting the weights (config.json says {own}) is not done yet; "
            "leave it out to keep their dtype"
        )


def _written(args: argparse.Namespace, hf_dir: Path) -> tuple[str, dict[str, Any]]:
    """The converter and the layout to write (hf -> mg and mg -> mg), with the MoE flags checked against it."""
    from engine.preset import preset_for_converter

    converter = _converter(args, hf_dir)
    preset = preset_for_converter(converter)
    _check_moe(args, preset)
    return converter, _layout(args, _layers(preset, hf_dir))


def _hf_to_mg(args: argparse.Namespace) -> tuple[str, str, dict[str, Any]]:
    converter, layout = _written(args, args.load_dir)
    cfg: dict[str, Any] = {
        "mm_dir": str(args.save_dir), "hf_config": {"hf_dir": str(args.load_dir)}, "parallel_config": layout,
        "iteration": 1, "save_megatron_args": True, "transformer_impl": args.transformer_impl,
    }  # fmt: skip
    if args.lora_load:
        cfg["lora"] = {"adapter_dir": str(args.lora_load)}
    return converter, "hf_to_mm", cfg


def _mg_to_hf(args: argparse.Namespace) -> tuple[str, str, dict[str, Any]]:
    if (args.save_dir / "config.json").is_file():  # v1: --save-dir is the original HF directory
        hf_dir, out = args.save_dir, args.save_dir / "mg2hf"
    elif args.hf_cfg_dir is not None:  # v2
        hf_dir, out = args.hf_cfg_dir, args.save_dir
    else:
        fail(
            f"--save-dir {args.save_dir}: holds no config.json; give the model's HF directory as --save-dir "
            "(v1: written to <save-dir>/mg2hf) or as --hf-cfg-dir (v2)"
        )
    converter = _converter(args, hf_dir)
    cfg: dict[str, Any] = {"save_hf_dir": str(out), "hf_config": {"hf_dir": str(hf_dir)}}
    command = "lora_mm_to_hf" if args.lora_load and args.save_lora_to_hf else "mm_to_hf"
    if command == "mm_to_hf":
        cfg["mm_dir"] = str(args.load_dir)
    if args.lora_load:
        lora: dict[str, Any] = {"adapter_dir": str(args.lora_load)}
        lora |= {"r": args.lora_r} if args.lora_r else {}
        lora |= {"alpha": args.lora_alpha} if args.lora_alpha is not None else {}
        lora |= {"target_modules": list(args.lora_target_modules)} if args.lora_target_modules else {}
        cfg["lora"] = lora
    return converter, command, cfg


def _mg_to_mg(args: argparse.Namespace) -> tuple[str, str, dict[str, Any]]:
    if args.hf_cfg_dir is None:
        fail("--load-model-type mg --save-model-type mg: give --hf-cfg-dir (the model's HF directory: config.json)")
    converter, layout = _written(args, args.hf_cfg_dir)
    cfg: dict[str, Any] = {
        "source_dir": str(args.load_dir), "target_dir": str(args.save_dir),
        "hf_config": {"hf_dir": str(args.hf_cfg_dir)}, "target_parallel_config": layout, "iteration": 1,
        "save_megatron_args": True, "transformer_impl": args.transformer_impl,
    }  # fmt: skip
    return converter, "resplit", cfg


def build_job(args: argparse.Namespace) -> dict[str, Any]:
    """The job as mm-convert's data: {converter, command, cfg}."""
    _check_supported(args)
    load = args.load_model_type or ("mg" if (args.load_dir / "latest_checkpointed_iteration.txt").is_file() else "hf")
    save = args.save_model_type or ("hf" if load == "mg" else "mg")
    direction = {("hf", "mg"): _hf_to_mg, ("mg", "hf"): _mg_to_hf, ("mg", "mg"): _mg_to_mg}.get((load, save))
    if direction is None:
        fail("--load-model-type hf --save-model-type hf: nothing to convert (one side must be mg)")
    converter, command, cfg = direction(args)
    hf_dir = Path(cfg["hf_config"]["hf_dir"])
    _check_dtype(args, hf_dir, command, cfg)
    mtp = _mtp(args, converter, hf_dir)
    if command in ("hf_to_mm", "mm_to_hf", "resplit"):
        cfg["naming"] = "mindspeed_llm"  # MindSpeed-LLM's names (only DeepSeek's differ from Megatron-Core's)
        if mtp is not None:
            cfg["mtp"] = mtp
    if args.ckpt_format == "torch_dist" and command in ("hf_to_mm", "resplit"):  # reading, the disk says which
        cfg["format"] = "torch_dist"
    if args.overwrite:
        cfg["overwrite"] = True
    if args.part is not None:
        cfg["part"] = args.part
    return {"converter": converter, "command": command, "cfg": cfg}


def main(argv: list[str] | None = None) -> None:
    from pydantic import ValidationError

    from engine.job import Job, first_error, job_to_dict

    from .runner import guarded, run_job_cli

    args = parser().parse_args(sys.argv[1:] if argv is None else argv)
    with guarded(PROG):
        data = build_job(args)
        try:
            job = Job.model_validate(data)
        except ValidationError as e:  # a flag value the job schema refuses
            raise first_error(e, PROG) from None
    if args.print_job:
        import yaml

        print(yaml.safe_dump(job_to_dict(job), sort_keys=False), end="")
        return
    run_job_cli(job, prog=PROG)


if __name__ == "__main__":
    main()
