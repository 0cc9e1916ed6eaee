"""What the wizard's Source step shows about a model: sizes per module, files, dtypes, and
which TP sizes the model admits. Metadata only."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from ..layout import layout_problems, one_stage
from .hf_source import ModelInfo

TP_CANDIDATES = (1, 2, 4, 8, 16)


@dataclass(frozen=True)
class ModuleSummary:
    name: str
    title: str
    layers: int
    params: int
    nbytes: int


@dataclass(frozen=True)
class Summary:
    modules: list[ModuleSummary]
    fields: dict[str, object]  # the preset's config fields as read
    tensors: int
    dtypes: str  # "bfloat16 × 120, float32 × 2"
    files: list[str]
    tp_sizes: list[int]  # TP sizes every divisibility rule admits
    warnings: list[str]


def summarize(info: ModelInfo) -> Summary:
    preset = info.preset
    params: Counter[str] = Counter()
    nbytes: Counter[str] = Counter()
    for name, t in info.tensors.items():
        m = preset.module_of_source(name)
        key = m.name if m else "other"
        params[key] += t.numel
        nbytes[key] += t.nbytes
    modules = [
        ModuleSummary(m.name, m.title, info.field_int(m.layers), params[m.name], nbytes[m.name]) for m in preset.modules
    ]
    dtypes = ", ".join(f"{d} × {n}" for d, n in Counter(t.dtype for t in info.tensors.values()).most_common())
    fits, why = [], {}
    for tp in TP_CANDIDATES:
        problems = [p for p in layout_problems(one_stage(info, tp_size=tp), info) if "tp_size" in p]
        if problems:
            why[tp] = problems[0]
        else:
            fits.append(tp)
    warnings = list(info.warnings)
    for tp in (2, 4, 8):
        if tp in why:
            warnings.append(why[tp])
            break
    return Summary(modules, dict(info.fields), len(info.tensors), dtypes, [f.name for f in info.files], fits, warnings)
