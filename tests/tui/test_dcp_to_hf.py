"""Direction torch DCP → HF in the wizard: what hf_to_dcp wrote comes back as the original HF files, the same
bytes as a headless run of the same job and as its replay; a directory that is no DCP checkpoint is one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from textual.widgets import Checkbox, DataTable, Input, Label, Select, Static

from engine.formats.safetensors_header import read_header
from mmtui.app import make_app
from tests.tui.test_trust import _problems, _screen_lines
from tests.tui.test_workbench import settle


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def dcp_of(qwen2vl_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """qwen2vl_dir as hf_to_dcp writes it, made through the engine's job API."""
    from engine.job import HfConfig, HfToDcpConfig, Job, prepare
    from engine.run.execute import run

    out = tmp_path_factory.mktemp("dcp") / "qwen2vl-dcp"
    cfg = HfToDcpConfig(dcp_dir=out, hf_config=HfConfig(hf_dir=qwen2vl_dir))
    _, plan = prepare(Job(converter="Qwen2VLConverter", command="hf_to_dcp", cfg=cfg))
    run(plan, out)
    return out


async def _choose_dcp(pilot, app, src: Path) -> None:
    app.screen.query_one("#direction", Select).value = "dcp_to_hf"
    await settle(pilot, app)
    app.screen.query_one("#src", Input).value = str(src)
    await settle(pilot, app)


async def test_dcp_to_hf_from_the_wizard(qwen2vl_dir: Path, dcp_of: Path, tmp_path: Path) -> None:
    """No layout asked; the DCP dir is read where the Megatron dir is; the preview lists hf_dir's safetensors
    files; Run writes the same bytes as a headless run and as hf_dir itself; the saved job replays to them."""
    from engine.job import DcpToHfConfig, HfConfig, Job, prepare
    from engine.run.execute import run

    out = tmp_path / "tui"
    app = make_app(qwen2vl_dir, out_dir=out)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot, app)
        screen = app.screen
        await _choose_dcp(pilot, app, dcp_of)
        assert "mmtui — torch DCP → HF (FSDP2 or hf_to_dcp's)" in _screen_lines(app)[0]
        assert str(screen.query_one("#src-label", Label).render()) == "DCP dir"
        assert _problems(screen).startswith("layout OK"), _problems(screen)
        assert not screen.query_one("#grid").display and not screen.query_one("#lora").parent.display
        assert screen.query_one("#hf_dtype", Checkbox).parent.display
        assert screen.job is not None and screen.job.command == "dcp_to_hf" and screen.job.cfg.dcp_dir == dcp_of
        tick = screen.query_one("#hf_dtype", Checkbox)
        for ticked in (True, False):  # FSDP2's float32 of a bf16 model: written in hf_dir's dtypes
            tick.value = ticked
            await settle(pilot, app)
            assert screen.job is not None and screen.job.cfg.hf_dtype is ticked
        await pilot.press("f4")
        preview = screen.query_one("#preview", DataTable)
        names = [str(preview.get_cell_at((r, 0))) for r in range(preview.row_count)]
        shards = sorted(p.name for p in qwen2vl_dir.glob("*.safetensors"))
        assert sorted(n for n in names if n.endswith(".safetensors")) == shards
        await pilot.press("ctrl+s")
        await pilot.press("ctrl+r")
        await settle(pilot, app)
        assert "done" in str(screen.query_one("#status", Static).render())
        await pilot.press("ctrl+t")  # verify: every tensor read again from the DCP chunks, against the written bytes
        await settle(pilot, app)
        status = str(screen.query_one("#status", Static).render())
        n = sum(len(read_header(p)) for p in qwen2vl_dir.glob("*.safetensors"))
        assert status == f"verify: identical: {n} tensors ({n} equal)", status
    cfg = DcpToHfConfig(dcp_dir=dcp_of, hf_config=HfConfig(hf_dir=qwen2vl_dir), save_hf_dir=tmp_path / "headless")
    _, plan = prepare(Job(converter="Qwen2VLConverter", command="dcp_to_hf", cfg=cfg))
    run(plan, tmp_path / "headless")
    tui = _files(out)
    assert tui == _files(tmp_path / "headless")
    original = {n: b for n, b in _files(qwen2vl_dir).items() if n.endswith(".safetensors")}
    assert original and {n: b for n, b in tui.items() if n.endswith(".safetensors")} == original
    replay = [str(Path(sys.executable).parent / "mmtui"), "--replay", str(tmp_path / "tui.job.toml")]
    r = subprocess.run([*replay, "--cfg.save_hf_dir", str(tmp_path / "replayed")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert _files(tmp_path / "replayed") == tui


@pytest.fixture(scope="module")
def torch_dist_of(qwen2vl_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """qwen2vl_dir as a Megatron-Core torch_dist checkpoint: DCP files too, but mm_to_hf's to read."""
    from engine.job import HfConfig, HfToMmConfig, Job, prepare
    from engine.layout import ParallelConfig
    from engine.planning.balance import suggest
    from engine.run.execute import run
    from engine.source.hf_source import inspect_hf

    out = tmp_path_factory.mktemp("td") / "qwen2vl-td"
    layers = suggest(inspect_hf(qwen2vl_dir), 1, 1, "params").layers
    layout = ParallelConfig(tp_size=1, **{f"{m}_pp_layers": v for m, v in layers.items()})
    cfg = HfToMmConfig(mm_dir=out, hf_config=HfConfig(hf_dir=qwen2vl_dir), parallel_config=layout, format="torch_dist")
    _, plan = prepare(Job(converter="Qwen2VLConverter", command="hf_to_mm", cfg=cfg))
    run(plan, out)
    return out


@pytest.mark.parametrize("bad", ["empty", "torch_dist", "garbage", "missing"])
async def test_a_bad_dcp_dir_is_one_line(bad: str, qwen2vl_dir: Path, torch_dist_of: Path, tmp_path: Path) -> None:
    """The engine's one line, the DCP dir marked, no plan (Run refuses, nothing written), and no crash."""
    src = {"empty": tmp_path / "empty", "torch_dist": torch_dist_of, "garbage": tmp_path / "garbage"}
    src["missing"] = tmp_path / "nope"
    (tmp_path / "empty").mkdir()
    (tmp_path / "garbage").mkdir()
    (tmp_path / "garbage" / ".metadata").write_bytes(b"not a pickle at all")
    expected = {
        "empty": f"dcp_dir {src['empty']}: no .metadata (torch DCP's index) and no latest_checkpointed_iteration.txt;"
        " expected a DCP directory (release/ or iter_NNNNNNN/) or the save directory holding it",
        "torch_dist": f"dcp_dir {torch_dist_of}: a Megatron-Core torch_dist checkpoint (metadata.json); mm_to_hf reads it",
        "missing": f"dcp_dir {src['missing']}: no such directory",
    }
    out = tmp_path / "out"
    app = make_app(qwen2vl_dir, out_dir=out)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot, app)
        screen = app.screen
        await _choose_dcp(pilot, app, src[bad])
        lines = _problems(screen).splitlines()
        assert len(lines) == 1, lines
        if bad in expected:
            assert lines[0] == expected[bad]
        else:
            assert lines[0].startswith(f"{src[bad] / '.metadata'}: unreadable torch DCP index ("), lines[0]
        assert screen.query_one("#src", Input).has_class("-invalid")
        assert not screen.query_one("#out", Input).has_class("-invalid")
        assert screen.plan is None and screen.job is None
        await pilot.press("ctrl+r")
        await settle(pilot, app)
        screen.query_one("#src", Input).value = ""
        await settle(pilot, app)
        assert _problems(screen) == "DCP dir is empty: give the checkpoint to read"
    assert not out.exists()
