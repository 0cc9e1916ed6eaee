"""What the wizard typed -> a `Job` -> the engine's plan, with every problem the user can fix.

Glue only: building the job and naming the fields a message is about, so the screen can
mark them. Validation, costs and the plan itself come from the engine.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from engine.job import Job
    from engine.planning.plan import Plan
    from engine.source.hf_source import ModelInfo


@dataclass(frozen=True)
class Form:
    """What the user typed, read on the UI thread and handed to a planning worker."""

    direction: str
    hf_dir: str
    src: str
    src_tp: str
    src_ep: str
    src_llm: str
    src_vit: str
    out: str
    lora: str
    lora_r: str
    lora_alpha: str
    overwrite: bool
    tp: str
    ep: str
    layers: dict[str, list[list[int]]] | None
    cost: str
    disk: dict[str, Any] = field(default_factory=dict)  # noop layers, vocab padding, experts' layout read from disk
    vit_tokens: str = "1024"  # what one sample holds, for the flops cost model
    llm_tokens: str = "4096"
    dp: str = ""  # data-parallel size (empty: EP, the smallest there is) and device memory (GiB) for "will it fit?"
    device_gib: str = ""  # noop layers / vocab padding of the layout read from disk
    src_audio: str = ""  # the source layout's audio-encoder lists (a model with an audio encoder)
    out_format: str = "legacy"  # what hf_to_mm / resplit write: legacy rank files or torch_dist
    grouped_gemm: str = "off"  # the experts' layout they write: off (SequentialMLP), legacy or te (a MoE model)
    hf_dtype: bool = False  # dcp_to_hf: write hf_dir's dtypes (FSDP2's float32 master weights of a bf16 model)


@dataclass
class Planned:
    problems: list[str]
    bad_fields: set[str]  # ids of the inputs (or module names of the grid) a problem is about
    plan: Plan | None
    job: Job | None
    cells: list[list[int]] | None  # cost of every (chunk, stage) cell of the grid
    notes: list[str] = field(default_factory=list)  # worth knowing, not in the way
    memory: list[str] = field(default_factory=list)  # "will it fit?": training memory per rank of the layout


# words of an engine message -> the input it is about
_FIELD_WORDS = {
    "tp_size": "tp",
    "vit_tp_size": "tp",
    "audio_tp_size": "tp",
    "audio_pp_layers": "audio",
    "ep_size": "ep",
    "moe_grouped_gemm": "grouped_gemm",
    "llm_pp_layers": "llm",
    "vit_pp_layers": "vit",
    "pipeline stage": "pp",
    "mm_dir": "out",
    "save_hf_dir": "out",
    "target_dir": "out",
    "dcp_dir": "out",
    "source_dir": "src",
    "lora.r": "lora_r",
    "lora.alpha": "lora_alpha",
    "lora.adapter_dir": "lora",
    "adapter_config.json": "lora",
    "adapter_model.safetensors": "lora",
}


# the directions that read no layout: nothing of the grid is checked or costed against training memory
NO_LAYOUT = ("merge_lora", "hf_to_dcp", "dcp_to_hf")


def _fields_of(message: str, source_side: bool, reads_dcp: bool = False) -> set[str]:
    if message.startswith("format = "):  # the output format cannot hold this model or layout
        return {"format"}
    if reads_dcp:  # dcp_to_hf: the DCP dir is what is read (the src field), not what is written
        out = {f for w, f in _FIELD_WORDS.items() if w in message and w != "dcp_dir"}
        return out | ({"src"} if "dcp_dir" in message or ".metadata" in message else set())
    out = {f for w, f in _FIELD_WORDS.items() if w in message}
    if source_side:  # a message about the source checkpoint's layout names the source inputs
        source = {"tp": "src_tp", "ep": "src_ep", "llm": "src_llm", "vit": "src_vit", "audio": "src_audio"}
        source["grouped_gemm"] = "src"  # the source's experts' layout is the disk's
        out = {source.get(f, f) for f in out} | {"src"}
    return out


def _layout(tp: str, ep: str, layers: dict[str, list[list[int]]], extra: dict[str, Any] | None = None) -> Any:
    from engine.layout import ParallelConfig

    per_module = {f"{m}_pp_layers": v for m, v in layers.items()}
    return ParallelConfig(tp_size=int(tp), ep_size=int(ep), **per_module, **(extra or {}))


def plan_form(info: ModelInfo, form: Form) -> Planned:
    from pydantic import ValidationError

    from engine.errors import ConvertError
    from engine.job import Job, prepare
    from engine.layout import layout_problems
    from engine.planning.balance import cell_costs
    from engine.run.target import check_inputs, space_warning

    if form.layers is None:
        return Planned(["every stage cell needs a layer count (0 or more)"], set(), None, None, None)
    whole = {"tp": ("TP", form.tp), "ep": ("EP", form.ep)}
    whole |= {"vit_tokens": ("ViT tokens", form.vit_tokens), "llm_tokens": ("LLM tokens", form.llm_tokens)}
    for name, (label, value) in whole.items():
        if not value.isdigit() or int(value) < 1:
            return Planned([f"{label} {value!r}: give a positive whole number"], {name}, None, None, None)
    tokens = {"vit_tokens": int(form.vit_tokens), "llm_tokens": int(form.llm_tokens)}
    cells = cell_costs(info, form.layers, form.cost, **tokens)  # type: ignore[arg-type]
    reads_grid = form.direction in ("mm_to_hf", "lora_mm_to_hf")  # the grid is the layout on disk
    writes = {"moe_grouped_gemm": form.grouped_gemm} if form.grouped_gemm != "off" else None
    layout = _layout(form.tp, form.ep, form.layers, form.disk if reads_grid else writes)
    problems = layout_problems(layout, info) if form.direction not in NO_LAYOUT else []
    if problems:
        bad = set().union(*(_fields_of(p, False) for p in problems))
        return Planned(problems, bad, None, None, cells)
    if not form.out:
        return Planned(["Output dir is empty: give a directory to write"], {"out"}, None, None, cells)
    if form.direction in ("merge_lora", "lora_hf_to_mm") and not form.lora:
        return Planned(["LoRA adapter is empty: give a PEFT adapter directory"], {"lora"}, None, None, cells)
    hf = {"hf_dir": form.hf_dir or str(info.hf_dir)}
    lay = layout.model_dump(exclude_defaults=True)
    lora = {"adapter_dir": form.lora} if form.lora else None
    if form.direction == "hf_to_mm":
        cfg: dict[str, Any] = {"mm_dir": form.out, "hf_config": hf, "parallel_config": lay}
    elif form.direction == "mm_to_hf":
        cfg = {"save_hf_dir": form.out, "mm_dir": form.src, "hf_config": hf, "parallel_config": lay}
    elif form.direction == "merge_lora":
        cfg = {"save_hf_dir": form.out, "hf_config": hf}
    elif form.direction == "hf_to_dcp":
        cfg = {"dcp_dir": form.out, "hf_config": hf}
    elif form.direction == "dcp_to_hf":
        if not form.src:
            return Planned(["DCP dir is empty: give the checkpoint to read"], {"src"}, None, None, cells)
        cfg = {"save_hf_dir": form.out, "dcp_dir": form.src, "hf_config": hf}
        cfg |= {"hf_dtype": True} if form.hf_dtype else {}
    elif form.direction == "lora_hf_to_mm":
        cfg = {"mm_dir": form.out, "hf_config": hf, "parallel_config": lay}
    elif form.direction == "lora_mm_to_hf":
        cfg = {"save_hf_dir": form.out, "hf_config": hf}
        lora = {"adapter_dir": form.src, "parallel_config": lay}
        try:  # a MindSpeed-trained adapter: the --lora-r / --lora-alpha it was trained with
            lora |= {"r": int(form.lora_r)} if form.lora_r else {}
            lora |= {"alpha": float(form.lora_alpha)} if form.lora_alpha else {}
        except ValueError:
            return Planned(["LoRA alpha is a number, e.g. 16"], {"lora_alpha"}, None, None, cells)
    else:
        try:
            src_layers = {
                m: json.loads(text or "null")
                for m, text in (("llm", form.src_llm), ("vit", form.src_vit), ("audio", form.src_audio))
            }
            given = {k: v for k, v in src_layers.items() if v is not None}
            src = _layout(form.src_tp, form.src_ep, given, form.disk)
        except (ValueError, ValidationError, TypeError):
            return Planned(
                ["Source TP and EP are positive numbers; Source LLM / ViT look like [[1,3]] (one list per VPP chunk)"],
                {"src_tp", "src_ep", "src_llm", "src_vit", "src_audio"},
                None,
                None,
                cells,
            )
        cfg = {
            "source_dir": form.src,
            "target_dir": form.out,
            "hf_config": hf,
            "source_parallel_config": src.model_dump(exclude_defaults=True),
            "target_parallel_config": lay,
        }
    if lora is not None:
        cfg["lora"] = lora
    if form.direction in ("hf_to_mm", "resplit") and form.out_format != "legacy":
        cfg["format"] = form.out_format
    if form.direction in ("mm_to_hf", "resplit", "lora_mm_to_hf") and not form.src:
        return Planned(["Megatron dir is empty: give the checkpoint to read"], {"src"}, None, None, cells)
    if form.overwrite:
        cfg["overwrite"] = True
    try:
        job = Job.model_validate({"converter": info.preset.converter, "command": form.direction, "cfg": cfg})
        _, plan = prepare(job, check_out=False)
    except ValidationError as e:
        return Planned([str(e).splitlines()[0]], set(), None, None, cells)
    except ConvertError as e:
        source_side = form.direction in ("mm_to_hf", "resplit", "lora_mm_to_hf")
        fields = _fields_of(str(e), source_side, form.direction == "dcp_to_hf")
        return Planned([str(e)], fields, None, None, cells)
    notes = list(plan.notes)
    bad = set()
    out = Path(form.out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not form.overwrite:
        notes.append(f"{out} exists and is not empty: tick overwrite, or Run will refuse it")
        bad.add("out")
    try:
        check_inputs(out, job.inputs, job.out_field, job.overwrite)
    except ConvertError as e:
        notes.append(f"{e}: Run will refuse it")
        bad.add("out")
    full = space_warning(plan.nbytes, out)
    if full:
        notes.append(f"will not fit: {full}; Run will refuse it")
        bad.add("out")
    if form.direction in NO_LAYOUT:
        return Planned([], bad, plan, job, cells, notes)
    try:
        rank_files = form.direction == "hf_to_mm" and form.out_format == "legacy"  # a torch_dist plan keeps one replica
        memory = will_it_fit(plan if rank_files else info, layout, form.dp, form.device_gib)
    except ConvertError as e:
        field_name = "dp" if str(e).startswith("dp") else "device_gib"
        return Planned([str(e)], bad | {field_name}, None, None, cells, notes)  # every problem stops Run
    return Planned([], bad, plan, job, cells, notes, memory)


def will_it_fit(plan_or_info: Plan | ModelInfo, layout: Any, dp: str, device_gib: str) -> list[str]:
    """Training memory per rank of `layout` (weights, grads, Adam; no activations), with the plain and the
    distributed optimizer over `dp`: a verdict per optimizer against `device_gib`, then each pipeline
    stage's largest rank. Given the model, its rank-file plan is built once for both optimizers (a 671B
    plan takes seconds); given that plan (hf_to_mm's own), none is built."""
    from engine.errors import ConvertError
    from engine.planning.train_memory import fits, human_bytes, train_memories

    dp = dp or str(layout.ep_size)  # unset: the smallest data-parallel size the layout allows
    if not dp.isdigit() or int(dp) < 1:
        raise ConvertError(f"dp {dp!r}: give the data-parallel size as a whole number >= 1")
    try:
        device = float(device_gib) if device_gib else None
    except ValueError:
        device = -1.0
    if device is not None and not 0 < device < float("inf"):
        raise ConvertError(f"device memory {device_gib!r}: give one device's memory in GiB, a number > 0 (e.g. 64)")
    plain, dist = train_memories(plan_or_info, layout, int(dp))  # one count of the plan for both
    lines = []
    for what, ranks in (("plain optimizer", plain), (f"distributed optimizer over dp {dp}", dist)):
        top = max(r.total for r in ranks)
        verdict = fits(ranks, device)[1] if device is not None else f"{human_bytes(top)} / rank at most"
        lines.append(f"{what}: {verdict}")
    stages: dict[int, tuple[int, int]] = {}
    for p, d in zip(plain, dist, strict=True):
        a, b = stages.get(p.pp_rank, (0, 0))
        stages[p.pp_rank] = (max(a, p.total), max(b, d.total))
    per = " · ".join(f"{s}: {human_bytes(a)} / {human_bytes(b)}" for s, (a, b) in sorted(stages.items()))
    lines.append(f"per stage, largest TP rank (plain / distributed): {per}")
    return lines
