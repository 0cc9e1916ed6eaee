"""No guessing: a flag is spelt out or refused, and the refusal names the one closest real flag."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from tests.test_cli import BIN, LAYOUT, _bad, _nothing_written, hf_to_mm, mm_convert
from tests.test_cli_job_file import _job, _wizard_toml, mmtui


def _state(tree: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(tree)): (p.read_bytes(), p.stat().st_mtime_ns) for p in tree.rglob("*") if p.is_file()}


def test_an_abbreviated_overwrite_replaces_nothing(qwen2vl_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "done"
    assert hf_to_mm(qwen2vl_dir, out).returncode == 0
    before = _state(out)
    r = hf_to_mm(qwen2vl_dir, out, "--cfg.overwr", "true", tp=2)
    _bad(r)
    assert r.stderr == "mm-convert: error: unrecognized arguments: --cfg.overwr true; did you mean --cfg.overwrite?\n"
    assert _state(out) == before


TYPOS = [
    (["--cfg.parallel_config.tp", "2"], "--cfg.parallel_config.tp 2", "--cfg.parallel_config.tp_size"),
    (["--cfg.parallel_config.tp=2"], "--cfg.parallel_config.tp=2", "--cfg.parallel_config.tp_size"),
    (["--cfg.parallel_config.llm_pp_layer", "[[1,3]]"], "--cfg.parallel_config.llm_pp_layer [[1,3]]",
     "--cfg.parallel_config.llm_pp_layers"),
    (["--cfg.hf_config.hf_dri", "x"], "--cfg.hf_config.hf_dri x", "--cfg.hf_config.hf_dir"),
    (["--cfg.lora.adapter_dri", "x"], "--cfg.lora.adapter_dri x", "--cfg.lora.adapter_dir"),
    (["--cfg.lora.parallel_config.tp", "2"], "--cfg.lora.parallel_config.tp 2", "--cfg.lora.parallel_config.tp_size"),
    (["--overwrite"], "--overwrite", "--cfg.overwrite"),
    (["--print_confg"], "--print_confg", "--print_config"),
]  # fmt: skip


@pytest.mark.parametrize(("extra", "given", "near"), TYPOS)
def test_a_typo_gets_the_closest_real_flag(
    qwen2vl_dir: Path, tmp_path: Path, extra: list[str], given: str, near: str
) -> None:
    r = hf_to_mm(qwen2vl_dir, tmp_path / "out", *extra)
    _bad(r)
    assert r.stderr == f"mm-convert: error: unrecognized arguments: {given}; did you mean {near}?\n"
    _nothing_written(tmp_path)


@pytest.mark.parametrize(("extra", "given", "near"), [t for t in TYPOS if t[2] != "--print_config"])
def test_the_flag_named_is_taken(qwen2vl_dir: Path, tmp_path: Path, extra: list[str], given: str, near: str) -> None:
    value = extra[1] if len(extra) > 1 else extra[0].partition("=")[2] or "true"
    r = hf_to_mm(qwen2vl_dir, tmp_path / "out", near, value, "--print_config")
    assert r.returncode == 0, r.stderr
    cfg = yaml.safe_load(r.stdout)["cfg"]
    keys = near.removeprefix("--cfg.").split(".")
    for k in keys[:-1]:
        cfg = cfg[k]
    assert cfg[keys[-1]] == yaml.safe_load(value)


def test_no_ambiguity_report_and_no_near_miss_invented(qwen2vl_dir: Path, tmp_path: Path) -> None:
    r = hf_to_mm(qwen2vl_dir, tmp_path / "out", "--cfg.parallel_config.llm_pp_lay", "[[1,3]]")
    _bad(r)
    assert "ambiguous" not in r.stderr and "did you mean --cfg.parallel_config.llm_pp_layers?" in r.stderr
    r = hf_to_mm(qwen2vl_dir, tmp_path / "out", "--cfg.bogus", "3")
    assert r.stderr == "mm-convert: error: unrecognized arguments: --cfg.bogus 3\n"
    _nothing_written(tmp_path)


@pytest.mark.parametrize(
    ("argv", "line"),
    [
        (["Qwen2VLConvertr", "hf_to_mm"], "unknown converter 'Qwen2VLConvertr'; did you mean Qwen2VLConverter?"),
        (["Qwen2VLConverter", "hf_to_m"], "unknown command 'hf_to_m'; did you mean hf_to_mm?"),
        (["Qwen2VLConverter"], "give a command after Qwen2VLConverter: hf_to_mm, mm_to_hf, resplit, hf_to_dcp, "
                               "dcp_to_hf, merge_lora, lora_hf_to_mm, lora_mm_to_hf"),
        (["--confg", "job.toml"], "unrecognized arguments: --confg; did you mean --config?"),
        (["--cfg.mm_dir", "x"], "unrecognized arguments: --cfg.mm_dir (options go after CONVERTER COMMAND)"),
        ([], "give a converter and a command (mm-convert -h lists them), or --config JOB"),
    ],
)  # fmt: skip
def test_names_above_the_command(argv: list[str], line: str) -> None:
    r = mm_convert(*argv)
    _bad(r)
    assert r.stderr == f"mm-convert: error: {line}\n"


def _mmtui(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "mmtui"), *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    ("argv", "line"),
    [
        (["--rep", "job.toml"], "mmtui: error: unrecognized arguments: --rep; did you mean --replay?"),
        (["--dem"], "mmtui: error: unrecognized arguments: --dem; did you mean --demo?"),
        (["verify", "a", "b", "--b.tp_sise", "2"],
         "mmtui verify: error: unrecognized arguments: --b.tp_sise 2; did you mean --b.tp_size?"),
        (["verify", "a", "b", "--b-t", "2"], "mmtui verify: error: unrecognized arguments: --b-t 2"),
        (["suggest", "d", "--pp", "2", "--vp", "2"], "mmtui suggest: error: unrecognized arguments: --vp 2; did you mean --vpp?"),
    ],
)  # fmt: skip
def test_mmtui_takes_no_abbreviations_either(argv: list[str], line: str) -> None:
    r = _mmtui(*argv)
    _bad(r)
    assert r.stderr == line + "\n"


def test_replay_overwrite(qwen2vl_dir: Path, tmp_path: Path) -> None:
    """`mmtui --replay job.toml` takes mm-convert's --cfg.overwrite true; a bare --overwrite is pointed to it."""
    job = _wizard_toml(tmp_path / "job.toml", _job(qwen2vl_dir, tmp_path / "out"))
    assert mmtui("--replay", str(job)).returncode == 0
    (tmp_path / "out" / "mine").write_text("x")
    before = _state(tmp_path / "out")
    _bad(mmtui("--replay", str(job)), "exists and is not empty")
    r = mmtui("--replay", str(job), "--overwrite")
    assert r.stderr == "mmtui: error: unrecognized arguments: --overwrite; did you mean --cfg.overwrite?\n"
    assert _state(tmp_path / "out") == before
    r = mmtui("--replay", str(job), "--cfg.overwrite", "true")
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / "out" / "mine").exists()


def test_the_non_empty_target_hint_names_the_real_flag(qwen2vl_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "x").write_text("mine")
    r = mm_convert(
        "Qwen2VLConverter", "hf_to_mm", "--cfg.mm_dir", str(out), "--cfg.hf_config.hf_dir", str(qwen2vl_dir), *LAYOUT
    )
    _bad(r, f"mm_dir {out}: exists and is not empty; choose a new directory or set overwrite (--cfg.overwrite true)")


def test_verify_names_its_real_flags_and_takes_mm_converts_fields(qwen2vl_dir: Path, tmp_path: Path) -> None:
    mm = tmp_path / "mm"
    assert hf_to_mm(qwen2vl_dir, mm, tp=2).returncode == 0
    r = _mmtui("verify", str(qwen2vl_dir), str(mm))  # no layout: the disk's
    assert r.returncode == 0, r.stdout + r.stderr
    fields = ["--b.tp_size", "2", "--b.llm_pp_layers", "[[1,3]]", "--b.vit_pp_layers", "[[3,0]]"]
    r = _mmtui("verify", str(qwen2vl_dir), str(mm), *fields)
    assert r.returncode == 0, r.stdout + r.stderr
    old = ["--b-tp", "2", "--b-llm-pp-layers", "[[1,3]]", "--b-vit-pp-layers", "[[3,0]]"]
    assert _mmtui("verify", str(qwen2vl_dir), str(mm), *old).returncode == 0
    r = _mmtui("verify", str(qwen2vl_dir), str(mm), *fields[2:])  # TP left at 1: the disk says otherwise
    _bad(r)
    r = _mmtui("verify", str(qwen2vl_dir), str(mm), *fields[:2], "--b.llm_pp_layers", "[[1,x]]")
    assert r.stderr == "mmtui verify: error: --b.llm_pp_layers = '[[1,x]]': Input should be a valid list\n"
