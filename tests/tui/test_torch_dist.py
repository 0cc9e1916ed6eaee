"""The wizard and Megatron-Core's torch_dist: the format is chosen beside the layout, planned, previewed chunk by
chunk, saved in the job file, run; a checkpoint opened from disk says which format it is."""

from __future__ import annotations

import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import torch
from textual.widgets import DataTable, Input, Label, Select, Static

from engine.job import Job, load_job, prepare
from engine.layout import ParallelConfig
from engine.planning.build import build_plan
from engine.run.execute import run
from engine.source.hf_source import inspect_hf
from mmtui.app import make_app
from tests.tui.test_workbench import _equal, _problems, settle

SMALL = ["common.pt", ".metadata", "metadata.json"]


def _cells(table: DataTable, column: int) -> list[str]:
    return [str(table.get_row_at(i)[column]) for i in range(table.row_count)]


def _rows(table: DataTable) -> list[tuple[str, ...]]:
    return [tuple(str(c) for c in table.get_row_at(i)) for i in range(table.row_count)]


def _written_chunks(release: Path) -> dict[str, set[tuple[str, str, str, str]]]:
    """What torch's own DCP reader finds in the written `.metadata`: per .distcp file, its chunks as
    (global name, global shape, offset, chunk shape), in the preview's words."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    meta = FileSystemReader(str(release)).read_metadata()
    out: dict[str, set[tuple[str, str, str, str]]] = {}
    for index, stored in meta.storage_data.items():
        md = meta.state_dict_metadata[index.fqn]
        if not isinstance(md, TensorStorageMetadata):
            continue
        (chunk,) = [c for c in md.chunks if tuple(c.offsets) == tuple(index.offset)]
        row = (
            index.fqn,
            f"({', '.join(map(str, md.size))})",
            f"@{list(index.offset)}",
            f"({', '.join(map(str, chunk.sizes))})",
        )
        out.setdefault(stored.relative_path, set()).add(row)
    return out


async def _choose(pilot, app, fmt: str) -> None:
    app.screen.query_one("#format", Select).value = fmt
    await settle(pilot, app)


async def test_torch_dist_from_the_wizard(tiny_llms: dict[str, Path], tmp_path: Path) -> None:
    """Llama at TP 2 / PP 2 as torch_dist: the header says so, the preview lists one .distcp file per rank with
    exactly the chunks torch's reader then finds in the written index, and the small files; the filter finds
    global and HF names; the saved job has format = "torch_dist" and replays to the same bytes."""
    hf = tiny_llms["llama"]
    out = tmp_path / "tui"
    app = make_app(hf, out_dir=out)
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(pilot, app)
        screen = app.screen
        assert screen.sub_title == "HF → Megatron / MindSpeed · legacy mp_rank files"
        await pilot.press("f3")
        screen.query_one("#tp", Input).value = "2"
        screen.query_one("#pp", Input).value = "2"
        await settle(pilot, app)
        await _choose(pilot, app, "torch_dist")
        assert screen.sub_title == "HF → Megatron / MindSpeed · torch_dist (Megatron-Core)"
        assert "for Megatron-LM" in str(screen.query_one("#format-users", Label).render())
        lines = _problems(screen).splitlines()
        stacked = "Megatron-Core torch_dist: decoder.layers: 4 layers stacked"
        assert lines[0] == "layout OK" and any(stacked in n for n in lines)
        await pilot.press("f4")
        preview = screen.query_one("#preview", DataTable)
        names = _cells(preview, 0)
        assert sorted(names[:4]) == [f"__{r}_0.distcp" for r in range(4)] and names[4:] == SMALL
        assert str(preview.border_title).startswith("torch_dist (Megatron-Core): 7 output files")
        assert [c.label.plain for c in preview.columns.values()][:2] == ["output file", "chunks"]

        # each file's chunk list: rank 2 is TP 0 of PP stage 1 (layers 2 and 3), Megatron's rank order
        shown: dict[str, set[tuple[str, str, str, str]]] = {}
        tensors = screen.query_one("#tensors", DataTable)
        for row, name in enumerate(names[:4]):
            preview.focus()
            preview.move_cursor(row=row)
            await pilot.press("enter")
            await pilot.pause()
            rows = _rows(tensors)
            shown[name] = {r[:4] for r in rows if r[4] != "bytes"}
            if name == "__2_0.distcp":
                assert ("decoder.layers.self_attention.linear_qkv.weight", "(4, 128, 64)", "@[2, 0, 0]", "(1, 64, 64)",
                        "float32", "16.4 kB") in rows  # fmt: skip
                gate_up = [r[2] for r in rows if r[0] == "decoder.layers.mlp.linear_fc1.weight"]
                assert gate_up == ["@[2, 0, 0]", "@[2, 128, 0]", "@[3, 0, 0]", "@[3, 128, 0]"]
                extra = [r[0] for r in rows if r[4] == "bytes"]
                assert "decoder.layers.self_attention.linear_qkv._extra_state/shard_2_4" in extra
                assert str(tensors.border_title).startswith(f"release/{name}: {len(rows)} chunks and byte entries")
        columns = [c.label.plain for c in tensors.columns.values()]
        assert columns == ["global tensor", "global shape", "offset", "chunk shape", "dtype", "bytes"]
        detail = str(screen.query_one("#tensor-detail", Static).render())
        assert detail.startswith(f"{rows[0][0]} {rows[0][1]} {rows[0][2]} {rows[0][3]}")

        # the filter: a global name, an HF name (the chunks made from it), a small file
        box = screen.query_one("#filter", Input)
        box.value = "linear_fc1.weight"
        await pilot.pause()
        assert sorted(_cells(preview, 0)) == sorted(names[:4])
        box.value = "gate_proj"
        await pilot.pause()
        preview.focus()
        preview.move_cursor(row=0)
        await pilot.press("enter")
        await pilot.pause()
        assert {r[0] for r in _rows(tensors)} == {"decoder.layers.mlp.linear_fc1.weight"}
        box.value = "metadata"
        await pilot.pause()
        assert _cells(preview, 0) == [".metadata", "metadata.json"]
        preview.focus()
        preview.move_cursor(row=1)
        await pilot.press("enter")
        await pilot.pause()
        assert '"sharded_backend": "torch_dist"' in str(screen.query_one("#tensor-detail", Static).render())
        box.value = ""
        await pilot.pause()

        await pilot.press("ctrl+s")
        await pilot.press("ctrl+r")
        await settle(pilot, app)
        assert "done" in str(screen.query_one("#status", Static).render())
    release = out / "release"
    assert sorted(p.name for p in release.iterdir()) == sorted([f"__{r}_0.distcp" for r in range(4)] + SMALL)
    assert _written_chunks(release) == shown
    saved = tomllib.loads((tmp_path / "tui.job.toml").read_text())
    assert saved["cfg"]["format"] == "torch_dist"
    assert load_job(tmp_path / "tui.job.toml").cfg.format == "torch_dist"
    replay = [str(Path(sys.executable).parent / "mmtui"), "--replay", str(tmp_path / "tui.job.toml")]
    r = subprocess.run([*replay, "--cfg.mm_dir", str(tmp_path / "replayed")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    for p in sorted(release.iterdir()):
        assert p.read_bytes() == (tmp_path / "replayed" / "release" / p.name).read_bytes(), p.name


async def test_a_format_the_model_cannot_take_is_one_line(
    tiny_llms: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the engine refuses to write the model as torch_dist, its one line is shown, the format is marked,
    there is no plan (Run refuses, nothing is written), and the app goes on: legacy plans again."""
    import engine.formats.torch_dist_writer as writer
    from engine.errors import ConvertError

    line = "format = torch_dist: Llama is refused by this test (use format legacy)"

    def refuse(*_, **__):
        raise ConvertError(line)

    monkeypatch.setattr(writer, "to_torch_dist", refuse)  # which families the engine refuses is its own business
    out = tmp_path / "out"
    app = make_app(tiny_llms["llama"], out_dir=out)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot, app)
        screen = app.screen
        await pilot.press("f3")
        await _choose(pilot, app, "torch_dist")
        assert _problems(screen) == line
        assert screen.query_one("#format", Select).has_class("-invalid") and screen.plan is None
        preview = screen.query_one("#preview", DataTable)
        assert preview.row_count == 0 and str(preview.border_title) == "no plan: see the problems below"
        await pilot.press("ctrl+r")
        await settle(pilot, app)
        assert not out.exists()
        await _choose(pilot, app, "legacy")
        assert _problems(screen) == "layout OK" and not screen.query_one("#format", Select).has_class("-invalid")
        assert _cells(preview, 0) == ["mp_rank_00"] and app.is_running and not app.crashed


async def test_toggling_the_format_quickly_plans_the_last_choice(
    tiny_llms: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Flip the format while slow plans are still running: what is shown at the end is the last choice's plan."""
    import mmtui.planning

    real = mmtui.planning.plan_form

    def slow(info, form):
        time.sleep(0.05)
        return real(info, form)

    monkeypatch.setattr(mmtui.planning, "plan_form", slow)
    app = make_app(tiny_llms["llama"], out_dir=tmp_path / "out")
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(pilot, app)
        screen = app.screen
        select = screen.query_one("#format", Select)
        preview = screen.query_one("#preview", DataTable)
        for last in ("torch_dist", "legacy"):
            for fmt in ("torch_dist", "legacy", "torch_dist", "legacy", last):
                select.value = fmt
                await pilot.pause()  # the edit is taken, its plan started; the next comes before it ends
            await settle(pilot, app)
            assert screen.job is not None and screen.job.cfg.format == last
            assert _cells(preview, 0)[0] == ("__0_0.distcp" if last == "torch_dist" else "mp_rank_00")
            assert screen.sub_title.endswith("torch_dist (Megatron-Core)" if last == "torch_dist" else "mp_rank files")


async def test_a_torch_dist_checkpoint_from_disk(tiny_llms: dict[str, Path], tmp_path: Path) -> None:
    """Opening a torch_dist directory says torch_dist beside it and in the header; Megatron -> HF gives back the
    original weights; re-cut, it becomes legacy rank files equal to a direct conversion, or torch_dist."""
    hf = tiny_llms["llama"]
    info = inspect_hf(hf)
    dist = tmp_path / "dist"
    cfg = {"mm_dir": str(dist), "hf_config": {"hf_dir": str(hf)}, "format": "torch_dist",
           "parallel_config": {"tp_size": 2, "llm_pp_layers": [[2, 2]]}}  # fmt: skip
    run(prepare(Job.model_validate({"converter": "LlamaConverter", "command": "hf_to_mm", "cfg": cfg}))[1], dist)
    legacy = tmp_path / "legacy"
    run(build_plan(info, ParallelConfig(llm_pp_layers=[[4]])), legacy)
    app = make_app(hf, out_dir=tmp_path / "back")
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot, app)
        screen = app.screen
        screen.query_one("#direction", Select).value = "mm_to_hf"
        screen.query_one("#src", Input).value = str(legacy)
        await settle(pilot, app)
        assert str(screen.query_one("#src-format", Label).render()).strip() == "legacy"
        screen.query_one("#src", Input).value = str(dist)
        await settle(pilot, app)
        assert str(screen.query_one("#src-format", Label).render()).strip() == "torch_dist"
        assert screen.sub_title == "Megatron → HF · from torch_dist (Megatron-Core)"
        assert str(screen.query_one("#layout-caption", Static).render()).startswith("torch_dist: tensors that do not")
        assert _problems(screen).startswith("layout OK"), _problems(screen)
        await pilot.press("ctrl+r")
        await settle(pilot, app)
        assert "done" in str(screen.query_one("#status", Static).render())

        screen.query_one("#direction", Select).value = "resplit"
        await settle(pilot, app)
        assert str(screen.query_one("#src-format", Label).render()).strip() == "torch_dist"
        assert screen.query_one("#src_tp", Input).value == "1"
        assert screen.sub_title == "Re-split Megatron · torch_dist → legacy mp_rank files"
        screen.query_one("#out", Input).value = str(tmp_path / "recut")
        screen.query_one("#pp", Input).value = "2"
        await settle(pilot, app)
        layers = screen.query_one("#grid").read()
        assert _problems(screen).startswith("layout OK"), _problems(screen)
        await pilot.press("ctrl+r")
        await settle(pilot, app)
        assert "done" in str(screen.query_one("#status", Static).render())
        await _choose(pilot, app, "torch_dist")  # and back to torch_dist, in another layout
        assert _problems(screen).startswith("layout OK"), _problems(screen)
        assert _cells(screen.query_one("#preview", DataTable), 0)[-3:] == SMALL
    from safetensors.torch import load_file

    def weights(d: Path) -> dict[str, torch.Tensor]:
        return {k: v for p in sorted(d.glob("*.safetensors")) for k, v in load_file(p).items()}

    original, restored = weights(hf), weights(tmp_path / "back")
    assert restored.keys() == original.keys() and all(torch.equal(restored[k], original[k]) for k in original)
    run(build_plan(info, ParallelConfig(llm_pp_layers=layers["llm"])), tmp_path / "headless")
    assert _equal(tmp_path / "recut", tmp_path / "headless")


async def test_grouped_gemm_for_a_mixture_of_experts(tiny_llms: dict[str, Path], tmp_path: Path) -> None:
    """Grouped GEMM is offered beside the format for a MoE model only; legacy writes GroupedMLP's weight1/weight2
    (Megatron-Core's names) in place of the local experts, as a headless conversion does, and is saved in the job."""
    app = make_app(tiny_llms["llama"], out_dir=tmp_path / "llama")
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot, app)
        await pilot.press("f3")
        assert not app.screen.query_one("#grouped_gemm", Select).display
    hf = tiny_llms["mixtral"]
    out = tmp_path / "tui"
    app = make_app(hf, out_dir=out)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot, app)
        screen = app.screen
        await pilot.press("f3")
        select = screen.query_one("#grouped_gemm", Select)
        assert select.display and select.region.right <= 80
        await _choose_gemm(pilot, app, "legacy")
        assert _problems(screen) == "layout OK"
        plan = screen.plan
        assert plan is not None
        keys = {e.key for e in plan.files[0].entries}
        assert {f"decoder.layers.{i}.mlp.experts.weight{n}" for i in range(4) for n in (1, 2)} <= keys
        assert not any("local_experts" in k for k in keys)
        await pilot.press("ctrl+s")
        await pilot.press("ctrl+r")
        await settle(pilot, app)
        assert "done" in str(screen.query_one("#status", Static).render())
    saved = tomllib.loads((tmp_path / "tui.job.toml").read_text())
    assert saved["cfg"]["parallel_config"]["moe_grouped_gemm"] == "legacy"
    run(build_plan(inspect_hf(hf), ParallelConfig(llm_pp_layers=[[4]], moe_grouped_gemm="legacy")), tmp_path / "headless")
    assert _equal(out, tmp_path / "headless")


async def _choose_gemm(pilot, app, value: str) -> None:
    app.screen.query_one("#grouped_gemm", Select).value = value
    await settle(pilot, app)
