"""Start-up does only what is asked: help without torch or a parser per converter, the demo from its cache.

(Times are measured by bench/bench_startup.py, not asserted here.)
"""

from __future__ import annotations

import ast
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmtui.demo import DIGESTS, _shapes, demo_files

HEAVY = ("torch", "jsonargparse", "numpy", "textual")


def _imported_by(code: str, env: dict[str, str] | None = None) -> list[str]:
    """Which of HEAVY a fresh interpreter has imported after `code` (SystemExit included)."""
    probe = (
        "import sys\ntry:\n" + "".join(f"    {line}\n" for line in code.splitlines()) + "except SystemExit:\n    pass\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules), file=sys.stderr)"
    )
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env={**os.environ, **(env or {})},
                       timeout=120)  # fmt: skip
    return ast.literal_eval(r.stderr.strip().splitlines()[-1])


@pytest.mark.parametrize("argv", [["-h"], ["Qwen2VLConverter", "-h"], ["--help"], [], ["Qwen2VLConvertr", "hf_to_mm"]])
def test_mm_convert_help_and_names_import_nothing_heavy(argv: list[str]) -> None:
    assert _imported_by(f"from mmtui.convert_cli import main\nmain({argv!r})") == []


def test_mmtui_help_imports_nothing_heavy() -> None:
    assert _imported_by("from mmtui.__main__ import main\nmain(['-h'])") == []


FIRST_SCREEN = """
import mmtui.app

async def first_screen(pilot):
    await pilot.pause()
    pilot.app.exit()

run = mmtui.app.MmtuiApp.run
mmtui.app.MmtuiApp.run = lambda self, **kw: run(self, headless=True, auto_pilot=first_screen)
from mmtui.__main__ import main
main(["--demo"])
"""


def _files(d: Path) -> dict[str, tuple[int, int, bytes]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(d.iterdir())}


def test_the_demo_checkpoint_is_cached(tmp_path: Path) -> None:
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache"), "TMPDIR": str(tmp_path / "tmp")}
    (tmp_path / "tmp").mkdir()
    demo = tmp_path / "cache" / "mmtui" / "demo"
    imported = _imported_by(FIRST_SCREEN, env)
    assert "textual" in imported and "torch" not in imported  # the first screen needs no torch
    assert sorted(os.listdir(demo)) == ["Qwen2-VL-tiny"]  # no temporary directory left behind
    assert sorted(os.listdir(demo / "Qwen2-VL-tiny")) == ["config.json", "model.safetensors"]
    assert os.listdir(tmp_path / "tmp") == []  # nothing in the temporary directory either
    first = _files(demo / "Qwen2-VL-tiny")

    _imported_by(FIRST_SCREEN, env)
    assert _files(demo / "Qwen2-VL-tiny") == first  # reused: same inodes, same mtimes

    (demo / "Qwen2-VL-tiny" / "model.safetensors").write_bytes(first["model.safetensors"][2][:100])
    _imported_by(FIRST_SCREEN, env)
    again = _files(demo / "Qwen2-VL-tiny")
    assert {k: v[2] for k, v in again.items()} == {k: v[2] for k, v in first.items()}  # rebuilt, same bytes
    assert sorted(os.listdir(demo)) == ["Qwen2-VL-tiny"] and os.listdir(tmp_path / "tmp") == []


def test_the_demo_files(tmp_path: Path) -> None:
    files = demo_files()
    assert {k: hashlib.sha256(v).hexdigest() for k, v in files.items()} == DIGESTS
    (tmp_path / "model.safetensors").write_bytes(files["model.safetensors"])
    state = load_file(tmp_path / "model.safetensors")
    assert {k: tuple(v.shape) for k, v in state.items()} == _shapes()
    for v in state.values():
        assert v.dtype == torch.bfloat16
        steps = (v.float() + 2) * 32  # every value is k / 32 - 2, k in 0..127
        assert torch.equal(steps, steps.round()) and steps.min() >= 0 and steps.max() <= 127
    assert len(torch.unique(state["model.embed_tokens.weight"].float())) == 128
