"""The wizard's preview says what Run would refuse about the target: an input in the way, a plan too big."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.run import target as target_mod
from engine.source.hf_source import inspect_hf
from mmtui.planning import Form, plan_form


def _form(hf: Path, out: Path) -> Form:
    return Form(
        direction="hf_to_mm", hf_dir=str(hf), src="", src_tp="1", src_ep="1", src_llm="", src_vit="", out=str(out),
        lora="", lora_r="", lora_alpha="", overwrite=True, tp="1", ep="1", layers={"vit": [[3]], "llm": [[4]]},
        cost="params",
    )  # fmt: skip


def test_a_target_inside_the_input_is_flagged(qwen2vl_dir: Path) -> None:
    planned = plan_form(inspect_hf(qwen2vl_dir), _form(qwen2vl_dir, qwen2vl_dir / "mm"))
    assert "out" in planned.bad_fields
    assert f"mm_dir {qwen2vl_dir}/mm: lies inside the input hf_config.hf_dir {qwen2vl_dir}; " in planned.notes[-1]


def test_a_plan_that_will_not_fit_is_flagged(
    qwen2vl_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    info = inspect_hf(qwen2vl_dir)
    assert plan_form(info, _form(qwen2vl_dir, tmp_path / "out")).bad_fields == set()
    monkeypatch.setattr(target_mod, "free_bytes", lambda _p: 64_000)
    planned = plan_form(info, _form(qwen2vl_dir, tmp_path / "out"))
    assert planned.bad_fields == {"out"}
    assert planned.notes[-1] == f"will not fit: needs 0.9 MB, 0.1 MB free on {tmp_path}; Run will refuse it"
