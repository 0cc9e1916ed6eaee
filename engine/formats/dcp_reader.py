"""Read a torch.distributed.checkpoint (DCP) directory back to Hugging Face tensors, from its index alone.

Two namings reach us, both as DCP's flattening of `{"model": state_dict}` (`model.` + each key):
- MindSpeed-MM's FSDP2 converters and training: `model.<dcp_prefix><HF name>` (GenericDCPConverter's
  `dcp_prefix` after removing its `hf_prefix`; Qwen3-VL's converter uses `model.`), each tensor possibly
  in several chunks (FSDP2's Shard(0): one `__R_0.distcp` per rank), next to `optimizer.*` and other
  training state;
- our own hf_to_dcp: `model.<Megatron name>` of the TP 1 / PP 1 layout (engine/planning/build.py build_dcp_plan).

The index is read with torch_dist_pickle.py's restricted unpickler (torch_dist_reader.read_index), each
chunk's `torch.save` archive is parsed as the torch_dist reader does (CRC-checked records), and every HF
tensor becomes a list of row blocks of those chunks: the executor reads only the rows each band needs,
so no tensor, let alone the checkpoint, is assembled in memory. Anything not under `model.` is left unread.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConvertError
from ..layout import one_stage
from ..planning.build import build_plan
from ..planning.plan import TRACKER_NAME, Entry, Piece, Plan, grid
from ..source.cast import FLOATS, CastMeta
from ..source.hf_source import ModelInfo, read_weights, weight_files
from ..source.mm_view import MmView, ordered_blocks
from ..source.tie import is_tied
from .regular_file import read_regular
from .safetensors_header import TensorMeta, itemsize
from .torch_dist_names import CONFIG_NAME, Chunk
from .torch_dist_reader import ChunkReader, DistTensor, TorchDistIndex, place_chunk, read_index

METADATA_NAME = ".metadata"
MODEL = "model."
EXTRA_STATE = "_extra_state"


@dataclass
class DcpCheckpoint:
    root: Path  # as the user gave it
    it_dir: Path  # the directory holding .metadata
    index: TorchDistIndex

    @property
    def model(self) -> dict[str, DistTensor]:
        """The tensors under `model.` (optimizer and other training state are not read)."""
        return {k: t for k, t in self.index.tensors.items() if k.startswith(MODEL)}


def open_dcp(path: Path, field: str = "dcp_dir") -> DcpCheckpoint:
    """The DCP directory `path`: one holding `.metadata`, or a save directory whose tracker names it."""
    path = Path(path)
    if not path.is_dir():
        raise ConvertError(f"{field} {path}: no such directory")
    it_dir = path
    if not (path / METADATA_NAME).is_file():
        tracker = path / TRACKER_NAME
        if not tracker.is_file():
            raise ConvertError(
                f"{field} {path}: no {METADATA_NAME} (torch DCP's index) and no {TRACKER_NAME}; expected a DCP "
                "directory (release/ or iter_NNNNNNN/) or the save directory holding it"
            )
        text = read_regular(tracker, 100, TRACKER_NAME).decode("utf-8", "replace").strip()
        if text == "release":
            it_dir = path / "release"
        elif text.isdigit():
            it_dir = path / f"iter_{int(text):07d}"
        else:
            raise ConvertError(f"{tracker}: {text[:40]!r}; expected release or an iteration number")
        if not (it_dir / METADATA_NAME).is_file():
            raise ConvertError(f"{field} {path}: {TRACKER_NAME} names {it_dir.name}, which holds no {METADATA_NAME}")
    if (it_dir / CONFIG_NAME).is_file():
        raise ConvertError(f"{field} {path}: a Megatron-Core torch_dist checkpoint ({CONFIG_NAME}); mm_to_hf reads it")
    return DcpCheckpoint(path, it_dir, read_index(it_dir))


# ---------------------------------------------------------------------------------------
# which naming


def hf_prefix_counts(names: list[str], hf_keys: set[str]) -> Counter[str]:
    """For each prefix P, how many `names` are P + an HF key (P ending at a dot, or empty)."""
    counts: Counter[str] = Counter()
    for name in names:
        starts = [0, *(i + 1 for i, ch in enumerate(name) if ch == ".")]
        for i in starts:
            if name[i:] in hf_keys:
                counts[name[:i]] += 1
    return counts


def _stripped(key: str, hf_prefix: str) -> str:
    """An HF name as MindSpeed-MM's hf_to_dcp saves it: without `hf_prefix` (GenericDCPConverter)."""
    return key[len(hf_prefix) :] if hf_prefix and key.startswith(hf_prefix) else key


@dataclass
class HfTensors:
    """hf_dir's weights as written: file order, raw names, shapes, dtypes (headers only)."""

    files: list[Path]
    metas: dict[str, TensorMeta]  # raw name -> header entry, in file then byte order


def hf_tensors(hf_dir: Path) -> HfTensors:
    files, _ = weight_files(hf_dir)
    metas: dict[str, TensorMeta] = {}
    for f in files:
        for m in sorted(read_weights(f).values(), key=lambda m: m.begin):
            metas[m.name] = m
    return HfTensors(files, metas)


def naming(
    ckpt: DcpCheckpoint, info: ModelInfo, hf: HfTensors, forward: Plan, dcp_prefix: str | None, hf_prefix: str
) -> str | None:
    """The `dcp_prefix` of MindSpeed-MM's naming, or None for our hf_to_dcp's Megatron names (`forward`'s keys):
    whichever names more of the checkpoint's model tensors."""
    names = [k.removeprefix(MODEL) for k in ckpt.model]
    if dcp_prefix is not None:
        return dcp_prefix
    hf_keys = {_stripped(k, hf_prefix) for k in hf.metas}
    counts = hf_prefix_counts(names, hf_keys)
    best, n = counts.most_common(1)[0] if counts else ("", 0)
    megatron = {e.key for f in forward.files for e in f.entries}
    m = sum(1 for k in names if k in megatron)
    if n == 0 and m == 0:
        shown = next(iter(ckpt.model), "(none)")
        raise ConvertError(
            f"{ckpt.it_dir / METADATA_NAME}: none of its {len(names)} model tensors (first: {shown}) is a tensor of "
            f"{info.hf_dir} as model.<dcp_prefix><HF name> (MindSpeed-MM) or model.<Megatron name> (hf_to_dcp); "
            "is hf_config.hf_dir this checkpoint's model?"
        )
    return best if n >= m else None


def dcp_forward(info: ModelInfo) -> Plan:
    """The plan hf_to_dcp writes (engine/planning/build.py build_dcp_plan): the TP 1 / PP 1 layout."""
    return build_plan(info, one_stage(info))


# ---------------------------------------------------------------------------------------
# blocks of chunks


def _whole(fqn: str, shape: tuple[int, ...]) -> Chunk:
    """A whole tensor seen as the one chunk torch_dist_reader.place_chunk cuts from the disk's chunks."""
    return Chunk(fqn, shape, (0,) * len(shape), shape, (0, grid(shape)[0]))


def _check_rest(ckpt: DcpCheckpoint, used: set[str], dropped: dict[str, str], field: str) -> None:
    """Every model tensor on disk is used or deliberately dropped; model byte entries are extra state only."""
    for fqn in ckpt.model:
        if fqn not in used and fqn not in dropped:
            raise ConvertError(
                f"{field} {ckpt.root}: {fqn} is in the checkpoint but not in hf_config.hf_dir's model; is hf_dir "
                "the model this checkpoint holds (and dcp_prefix / hf_prefix right)?"
            )
    for key in ckpt.index.objects:
        if key.startswith(MODEL) and EXTRA_STATE not in key:
            raise ConvertError(
                f"{field} {ckpt.root}: byte entry {key} under model. is not a tensor; a model checkpoint holds "
                "only tensors there (and modules' _extra_state)"
            )


def dcp_hf_plan(
    info: ModelInfo,
    ckpt: DcpCheckpoint,
    hf: HfTensors,
    dcp_prefix: str,
    hf_prefix: str,
    *,
    hf_dtype: bool = False,
    fused_linear_names: tuple[str, ...] = (),
    field: str = "dcp_dir",
) -> Plan:
    """MindSpeed-MM's naming: each HF tensor of hf_dir, in its file and place, from the chunks of its DCP tensor.

    With `hf_dtype`, a float tensor saved in another float dtype (FSDP2's float32 master weights of a bfloat16
    model) is rounded to hf_dir's dtype a band at a time (engine/source/cast.py); without it that is an error. A
    tensor named by `fused_linear_names` may be stored as its 2-D view (MindSpeed-MM's MoE experts).
    """
    from ..planning.hf_out import hf_file, hf_metadata, index_text, non_weight_files, safetensors_name
    from ..source.hf_source import INDEX_NAME

    where = f"{field} {ckpt.root}"
    reader = ChunkReader(ckpt.index)
    sources: dict[str, TensorMeta] = {}
    blocks: dict[str, list[Piece]] = {}
    padding: dict[str, int] = {}
    groups: dict[Path, list[Entry]] = {}
    used: set[str] = set()
    casts = flats = 0
    try:
        for raw, m in hf.metas.items():
            fqn = MODEL + dcp_prefix + _stripped(raw, hf_prefix)
            t = ckpt.index.tensors.get(fqn)
            if t is None:
                raise ConvertError(
                    f"{where}: {raw} of hf_config.hf_dir is missing (no {fqn} in its {METADATA_NAME}); is hf_dir "
                    "the model this checkpoint holds?"
                )
            floats = t.dtype in FLOATS and m.dtype in FLOATS
            cast = t.dtype != m.dtype and floats and hf_dtype
            flat = t.shape != m.shape and t.shape == _flattened(m.shape) and any(n in raw for n in fused_linear_names)
            if (t.shape != m.shape and not flat) or (t.dtype != m.dtype and not cast):
                hint = " (or hf_dtype true: write hf_dir's dtype)" if t.shape == m.shape and floats else ""
                raise ConvertError(
                    f"{where}: {fqn} is {t.dtype} {list(t.shape)}, hf_config.hf_dir's {raw} is {m.dtype} "
                    f"{list(m.shape)} ({m.file.name}); they must match{hint}"
                )
            if not m.shape:
                raise ConvertError(f"{where}: {fqn} is a 0-d tensor; dcp_to_hf reads tensors of one dim or more")
            used.add(fqn)
            e = Entry(raw, t.shape, m.dtype, (Piece(raw, (0, grid(t.shape)[0])),), "rename")
            place_chunk(ckpt.index, reader, e, _whole(fqn, t.shape), where, sources, blocks, padding)
            pieces = tuple(sorted(blocks[raw], key=lambda p: (p.at, p.col_at)))
            for p in pieces if cast else ():
                c = sources[p.source]
                n = c.numel * itemsize(m.dtype)
                sources[p.source] = CastMeta(c.name, m.dtype, c.shape, c.file, c.begin, n, raw=c)
                casts += 1
            if flat:  # assembled as the 2-D view on disk, written with hf_dir's shape: the same bytes
                out: Entry = FlatEntry(raw, t.shape, m.dtype, pieces, "DCP chunks, 2-D view", hf_shape=m.shape)
                flats += 1
            else:
                out = Entry(raw, m.shape, m.dtype, pieces, "DCP chunks")
            groups.setdefault(m.file, []).append(out)
    finally:
        reader.close()
    dropped = _tied_copy(info, ckpt, dcp_prefix, used)
    _check_rest(ckpt, used, dropped, field)
    files = [hf_file(safetensors_name(p.name), groups.get(p, []), hf_metadata(p)) for p in hf.files]
    texts: dict[str, str] = {}
    original_index = info.hf_dir / INDEX_NAME
    if len(files) > 1 or original_index.is_file():
        texts[INDEX_NAME] = index_text(files, original_index)
    copies = non_weight_files(info.hf_dir)
    notes = [
        f"torch DCP {ckpt.it_dir.name}: {len(used)} tensors named model.{dcp_prefix}<HF name> in "
        f"{len({c.file for fqn in used for c in ckpt.index.tensors[fqn].chunks})} data file(s); "
        f"{len(ckpt.index.tensors) - len(ckpt.model)} training-state entries left unread",
        f"{len(copies)} non-weight files copied from {info.hf_dir}",
    ]
    notes += [f"{k}: {why}" for k, why in dropped.items()]
    if casts:
        notes.append(f"{casts} chunks rounded to hf_dir's dtype (hf_dtype)")
    if flats:
        notes.append(f"{flats} fused expert tensors stored as their 2-D view [experts * in, out] (fused_linear_names)")
    return Plan(files, sources, dropped, "release", notes, texts, copies)


def _flattened(shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """MindSpeed-MM's `view(-1, shape[-1])` of a fused experts tensor [experts, in, out]."""
    if len(shape) < 3:
        return None
    n = 1
    for s in shape[:-1]:
        n *= s
    return (n, shape[-1])


@dataclass(slots=True)
class FlatEntry(Entry):
    """A tensor assembled as the 2-D view the checkpoint holds and written with hf_dir's shape (same bytes)."""

    hf_shape: tuple[int, ...] = ()

    @property
    def disk_shape(self) -> tuple[int, ...]:
        return self.hf_shape


def _tied_copy(info: ModelInfo, ckpt: DcpCheckpoint, dcp_prefix: str, used: set[str]) -> dict[str, str]:
    """MindSpeed-MM's hf_to_dcp may save a tied model's output layer (tie_weight): hf_dir has none; not written."""
    out: dict[str, str] = {}
    if not is_tied(info):
        return out
    for fqn in ckpt.model:
        name = fqn.removeprefix(MODEL + dcp_prefix)
        if fqn not in used and fqn.startswith(MODEL + dcp_prefix) and name.endswith("lm_head.weight"):
            out[fqn] = "the tied output layer (tie_word_embeddings): hf_dir holds only the embedding"
    return out


def dcp_megatron_view(info: ModelInfo, ckpt: DcpCheckpoint, forward: Plan, field: str = "dcp_dir") -> MmView:
    """Our hf_to_dcp's naming: the canonical tensors as blocks of the chunks of `forward`'s (the TP 1 layout's)."""
    where = f"{field} {ckpt.root}"
    reader = ChunkReader(ckpt.index)
    sources: dict[str, TensorMeta] = {}
    blocks: dict[str, list[Piece]] = {}
    padding: dict[str, int] = {}
    used: set[str] = set()
    try:
        for e in (e for f in forward.files for e in f.entries):
            fqn = MODEL + e.key
            used.add(fqn)
            place_chunk(ckpt.index, reader, e, _whole(fqn, e.shape), where, sources, blocks, padding)
    finally:
        reader.close()
    _check_rest(ckpt, used, {}, field)
    ordered, dtypes = ordered_blocks(blocks, sources, where)
    view = MmView(None, one_stage(info), sources, ordered, {}, dtypes, padding)
    view.notes.append(f"torch DCP {ckpt.it_dir.name}: the TP 1 layout's Megatron names (as hf_to_dcp writes them)")
    return view
