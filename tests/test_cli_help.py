"""Help in words a user reads: no internal phrases, types as `int >= 0`, every converter and command listed."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Annotated, Literal

import pytest
from annotated_types import Ge, Gt
from pydantic import BaseModel

from engine.job import COMMANDS
from engine.preset import builtin_presets
from mmtui.convert_cli import COMMAND_HELP
from mmtui.readable import readable
from tests.test_cli import BIN, LAYOUT, _bad, hf_to_mm, mm_convert

# Python's spellings and internal words that must not reach a user
UNREAD = ["seed tool", "Seed-tool", "Annotated[", "<class", "Optional[", "Union[", "typing.", "Ge(", "Gt(", "NoneType",
          "engine.", "Path to a configuration file", "default: False", "default: True"]  # fmt: skip


def _help(*argv: str) -> str:
    """The help with every option on one line (wide terminal), whitespace collapsed."""
    r = subprocess.run(
        [str(BIN / "mm-convert"), *argv], capture_output=True, text=True, env={**os.environ, "COLUMNS": "400"}
    )
    assert r.returncode == 0, r.stderr
    return re.sub(r"\s+", " ", r.stdout)


@pytest.mark.parametrize("command", list(COMMANDS))
def test_command_help_in_words(command: str) -> None:
    text = _help("Qwen2VLConverter", command, "-h")
    assert [w for w in UNREAD if w in text] == []


def test_the_types_as_people_read_them() -> None:
    text = _help("Qwen2VLConverter", "hf_to_mm", "-h")
    for flag, shown in {
        "--cfg.parallel_config.llm_pp_layers": "(required, type: list of lists of int >= 0 or list of int >= 0)",
        "--cfg.parallel_config.tp_size TP_SIZE": "(type: int > 0, default: 1)",
        "--cfg.parallel_config.vit_tp_size VIT_TP_SIZE": "(type: int >= 0 or null, default: null)",
        "--cfg.parallel_config.noop_layers": "(type: list of int >= 0 or null, default: null)",
        "--cfg.overwrite {true,false}": "Replace an existing, non-empty mm_dir. (type: true/false, default: false)",
        "--cfg.mm_dir MM_DIR": "(required, type: path)",
        "--cfg.lora LORA": "(type: fields (--cfg.lora.help) or null, default: null)",
    }.items():
        # the flag, then its own help (not crossing into the next --cfg. option), then the words
        assert re.search(re.escape(flag) + r"(?:(?! --cfg\.).)*?" + re.escape(shown), text), (flag, shown)
    assert "Model options; only llm_hf_dir is read" in text


@pytest.mark.parametrize("nested", ["--cfg.lora.help", "--cfg.llm_hf_config.help"])
def test_a_nested_objects_help(nested: str) -> None:
    text = _help("Qwen2VLConverter", "hf_to_mm", nested)
    assert text.startswith("usage: mm-convert Qwen2VLConverter hf_to_mm ")
    assert f"The fields of {nested.removesuffix('.help')}." in text
    assert [w for w in UNREAD if w in text] == []


def test_top_and_converter_help_list_everything() -> None:
    assert list(COMMAND_HELP) == list(COMMANDS)
    top = _help("-h")
    assert top.startswith("usage: mm-convert [-h] CONVERTER COMMAND")
    for p in builtin_presets().values():  # two families of one converter named together; other namings not apart
        same = [q for q in builtin_presets().values() if q.converter == p.converter and q.naming == "megatron_core"]
        assert f" {p.converter} {' / '.join(q.title for q in same)} " in top
    for command in COMMANDS:
        assert f" {command} " in top
    conv = _help("Qwen2VLConverter", "-h")
    assert conv.startswith("usage: mm-convert Qwen2VLConverter [-h] COMMAND") and "Qwen2-VL checkpoints." in conv
    assert all(f" {command} " in conv for command in COMMANDS)
    assert _help("--help") == top and _help("Qwen2VLConverter", "--help") == conv


def test_verify_help_has_mm_converts_field_names() -> None:
    r = subprocess.run([str(BIN / "mmtui"), "verify", "-h"], capture_output=True, text=True,
                       env={**os.environ, "COLUMNS": "400"})  # fmt: skip
    text = re.sub(r"\s+", " ", r.stdout)
    for side in "ab":
        for field in ("tp_size", "llm_pp_layers", "vit_pp_layers", "ep_size", "noop_layers", "vit_tp_size",
                      "make_vocab_size_divisible_by"):  # fmt: skip
            assert f"--{side}.{field} VALUE" in text
    assert "--b.tp_size VALUE int > 0 (default: 1)" in text
    assert "--b-tp" not in text  # the old spelling still works, unlisted


class _Model(BaseModel):
    x: int


@pytest.mark.parametrize(
    ("hint", "words"),
    [
        (Annotated[int, Ge(0)], "int >= 0"),
        (Annotated[int, Gt(0)], "int > 0"),
        (list[list[Annotated[int, Ge(0)]]], "list of lists of int >= 0"),
        (list[list[list[int]]], "list of lists of lists of int"),
        (list[int] | None, "list of int or null"),
        (Annotated[int, Ge(1)] | None, "int >= 1 or null"),
        (Path, "path"),
        (bool, "true/false"),
        (str | None, "str or null"),
        (Literal["params", "flops"], "one of params, flops"),
        (_Model | None, "fields or null"),
    ],
)
def test_readable(hint: object, words: str) -> None:
    assert readable(hint) == words


def test_a_layout_of_other_rank_names_says_so(qwen2vl_dir: Path, tmp_path: Path) -> None:
    """Written TP1 x PP4, read back as TP2 x PP2: four directories both, but not the same four."""
    pp4 = ["--cfg.parallel_config.llm_pp_layers", "[[1,1,1,1]]", "--cfg.parallel_config.vit_pp_layers", "[[3,0,0,0]]"]
    assert hf_to_mm(qwen2vl_dir, tmp_path / "mm", layout=pp4).returncode == 0
    r = mm_convert("Qwen2VLConverter", "mm_to_hf", "--cfg.save_hf_dir", str(tmp_path / "hf"),
                   "--cfg.mm_dir", str(tmp_path / "mm"), "--cfg.hf_config.hf_dir", str(qwen2vl_dir),
                   *LAYOUT, "--cfg.parallel_config.tp_size", "2")  # fmt: skip
    _bad(
        r,
        "rank directories differ from the layout's",
        "on disk mp_rank_00_000, mp_rank_00_001, mp_rank_00_002, mp_rank_00_003",
        "the layout names mp_rank_00_000, mp_rank_00_001, mp_rank_01_000, mp_rank_01_001",
    )
