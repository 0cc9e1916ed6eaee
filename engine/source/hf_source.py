"""Inspect a Hugging Face model directory from metadata, and read slices of its tensors.

Reads config.json and the safetensors headers only. Tensor bytes are read later with
plain `readinto` at the offsets the header gives (not mmap: mapped pages count towards
the process's resident memory and would make peak RSS grow with the model).
"""

from __future__ import annotations

import contextlib
import dataclasses
import mmap
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConvertError
from ..formats.regular_file import open_regular, read_regular
from ..formats.safetensors_header import TensorMeta, read_header
from ..formats.strict_json import parse_json
from ..planning.mtp import with_mtp_names
from ..preset import Preset, default_presets, with_language_model
from .fp8 import dequantised

if TYPE_CHECKING:
    import torch

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
BIN_INDEX_NAME = "pytorch_model.bin.index.json"
BIN_NAME = "pytorch_model.bin"


@dataclass
class ModelInfo:
    """Everything a plan needs about a source model, read from metadata alone."""

    hf_dir: Path
    preset: Preset
    config: dict[str, Any]
    fields: dict[str, Any]
    tensors: dict[str, TensorMeta]  # canonical (preset) spelling -> where its bytes are
    files: list[Path]
    spelling: str  # "canonical" or the alias prefix seen in the files
    raw_names: dict[str, str] = field(default_factory=dict)  # canonical -> name as written in the files
    left_out: dict[str, str] = field(default_factory=dict)  # tensors deliberately not planned -> why (mtp = false)
    warnings: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def field_int(self, name: str) -> int:
        return int(self.fields[name])

    def field_path(self, name: str) -> str:
        """The config.json path a field's value came from (for messages); the preferred one when defaulted."""
        paths = self.preset.fields[name]
        return next((p for p in paths if lookup(self.config, p) is not None), paths[0])


JSON_LIMIT = 100_000_000  # bytes of config.json or an index; real ones are well under 10 MB


def _config_path(hf_dir: Path) -> Path:
    if not hf_dir.exists():
        raise ConvertError(
            f"hf_dir {hf_dir}: no such directory (expected a Hugging Face model directory "
            "with config.json and *.safetensors)"
        )
    if not hf_dir.is_dir():
        raise ConvertError(f"hf_dir {hf_dir}: not a directory (expected a Hugging Face model directory)")
    path = hf_dir / "config.json"
    if not path.exists():
        raise ConvertError(f"{path}: missing (a Hugging Face model directory holds config.json)")
    return path


def read_config(hf_dir: Path) -> dict[str, Any]:
    path = _config_path(hf_dir)
    cfg = parse_json(read_regular(path, JSON_LIMIT, "config.json"), path, "config.json")
    if not isinstance(cfg, dict):
        raise ConvertError(f"{path}: expected a JSON object")
    return cfg


def detect_preset(config: dict[str, Any], where: Path) -> Preset:
    """Pick the family from model_type, else architectures[0]."""
    model_type = config.get("model_type")
    archs = config.get("architectures") or []
    for p in default_presets():
        if model_type in p.model_types or (archs and archs[0] in p.architectures):
            return p
    known = ", ".join(t for p in default_presets() for t in p.model_types)
    raise ConvertError(
        f"{where}: model_type {model_type!r} (architectures {archs}) is not a supported family; "
        f"supported model_type values: {known}"
    )


def lookup(config: dict[str, Any], dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node or node[part] is None:
            return None
        node = node[part]
    return node


def resolve_fields(preset: Preset, config: dict[str, Any], where: Path) -> dict[str, Any]:
    """Each logical field's value from its first config path that is set (else its default), checked."""
    out: dict[str, Any] = {}
    for name, paths in preset.fields.items():
        path = next((p for p in paths if lookup(config, p) is not None), None)
        if path is None:
            if name not in preset.defaults:
                raise ConvertError(
                    f"{where}: none of {', '.join(paths)} is set (needed for {name}); is this a complete config.json?"
                )
            value = preset.defaults[name]
        else:
            value = lookup(config, path)
        flag = (preset.tie is not None and name == preset.tie.field) or isinstance(preset.defaults.get(name), bool)
        if flag and type(value) is not bool:
            raise ConvertError(f"{where}: {path} = {value!r}; expected true or false")
        if isinstance(preset.defaults.get(name), list):  # a list of layer numbers (deepstack_visual_indexes)
            if not isinstance(value, list) or any(type(v) is not int or v < 0 for v in value):
                raise ConvertError(f"{where}: {path} = {value!r}; expected a list of whole numbers >= 0")
            out[name] = value
            continue
        if not flag and (type(value) is not int or value < 1):  # not 4.5, "4", [4] or True: a count
            raise ConvertError(f"{where}: {path} = {value!r}; expected a whole number > 0 (it is a count)")
        out[name] = value
    return out


def _plain_name(name: object) -> bool:
    """A file name inside the model directory: not absolute, no '..', not empty."""
    if not isinstance(name, str) or not name or name.startswith("/"):
        return False
    return ".." not in name.split("/")


def _indexed(hf_dir: Path, index: Path, kind: str) -> tuple[list[Path], dict[str, str]]:
    data = parse_json(read_regular(index, JSON_LIMIT, "an index"), index, "index")
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict):
        raise ConvertError(f"{index}: not a valid index (expected a JSON object with a weight_map object)")
    checked: set[str] = set()  # a 671B index names 128 files 90,000 times: check each name once
    for key, name in weight_map.items():
        if isinstance(name, str) and name in checked:
            continue
        if _plain_name(name):
            checked.add(name)
        else:
            raise ConvertError(
                f"{index}: weight_map[{key!r}] = {name!r}; expected the name of a {kind} file in {hf_dir}"
            )
    names = sorted(set(weight_map.values()))
    for name in names:
        if not (hf_dir / name).exists():
            key = next(k for k, v in weight_map.items() if v == name)
            raise ConvertError(f"{index}: names {name} (for {key!r}) but {hf_dir / name} is missing")
    return [hf_dir / n for n in names], weight_map


def read_weights(path: Path) -> dict[str, TensorMeta]:
    """One weight file's tensors from metadata: a safetensors header, or a torch .bin's pickle."""
    if path.suffix == ".bin":
        from ..formats.mm_source import read_bin_file  # the restricted unpickler lives with the rank-file reader

        return read_bin_file(path)
    return read_header(path)


def weight_files(hf_dir: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The weight files to read (safetensors, else torch .bin), and the index's weight_map when sharded."""
    index = hf_dir / INDEX_NAME
    if index.exists():
        return _indexed(hf_dir, index, ".safetensors")
    single = hf_dir / SINGLE_NAME
    if single.exists():
        return [single], None
    found = sorted(hf_dir.glob("*.safetensors"))
    if found:
        return found, None
    bin_index = hf_dir / BIN_INDEX_NAME
    if bin_index.exists():
        return _indexed(hf_dir, bin_index, ".bin")
    if (hf_dir / BIN_NAME).exists():
        return [hf_dir / BIN_NAME], None
    raise ConvertError(
        f"hf_dir {hf_dir}: no weights (expected model.safetensors, or shards with {INDEX_NAME}, or "
        f"{BIN_NAME}, or shards with {BIN_INDEX_NAME})"
    )


def canonical_name(preset: Preset, name: str) -> tuple[str, str]:
    """Map another spelling of a key to the preset's; return (name, alias used or '')."""
    for alias in sorted(preset.aliases, key=len, reverse=True):
        if name.startswith(alias):
            return preset.aliases[alias] + name[len(alias) :], alias
    return name, ""


def inspect_hf(hf_dir: Path | str, preset: Preset | None = None) -> ModelInfo:
    """Read config.json and every safetensors header; no tensor data."""
    hf_dir = Path(hf_dir)
    config = read_config(hf_dir)
    where = hf_dir / "config.json"
    preset = with_language_model(preset or detect_preset(config, where), config, where)
    fields = resolve_fields(preset, config, where)
    preset = with_mtp_names(preset, config, fields, where)
    files, weight_map = weight_files(hf_dir)
    tensors: dict[str, TensorMeta] = {}
    raw_names: dict[str, str] = {}
    spellings: set[str] = set()
    for path in files:
        for raw, meta in read_weights(path).items():
            if weight_map is not None and weight_map.get(raw) not in (None, path.name):
                continue  # the index says this copy is not the one to use
            name, alias = canonical_name(preset, raw)
            spellings.add(alias)
            if name in tensors:
                raise ConvertError(f"{path}: tensor {raw!r} also appears in {tensors[name].file.name}")
            tensors[name] = dataclasses.replace(meta, name=name) if alias else meta
            raw_names[name] = raw
    if weight_map is not None:
        for raw, fname in weight_map.items():
            if canonical_name(preset, raw)[0] not in tensors:
                raise ConvertError(f"{hf_dir / INDEX_NAME}: names {raw!r} in {fname} but that file's header lacks it")
    info = ModelInfo(
        hf_dir, preset, config, fields, tensors, files, "/".join(sorted(s or "canonical" for s in spellings)), raw_names
    )
    from .fused_experts import split_fused_experts  # it builds on the plan's Entry, which needs this module

    # FP8 weights and their block scales: one bf16 tensor each (engine/source/fp8.py); experts fused in one tensor:
    # one [out, in] tensor each (engine/source/fused_experts.py)
    return split_fused_experts(dequantised(info))


class TensorReader:
    """Reads row ranges of source tensors straight into caller buffers."""

    def __init__(self) -> None:
        self._fds: dict[Path, int] = {}

    def fd(self, path: Path) -> int:
        fd = self._fds.get(path)
        if fd is None:
            fd = self._fds[path] = open_regular(path)
        return fd

    def row_span(self, meta: TensorMeta, r0: int, r1: int, *, check: bool = True) -> tuple[int, int, int]:
        """(file descriptor, offset, length) of rows [r0, r1): rows are contiguous bytes.

        Every read of source bytes (kernel copies, bands, mapped rows, verify) starts here, so
        this is where a rank file's record is checked against its CRC-32 (once, engine/formats/record_check.py).
        `check=False` is for a caller that copies the whole record and confirms its CRC itself.
        """
        fd = self.fd(meta.file)
        if meta.record is not None and check:
            meta.record.ensure(fd)
        if not meta.shape:
            return fd, meta.begin, meta.nbytes
        row_bytes = meta.nbytes // meta.shape[0] if meta.shape[0] else 0
        return fd, meta.begin + r0 * row_bytes, (r1 - r0) * row_bytes

    def read_rows_into(self, meta: TensorMeta, r0: int, r1: int, out: memoryview) -> None:
        """Copy rows [r0, r1) of `meta` (dim 0) into the writable buffer `out`."""
        fd, start, want = self.row_span(meta, r0, r1)
        buf = memoryview(out).cast("B")
        if len(buf) != want:
            raise AssertionError(f"buffer of {len(buf)} bytes for {want} bytes of {meta.name}")
        done = 0
        while done < want:
            n = os.preadv(fd, [buf[done:]], start + done)
            if n <= 0:
                raise ConvertError(f"{meta.file}: unexpected end of file reading {meta.name!r} (truncated?)")
            done += n

    @contextlib.contextmanager
    def mapped_rows(self, meta: TensorMeta, r0: int, r1: int) -> Iterator[memoryview]:
        """Rows [r0, r1) as a read-only view of the page cache (no copy), unmapped on exit.

        For cutting columns: only the bytes a rank keeps are copied out, and the mapping
        is dropped right after; callers map a band of rows at a time (execute.BAND).
        """
        fd, start, want = self.row_span(meta, r0, r1)
        if want == 0:
            yield memoryview(b"")
            return
        base = start - start % mmap.ALLOCATIONGRANULARITY
        try:
            mm = mmap.mmap(fd, start + want - base, prot=mmap.PROT_READ, offset=base)
        except ValueError as e:  # mapping past the end of the file
            raise ConvertError(f"{meta.file}: unexpected end of file reading {meta.name!r} (truncated?)") from e
        view = memoryview(mm)[start - base : start - base + want]
        try:
            yield view
        finally:
            view.release()
            mm.close()

    def read(self, meta: TensorMeta) -> torch.Tensor:
        """A whole tensor (for tools and tests; the executor streams instead)."""
        import torch

        out = torch.empty(meta.shape, dtype=getattr(torch, meta.dtype))
        flat = out.reshape(-1).view(torch.uint8).numpy() if out.numel() else bytearray()
        self.read_rows_into(meta, 0, meta.shape[0] if meta.shape else 1, memoryview(flat))
        return out

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
