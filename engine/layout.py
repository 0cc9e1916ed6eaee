"""The target layout: TP size and per-module, per-stage layer counts for each VPP chunk.

The pydantic model checks what it can alone (shapes of the lists); `validate_layout`
checks it against a model's config.json (sums, divisibility, empty stages). Messages
name the field, the value, and what would be accepted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, NonNegativeInt, PositiveInt, field_validator

from .errors import ConvertError
from .source.hf_source import ModelInfo

Chunks = list[list[NonNegativeInt]]
# A flat list is one VPP chunk; the union lets command-line parsers accept both spellings.
ChunksOrFlat = list[list[NonNegativeInt]] | list[NonNegativeInt]


class ParallelConfig(BaseModel):
    """A checkpoint's layout: TP / EP size and layers per pipeline stage, per module and VPP chunk."""

    model_config = ConfigDict(extra="forbid")

    llm_pp_layers: ChunksOrFlat
    """Language-model layers per pipeline stage, one list per virtual-pipeline chunk: [[1,10,10,7]]."""
    vit_pp_layers: ChunksOrFlat | None = None
    """Vision-encoder layers per pipeline stage, one list per virtual-pipeline chunk: [[32,0,0,0]]
    (vision-language models only)."""
    audio_pp_layers: ChunksOrFlat | None = None
    """Audio-encoder layers per pipeline stage, one list per virtual-pipeline chunk: [[32,0,0,0]]
    (models with an audio encoder only, such as Qwen2.5-Omni)."""
    tp_size: PositiveInt = 1
    """Tensor-parallel size of the language model; one rank directory per TP rank of the largest TP size."""
    vit_tp_size: NonNegativeInt | None = None
    """Vision-encoder TP size; 0 or unset means tp_size. When it differs, the encoder is split at its own size
    and its shards repeat over the larger TP group (rank r holds shard r mod vit_tp_size), as MindSpeed-MM's
    split_by_tp does; every TP size must divide the largest."""
    audio_tp_size: NonNegativeInt | None = None
    """Audio-encoder TP size; 0 or unset means tp_size (split and repeated as vit_tp_size)."""
    ep_size: PositiveInt = 1
    """Expert-parallel size (MoE models only)."""
    expert_tp_size: PositiveInt | None = None
    """Tensor-parallel size of the routed experts (Megatron's --expert-tensor-parallel-size): 1 (every TP rank
    holds whole experts) or tp_size; unset means tp_size (MoE models only)."""
    moe_grouped_gemm: Literal[False, True, "legacy", "te"] = False
    """Routed experts in a grouped-GEMM layout (MindSpeed-LLM's --moe-grouped-gemm; MoE models only):
    legacy (or true) is Megatron-Core's GroupedMLP, each layer's local experts as two tensors
    mlp.experts.weight1 [hidden, experts x fc1 rows] and weight2 [experts x fc2 columns, hidden], each expert's
    block transposed; te is TEGroupedMLP's mlp.experts.linear_fc1.weightN / linear_fc2.weightN, one per local
    expert; false keeps SequentialMLP's mlp.experts.local_experts.N.linear_fc1/2."""
    noop_layers: list[NonNegativeInt] | None = None
    """Positions (0-based, counting every layer of llm_pp_layers) of empty language-model layers
    (MindSpeed-LLM's --noop-layers): counted in llm_pp_layers, holding no weights; the layers around
    them keep their positions, so a stage's local layer numbers skip them."""
    make_vocab_size_divisible_by: PositiveInt | None = None
    """Pad the vocabulary rows of the embedding and output layer with zeros to a multiple of this x tp_size
    (Megatron-LM's rule); unset means no padding (the vocabulary must then divide by tp_size)."""

    @property
    def grouped(self) -> Literal["legacy", "te"] | None:
        """The grouped-GEMM layout of the routed experts, or None for SequentialMLP's."""
        if self.moe_grouped_gemm is True:
            return "legacy"
        return self.moe_grouped_gemm or None

    @property
    def etp(self) -> int:
        """The routed experts' TP size."""
        return self.expert_tp_size or self.tp_size

    def padded_vocab(self, vocab: int) -> int:
        """Rows of the full embedding in this layout (Megatron-LM: a multiple of divisible_by x TP)."""
        if self.make_vocab_size_divisible_by is None:
            return vocab
        step = self.make_vocab_size_divisible_by * self.tp_size
        return -(-vocab // step) * step

    @field_validator("llm_pp_layers", "vit_pp_layers", "audio_pp_layers", mode="before")
    @classmethod
    def _flat_is_one_chunk(cls, v: object) -> object:
        if isinstance(v, list | tuple) and v and all(isinstance(x, int) for x in v):
            return [list(v)]
        return v

    def given(self) -> dict[str, Chunks]:
        """Module name -> its per-stage lists, for every module whose list is set."""
        out = {"llm": self.llm_pp_layers}
        if self.vit_pp_layers is not None:
            out["vit"] = self.vit_pp_layers
        if self.audio_pp_layers is not None:
            out["audio"] = self.audio_pp_layers
        return out  # type: ignore[return-value]  # chunked by the validator

    def shape_problems(self) -> list[str]:
        """Problems of the lists alone (no model needed)."""
        given = self.given()
        out = [
            f"parallel_config.{m}_pp_layers is empty; give layer counts per stage, e.g. [[1,10,10,7]]"
            for m, chunks in given.items()
            if not chunks or not chunks[0]
        ]
        if out:
            return out
        pp, vpp = self.pp_size, self.vpp_size
        for m, chunks in given.items():
            if len(chunks) != vpp:
                out.append(
                    f"parallel_config.{m}_pp_layers has {len(chunks)} VPP chunk(s) but llm_pp_layers has "
                    f"{vpp}; give one list per chunk for both"
                )
        for m, chunks in given.items():
            for i, chunk in enumerate(chunks):
                if len(chunk) != pp:
                    out.append(
                        f"parallel_config.{m}_pp_layers[{i}] = {chunk} has {len(chunk)} stage(s); every chunk needs "
                        f"{pp} (the length of llm_pp_layers[0])"
                    )
        return out

    def tp_of(self, module: str) -> int:
        """The TP size a module is split at (MindSpeed-MM: vit_tp_size / audio_tp_size, 0 or unset = tp_size)."""
        own = {"vit": self.vit_tp_size, "audio": self.audio_tp_size}.get(module)
        return own or self.tp_size

    @property
    def tp_world(self) -> int:
        """TP ranks written: the largest module TP size (smaller ones repeat their shards over it)."""
        return max(self.tp_size, self.vit_tp_size or 0, self.audio_tp_size or 0)

    @property
    def pp_size(self) -> int:
        return len(self.llm_pp_layers[0])

    @property
    def vpp_size(self) -> int:
        return len(self.llm_pp_layers)

    def layers_of(self, module: str) -> Chunks:
        return self.given()[module]

    def noops_of(self, module: str) -> tuple[int, ...]:
        return tuple(sorted(set(self.noop_layers or ()))) if module == "llm" else ()


@dataclass(frozen=True)
class Placement:
    """Where one module's layers land: global layer index -> (chunk, stage, local index)."""

    module: str
    counts: Chunks
    first_cell: tuple[int, int] | None  # (chunk, stage) holding the first layer
    last_cell: tuple[int, int] | None
    noops: tuple[int, ...] = ()  # pipeline positions that are empty layers (sorted)

    def locate(self, layer: int) -> tuple[int, int, int]:
        """Cells are ordered chunk-major: chunk 0 stages 0..P-1, then chunk 1, ...

        `layer` counts real layers (the HF numbering); empty positions are stepped over.
        """
        for n in self.noops:
            if n <= layer:
                layer += 1
        start = 0
        for c, chunk in enumerate(self.counts):
            for s, n in enumerate(chunk):
                if layer < start + n:
                    return c, s, layer - start
                start += n
        raise IndexError(layer)


def placement(module: str, counts: Chunks, noops: tuple[int, ...] = ()) -> Placement:
    cells = [(c, s) for c, chunk in enumerate(counts) for s, n in enumerate(chunk) if n]
    return Placement(module, counts, cells[0] if cells else None, cells[-1] if cells else None, noops)


def one_stage(info: ModelInfo, **settings: object) -> ParallelConfig:
    """Every layer of every module on one pipeline stage (the whole model, as DCP or a check sees it)."""
    whole = {f"{m.name}_pp_layers": [[info.field_int(m.layers)]] for m in info.preset.modules}
    return ParallelConfig(**whole, **settings)  # type: ignore[arg-type]


_MODULE_WORDS = {"vit": "vision encoder", "audio": "audio encoder", "llm": "language model"}
_TP_FIELDS = {"vit": "vit_tp_size", "audio": "audio_tp_size", "llm": "tp_size"}


def _a(noun: str) -> str:
    return ("an " if noun[:1] in "aeiou" else "a ") + noun


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


def validate_layout(layout: ParallelConfig, info: ModelInfo) -> None:
    """Check a layout against the model; raise ConvertError with the first problem."""
    problems = layout_problems(layout, info)
    if problems:
        raise ConvertError(problems[0])


def layout_problems(layout: ParallelConfig, info: ModelInfo) -> list[str]:
    """Every problem of the layout for this model, in field order (the TUI shows them all)."""
    cfg = f"{info.hf_dir.name}/config.json"
    out = layout.shape_problems()
    if out:
        return out
    names = {m.name for m in info.preset.modules}
    for m in info.preset.modules:
        if m.name not in layout.given():
            out.append(
                f"parallel_config.{m.name}_pp_layers is missing; {info.preset.title} has {_a(m.title.lower())} "
                "whose layers need a per-stage list, e.g. [[32,0,0,0]]"
            )
    for m in layout.given():
        if m not in names:
            out.append(
                f"parallel_config.{m}_pp_layers is set but {info.preset.title} has no {_MODULE_WORDS[m]}; "
                "leave it unset"
            )
    if out:
        return out
    out += _tp_problems(layout, names, info.preset.title)
    expert_fields = [m.experts for m in info.preset.modules if m.experts]
    if layout.ep_size != 1 and not expert_fields:
        out.append(f"parallel_config.ep_size {layout.ep_size}: {info.preset.title} has no experts; use 1")
    if layout.grouped and not expert_fields:
        out.append(
            f"parallel_config.moe_grouped_gemm {layout.moe_grouped_gemm}: {info.preset.title} has no experts; use false"
        )
    if layout.expert_tp_size is not None and not expert_fields and layout.expert_tp_size != layout.tp_size:
        out.append(
            f"parallel_config.expert_tp_size {layout.expert_tp_size}: {info.preset.title} has no experts; "
            "leave it unset"
        )
    elif layout.etp not in (1, layout.tp_size):
        out.append(
            f"parallel_config.expert_tp_size {layout.expert_tp_size}: the experts' TP size must be 1 or "
            f"tp_size {layout.tp_size} (as MindSpeed-LLM's --expert-tensor-parallel-size)"
        )
    for field_name in expert_fields:
        n = info.field_int(field_name)
        if n % layout.ep_size:
            path = info.field_path(field_name)
            out.append(
                f"parallel_config.ep_size {layout.ep_size} does not divide {path} = {n} ({cfg}); "
                f"use an ep_size among: {_divisors(n)}"
            )
    for m in info.preset.modules:
        name = f"parallel_config.{m.name}_pp_layers"
        counts = layout.layers_of(m.name)
        total = sum(sum(c) for c in counts)
        real = info.field_int(m.layers)
        noops = layout.noops_of(m.name)
        want = real + len(noops)
        if total != want:
            path = info.field_path(m.layers)
            plus = f" plus {len(noops)} noop_layers" if noops else ""
            out.append(
                f"{name} {counts} sums to {total} but {cfg} has {path} = {real}{plus}; the sum must equal {want}"
            )
        elif noops and noops[-1] >= total:
            out.append(
                f"parallel_config.noop_layers {layout.noop_layers}: position {noops[-1]} is past the last layer; "
                f"positions are 0..{total - 1} (the {total} layers of {name})"
            )
    if layout.noop_layers and len(set(layout.noop_layers)) != len(layout.noop_layers):
        out.append(f"parallel_config.noop_layers {layout.noop_layers} names a position twice; list each once")
    for m in info.preset.modules:
        tp, tp_field = layout.tp_of(m.name), _tp_field(layout, m.name)
        # padding makes the vocabulary divide; an uneven split does not need it to
        vocab = m.vocab if layout.make_vocab_size_divisible_by is None and not info.preset.uneven_vocab(m) else None
        for field_name in (m.heads, vocab):
            if not field_name:
                continue
            n = info.field_int(field_name)
            if n % tp:
                path = info.field_path(field_name)
                pad = " or pad it with parallel_config.make_vocab_size_divisible_by" if field_name == m.vocab else ""
                out.append(
                    f"parallel_config.{tp_field} {tp} does not divide {path} = {n} ({cfg}); "
                    f"use a {tp_field} among: {_divisors(n)}{pad}"
                )
    seen: set[str] = set()
    for mp in info.preset.mappings:
        if not (mp.head_split and mp.heads) or mp.heads in seen:
            continue
        seen.add(mp.heads)
        module = info.preset.module_of_target(mp.mm).name
        tp, tp_field = layout.tp_of(module), _tp_field(layout, module)
        n = info.field_int(mp.heads)
        if n < tp:
            out.append(
                f"parallel_config.{tp_field} {tp} is more than {info.field_path(mp.heads)} = {n} ({cfg}); "
                f"every TP rank needs a whole head: use a {tp_field} of at most {n}"
            )
    for c in range(layout.vpp_size):
        for s in range(layout.pp_size):
            if not any(layout.layers_of(m.name)[c][s] for m in info.preset.modules):
                where = f"stage {s}" + (f" of chunk {c}" if layout.vpp_size > 1 else "")
                out.append(
                    f"parallel_config: pipeline {where} holds no layers of any module; every stage needs at least one"
                )
    return out


def _tp_field(layout: ParallelConfig, module: str) -> str:
    """The field that sets a module's TP size (tp_size unless the module's own field overrides it)."""
    return _TP_FIELDS[module] if layout.tp_of(module) != layout.tp_size else "tp_size"


def _tp_problems(layout: ParallelConfig, modules: set[str], title: str) -> list[str]:
    """A module's own TP size needs the module, and every size must divide the largest (MindSpeed-MM's rule)."""
    out = []
    for m in ("vit", "audio"):
        value = getattr(layout, _TP_FIELDS[m])
        if value and m not in modules:
            out.append(f"parallel_config.{_TP_FIELDS[m]} {value}: {title} has no {_MODULE_WORDS[m]}; leave it unset")
    if out:
        return out
    world = layout.tp_world
    for m in ("llm", "vit", "audio"):
        size = layout.tp_of(m)
        if m in modules and world % size:
            sizes = ", ".join(f"{_TP_FIELDS[n]} {layout.tp_of(n)}" for n in ("llm", "vit", "audio") if n in modules)
            out.append(
                f"parallel_config.{_TP_FIELDS[m]} {size} does not divide the largest TP size {world} ({sizes}); "
                f"every module's TP size must divide the largest: use one of {_divisors(world)}"
            )
    return out
