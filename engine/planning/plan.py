"""The conversion plan as data: every output file, every tensor in it, and its recipe.

A target tensor is a list of `Piece`s: blocks of source tensors placed at rows (and columns) of
it. The plan is plain data; building it (engine/planning/build.py) reads no tensor bytes, and
the executor, the plan check and the TUI preview all read the same structure.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..formats.safetensors_header import TensorMeta, itemsize

if TYPE_CHECKING:
    from .lora import LoraPair

CKPT_NAME = "model_optim_rng.pt"
TRACKER_NAME = "latest_checkpointed_iteration.txt"
PARAMS = ("weight", "bias")


@dataclass(frozen=True, slots=True)
class Piece:
    """A block of one source tensor and where it lands in the target.

    Rows [r0, r1) of dim 0 and columns [c0, c1) of dim 1 (all columns when `cols` is
    None) of the source go to the target block starting at row `at`, column `col_at`.
    Tensors with fewer than two dims have a single column. Splitting, fusing and their
    inverses are all just lists of such blocks.
    """

    source: str
    rows: tuple[int, int]
    cols: tuple[int, int] | None = None
    at: int = 0
    col_at: int = 0

    @property
    def nrows(self) -> int:
        return self.rows[1] - self.rows[0]


def stack(pieces: Iterable[Piece]) -> tuple[Piece, ...]:
    """Place pieces one under the other, in order, starting at target row 0."""
    out, at = [], 0
    for p in pieces:
        out.append(Piece(p.source, p.rows, p.cols, at, 0))  # not dataclasses.replace: this runs per piece
        at += p.nrows
    return tuple(out)


def grid(shape: tuple[int, ...]) -> tuple[int, int]:
    """(rows, columns) of a tensor in the block model of `Piece`."""
    return (shape[0] if shape else 1), (shape[1] if len(shape) >= 2 else 1)


@dataclass(slots=True)
class Entry:
    """One tensor of an output file, assembled from blocks of source tensors.

    The last `pad_rows` rows are zeros (vocabulary padding); the pieces cover the rest,
    unless `zero_fill`: then what no piece covers is zero (an adapter's unused rank blocks).
    `lora` lists blocks of canonical tensors that carry a LoRA adapter (`Plan.lora`), in
    this entry's coordinates: their B @ A is added after assembling (engine/planning/lora.py).
    With `stored`, the tensor assembled (2-D, `shape`) is written transposed and given the
    shape `stored` (same elements): grouped-GEMM experts (engine/planning/experts.py), HF's fused experts
    (engine/source/fused_experts.py).
    """

    key: str
    shape: tuple[int, ...]
    dtype: str
    pieces: tuple[Piece, ...]
    transform: str
    pad_rows: int = 0
    lora: tuple[Piece, ...] = ()
    zero_fill: bool = False
    stored: tuple[int, ...] | None = None

    @property
    def disk_shape(self) -> tuple[int, ...]:
        """The shape written: `shape`, or `stored` for a tensor written transposed."""
        return self.shape if self.stored is None else self.stored

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * itemsize(self.dtype)

    @property
    def sources(self) -> list[str]:
        return list(dict.fromkeys(p.source for p in self.pieces))


@dataclass(slots=True)
class OutputFile:
    path: str  # relative to the output directory, e.g. "release/mp_rank_00_001/model_optim_rng.pt"
    tp_rank: int
    pp_rank: int
    ep_rank: int
    chunks: list[list[Entry]]  # one list per VPP chunk
    kind: str = "torch"  # "torch" (a Megatron rank file), "safetensors", or "dcp" (torch.distributed.checkpoint)
    metadata: dict[str, str] | None = None  # a safetensors file's __metadata__
    head: dict[str, object] = field(default_factory=dict)  # a rank file's entries before the model (args, iteration)
    empty: list[list[str]] = field(default_factory=list)  # per chunk: keys written as None (TE's `_extra_state`)

    @property
    def chunk_names(self) -> list[str]:
        return ["model"] if len(self.chunks) == 1 else [f"model{i}" for i in range(len(self.chunks))]

    @property
    def entries(self) -> list[Entry]:
        return [e for chunk in self.chunks for e in chunk]

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries)

    @property
    def numel(self) -> int:
        return sum(e.numel for e in self.entries)

    @property
    def dir_name(self) -> str:
        return self.path.split("/")[-2]

    @property
    def label(self) -> str:
        """How a person names it: the rank directory of a Megatron file, the path of an HF shard."""
        return self.path if self.kind == "safetensors" else self.dir_name


@dataclass
class Plan:
    files: list[OutputFile]
    sources: dict[str, TensorMeta]  # every tensor of the source view
    dropped: dict[str, str]  # source key -> why it is deliberately not written
    iteration: str = "release"
    notes: list[str] = field(default_factory=list)
    texts: dict[str, str] = field(default_factory=dict)  # small files written as they are (tracker, index)
    copies: dict[str, Path] = field(default_factory=dict)  # files copied unchanged (config, tokenizer)
    padding: dict[str, int] = field(default_factory=dict)  # source key -> its last rows that are padding
    lora: dict[str, LoraPair] = field(default_factory=dict)  # canonical tensor -> adapter merged into it
    lora_sources: dict[str, TensorMeta] = field(default_factory=dict)  # the adapter tensors its pieces read
    zero_blocks: set[str] = field(default_factory=set)  # sources whose unread parts are zeros by layout
    inputs: list[tuple[str, Path]] = field(default_factory=list)  # (field, directory) the job reads
    same: list[tuple[str, str, str]] = field(default_factory=list)  # (dropped copy, source written for it, what
    # they are called): checked equal before writing (engine/planning/mtp.py)

    @property
    def nbytes(self) -> int:
        return sum(f.nbytes for f in self.files)

    @property
    def tracker_text(self) -> str:
        if self.iteration == "release":
            return "release"
        return self.iteration.removeprefix("iter_").lstrip("0") or "0"


def rank_dir_name(tp_rank: int, pp_rank: int, pp: int, ep_rank: int = 0, ep: int = 1) -> str:
    """`mp_rank_TT[_PPP][_EEE]`: the PP and EP numbers only when that size is above 1 (Megatron's naming)."""
    name = f"mp_rank_{tp_rank:02d}"
    if pp > 1:
        name += f"_{pp_rank:03d}"
    if ep > 1:
        name += f"_{ep_rank:03d}"
    return name


def rank_path(iteration: str, tp_rank: int, pp_rank: int, pp: int, ep_rank: int = 0, ep: int = 1) -> str:
    return f"{iteration}/{rank_dir_name(tp_rank, pp_rank, pp, ep_rank, ep)}/{CKPT_NAME}"
