"""Plans that write Hugging Face safetensors: the way back (mm_to_hf), and HF -> HF with a LoRA merged.

Each HF tensor is a target whose pieces come from the Megatron source view. By default
the original's shard files, names, tensor order and header metadata are reproduced, so
HF -> MM -> HF gives back the same files byte for byte; `max_shard_size` re-shards
instead. Every non-weight file of the original (config, tokenizer, chat template,
generation config) is copied.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..errors import ConvertError
from ..formats.safetensors_header import TensorMeta, read_metadata
from ..source.fp8 import unquantised_config
from ..source.fused_experts import ExpertMeta, fused_entry
from ..source.hf_source import BIN_NAME, INDEX_NAME, SINGLE_NAME, ModelInfo
from ..source.mm_view import MmView, hf_view
from ..source.tie import is_tied
from .lora import Adapter, merging
from .mtp import copy_of, left_out_note
from .plan import Entry, OutputFile, Piece, Plan

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
WEIGHT_INDEXES = (INDEX_NAME, "pytorch_model.bin.index.json")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|TB|KIB|MIB|GIB|TIB)?\s*$", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
_UNITS["TIB"] = 2**40


def parse_size(text: str | int, field: str = "max_shard_size") -> int:
    """'5GB' (10^9, as transformers counts), '500MiB', or a number of bytes."""
    if isinstance(text, int):
        value = text
    else:
        m = _SIZE.match(text)
        if not m:
            raise ConvertError(f"{field} {text!r}: expected a size such as 5GB, 500MB, 2GiB or a number of bytes")
        value = int(float(m.group(1)) * _UNITS[(m.group(2) or "B").upper()])
    if value <= 0:
        raise ConvertError(f"{field} {text!r}: must be positive")
    return value


def non_weight_files(hf_dir: Path) -> dict[str, Path]:
    """Top-level files to carry over unchanged: everything but weights and their indexes."""
    out = {}
    for p in sorted(hf_dir.iterdir()):
        weights = p.name in WEIGHT_INDEXES or p.name.endswith(WEIGHT_SUFFIXES)
        if p.is_file() and not p.name.startswith(".") and not weights:
            out[p.name] = p
    return out


def build_mm_to_hf_plan(
    info: ModelInfo, view: MmView, *, max_shard_size: str | int | None = None, adapter: Adapter | None = None
) -> Plan:
    """HF safetensors (original names and sharding, or re-sharded) from a Megatron source view.

    With `adapter`, its LoRA is merged into the weights it targets.
    """
    preset = info.preset
    tied = is_tied(info)
    order = sorted(info.tensors.values(), key=lambda m: (info.files.index(m.file), m.begin))
    entries: list[tuple[str, Entry]] = []  # (original file name, entry)
    kept: dict[str, TensorMeta] = {}  # tensors the Megatron model has no place for, copied from hf_dir
    for meta in order:
        if isinstance(meta, ExpertMeta):  # experts fused in one HF tensor: written whole, with the first expert
            if meta.expert == 0:
                assert meta.fused is not None
                entries.append((meta.file.name, fused_entry(info, view, meta.fused)))
            continue
        name = meta.name
        blocks = view.blocks.get(name)
        how, canonical = "join", name
        if blocks is None and preset.ignore and name.startswith(tuple(preset.ignore)):
            blocks, how, kept[name] = (Piece(name, (0, meta.shape[0] if meta.shape else 1)),), "copy of hf_dir's", meta
        if blocks is None and tied and preset.tie and name in preset.tie.drop:
            blocks = view.blocks.get(preset.tie.source)
            how, canonical = "tied: copy of the embedding", preset.tie.source
        elif blocks is None and (shared := copy_of(info, name)) is not None:
            blocks = view.blocks.get(shared)  # an MTP layer's copy of the embedding or the output head
            how, canonical = f"MTP: copy of {info.raw_names.get(shared, shared)}", shared
        if blocks is None:
            assert view.checkpoint is not None  # an HF view has every tensor
            raise ConvertError(
                f"mm_dir {view.checkpoint.root}: holds no part of {info.raw_names.get(name, name)} "
                "(a checkpoint written with save_vit_only cannot be turned back into a full HF model)"
            )
        dtype = meta.dtype if name in kept else view.sources[blocks[0].source].dtype  # open_view checked them
        raw = info.raw_names.get(name, name)
        entry = Entry(raw, meta.shape, dtype, blocks, how)
        if adapter is not None and canonical in adapter.pairs:
            entry.lora, entry.transform = (Piece(canonical, (0, meta.shape[0])),), f"{how} + LoRA"
        entries.append((meta.file.name, entry))
    single = len(info.files) == 1
    files: list[OutputFile] = []
    texts: dict[str, str] = {}
    if max_shard_size is None:
        groups: dict[str, list[Entry]] = {}
        for fname, e in entries:
            groups.setdefault(fname, []).append(e)
        for path in info.files:
            files.append(hf_file(safetensors_name(path.name), groups.get(path.name, []), hf_metadata(path)))
    else:
        limit = parse_size(max_shard_size)
        shards: list[list[Entry]] = [[]]
        size = 0
        for _, e in entries:
            if shards[-1] and size + e.nbytes > limit:
                shards.append([])
                size = 0
            shards[-1].append(e)
            size += e.nbytes
        n = len(shards)
        single = n == 1
        names = [SINGLE_NAME] if single else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        files = [hf_file(name, shard, {"format": "pt"}) for name, shard in zip(names, shards, strict=True)]
    original_index = info.hf_dir / INDEX_NAME
    if not single or (original_index.is_file() and max_shard_size is None):
        texts[INDEX_NAME] = index_text(files, original_index)
    copies = non_weight_files(info.hf_dir)
    notes = [f"{len(copies)} non-weight files copied from {info.hf_dir}", *view.notes]
    if info.left_out:
        notes.append(f"{left_out_note(info)}; config.json is copied as it is")
    config = unquantised_config(info)
    if config is not None:  # FP8 weights come back dequantised: the config must not call them FP8
        copies.pop("config.json", None)
        texts["config.json"] = config
        notes.append("FP8 weights are written dequantised; config.json loses its quantization_config")
    if tied and any(e.transform.startswith("tied") for _, e in entries):
        notes.append("tied embeddings: the output layer is written from the embedding")
    if kept:
        notes.append(f"{len(kept)} tensors the Megatron model does not hold ({', '.join(preset.ignore)}) "
                     f"are copied from {info.hf_dir}")  # fmt: skip
    plan = Plan(files, dict(view.sources) | kept, dict(view.dropped), "release", notes, texts, copies)
    plan.padding, plan.zero_blocks = dict(view.padding), set(view.zero_blocks)
    return merging(plan, adapter) if adapter is not None else plan


def build_merge_plan(info: ModelInfo, adapter: Adapter, *, max_shard_size: str | int | None = None) -> Plan:
    """HF base + LoRA adapter -> merged HF safetensors, sharded like the base unless re-sharded."""
    return build_mm_to_hf_plan(info, hf_view(info), max_shard_size=max_shard_size, adapter=adapter)


def safetensors_name(name: str) -> str:
    """The output name of a weight file: .bin shards become safetensors shards of the same number."""
    if name == BIN_NAME:
        return SINGLE_NAME
    if name.startswith("pytorch_model-") and name.endswith(".bin"):
        return "model-" + name.removeprefix("pytorch_model-").removesuffix(".bin") + ".safetensors"
    return name


def hf_metadata(path: Path) -> dict[str, str] | None:
    return read_metadata(path) if path.suffix == ".safetensors" else {"format": "pt"}


def hf_file(name: str, entries: list[Entry], metadata: dict[str, str] | None) -> OutputFile:
    return OutputFile(name, 0, 0, 0, [entries], kind="safetensors", metadata=metadata)


def index_text(files: list[OutputFile], original: Path) -> str:
    """The index of the written files; the original's own text when it says the same thing,
    so a round trip gives back the very bytes whichever tool wrote (and ordered) it."""
    text, meta = None, {}
    if original.is_file():
        try:
            text = original.read_text()
            meta = dict(json.loads(text).get("metadata") or {})
        except (OSError, ValueError, AttributeError):
            text, meta = None, {}
    meta["total_size"] = sum(f.nbytes for f in files)
    weight_map = {e.key: f.path for f in files for e in f.entries}
    index = {"metadata": meta, "weight_map": dict(sorted(weight_map.items()))}
    if text is not None and json.loads(text) == index:  # dict equality: order and spacing aside
        return text
    return json.dumps(index, indent=2) + "\n"
