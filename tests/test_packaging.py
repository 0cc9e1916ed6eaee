"""A plain `pip install .` (a wheel, not the editable install the suite runs on) must hold every module.

The wheel once shipped `engine` without `engine/formats` and `mmtui` without its screens and widgets: the
package list named only the top-level packages, and the editable install hid it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ("engine", "mmtui", "presets")


def test_the_wheel_holds_every_module_preset_and_stylesheet(tmp_path: Path) -> None:
    # built from a copy of the sources alone: an egg-info left by an earlier build would list the files for it
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for top in SHIPPED:
        shutil.copytree(ROOT / top, src / top, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    out = tmp_path / "wheel"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out), str(src)],
        check=True,
        capture_output=True,
        cwd=tmp_path,
    )
    (wheel,) = out.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    want = {
        p.relative_to(ROOT).as_posix()
        for top in SHIPPED
        for p in (ROOT / top).rglob("*")
        if p.suffix in (".py", ".toml", ".tcss") and "__pycache__" not in p.parts
    }
    assert len(want) > 80
    assert sorted(want - names) == []
