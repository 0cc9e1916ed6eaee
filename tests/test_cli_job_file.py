"""One job format everywhere: the wizard's TOML, --print_config's YAML and the seed tool's nested YAML
run as they are with `mmtui --replay` and `mm-convert --config`, and give what the flags give."""

from __future__ import annotations

import filecmp
import subprocess
from pathlib import Path

import pytest
import tomli_w
import yaml

from engine.job import Job, job_to_dict
from tests.test_cli import BIN, _bad, _nothing_written, hf_to_mm, mm_convert


def mmtui(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "mmtui"), *args], capture_output=True, text=True, timeout=300)


RUNNERS = {"replay": lambda job, *extra: mmtui("--replay", str(job), *extra),
           "config": lambda job, *extra: mm_convert("--config", str(job), *extra)}  # fmt: skip


def _same_tree(a: Path, b: Path) -> None:
    """Every file under a and b, byte for byte."""
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files_a == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for rel in files_a:
        assert filecmp.cmp(a / rel, b / rel, shallow=False), rel


def _job(hf: Path, out: Path, tp: int = 2) -> dict:
    cfg = {
        "mm_dir": str(out),
        "hf_config": {"hf_dir": str(hf)},
        "parallel_config": {"tp_size": tp, "llm_pp_layers": [[1, 3]], "vit_pp_layers": [[3, 0]]},
    }
    return {"converter": "Qwen2VLConverter", "command": "hf_to_mm", "cfg": cfg}


def _wizard_toml(path: Path, job: dict) -> Path:
    """The file exactly as the wizard saves it (screens/workbench.py: tomli_w.dumps(job_to_dict(job)))."""
    path.write_text(tomli_w.dumps(job_to_dict(Job.model_validate(job))))
    return path


@pytest.fixture
def direct_tp2(qwen2vl_dir: Path, tmp_path: Path) -> Path:
    r = hf_to_mm(qwen2vl_dir, tmp_path / "direct", tp=2)
    assert r.returncode == 0, r.stderr
    return tmp_path / "direct"


@pytest.mark.parametrize("runner", RUNNERS)
def test_the_wizards_toml_runs_as_it_is(qwen2vl_dir: Path, tmp_path: Path, direct_tp2: Path, runner: str) -> None:
    job = _wizard_toml(tmp_path / "job.toml", _job(qwen2vl_dir, tmp_path / "out"))
    assert job.read_text().startswith('converter = "Qwen2VLConverter"\ncommand = "hf_to_mm"\n')
    r = RUNNERS[runner](job)
    assert r.returncode == 0, r.stderr
    _same_tree(tmp_path / "out", direct_tp2)


@pytest.mark.parametrize("flags", ["", "=comments"])
def test_print_config_is_a_job_file(qwen2vl_dir: Path, tmp_path: Path, direct_tp2: Path, flags: str) -> None:
    r = hf_to_mm(qwen2vl_dir, tmp_path / "x", f"--print_config{flags}", tp=2)
    assert r.returncode == 0, r.stderr
    data = yaml.safe_load(r.stdout)
    assert list(data) == ["converter", "command", "cfg"]
    assert (data["converter"], data["command"]) == ("Qwen2VLConverter", "hf_to_mm")
    assert data["cfg"]["parallel_config"]["tp_size"] == 2
    for runner in RUNNERS:  # the printed text itself, only the output directory changed
        job = tmp_path / f"{runner}.yaml"
        job.write_text(r.stdout.replace(str(tmp_path / "x"), str(tmp_path / runner)))
        done = RUNNERS[runner](job)
        assert done.returncode == 0, done.stderr
        _same_tree(tmp_path / runner, direct_tp2)
    assert not (tmp_path / "x").exists()


def test_options_after_a_job_file_override_it(qwen2vl_dir: Path, tmp_path: Path) -> None:
    job = _wizard_toml(tmp_path / "job.toml", _job(qwen2vl_dir, tmp_path / "unused", tp=2))
    assert hf_to_mm(qwen2vl_dir, tmp_path / "direct_tp1", tp=1).returncode == 0
    for runner in RUNNERS:
        r = RUNNERS[runner](job, "--cfg.parallel_config.tp_size", "1", "--cfg.mm_dir", str(tmp_path / runner))
        assert r.returncode == 0, r.stderr
        _same_tree(tmp_path / runner, tmp_path / "direct_tp1")
    assert not (tmp_path / "unused").exists()
    r = mmtui("--replay", str(job), "--print_config")
    assert r.returncode == 0, r.stderr
    assert yaml.safe_load(r.stdout)["cfg"]["parallel_config"]["tp_size"] == 2


def test_the_seed_tools_nested_yaml(qwen2vl_dir: Path, tmp_path: Path, direct_tp2: Path) -> None:
    """`mm-convert --print_config Qwen2VLConverter hf_to_mm ...` of the seed tool (jsonargparse's nesting)."""
    cfg = _job(qwen2vl_dir, tmp_path / "seed")["cfg"]
    job = tmp_path / "seed.yaml"
    job.write_text(yaml.safe_dump({"Qwen2VLConverter": {"hf_to_mm": {"cfg": cfg}}}))
    r = mm_convert("--config", str(job))
    assert r.returncode == 0, r.stderr
    _same_tree(tmp_path / "seed", direct_tp2)


@pytest.mark.parametrize("suffix", [".toml", ".yaml"])
def test_a_cfg_only_file_with_the_converter_on_the_line(
    qwen2vl_dir: Path, tmp_path: Path, direct_tp2: Path, suffix: str
) -> None:
    data = {"cfg": _job(qwen2vl_dir, tmp_path / "out")["cfg"]}
    job = tmp_path / f"cfg{suffix}"
    job.write_text(tomli_w.dumps(data) if suffix == ".toml" else yaml.safe_dump(data))
    r = mm_convert("Qwen2VLConverter", "hf_to_mm", "--config", str(job))
    assert r.returncode == 0, r.stderr
    _same_tree(tmp_path / "out", direct_tp2)
    r = mm_convert("--config", str(job))  # alone it says neither what nor how
    _bad(r, f"mm-convert: error: {job}: names no converter and command; add them at the top (converter = "
            f'"Qwen2VLConverter", command = "hf_to_mm"), or give them: mm-convert CONVERTER COMMAND --config {job}')  # fmt: skip


BAD_HEADS = [
    ('converter = "Qwen2VLConvertr"\ncommand = "hf_to_mm"\n',
     "mm-convert: error: {job}: converter = 'Qwen2VLConvertr': unknown converter 'Qwen2VLConvertr'; did you mean Qwen2VLConverter?"),
    ('converter = "Qwen2VLConverter"\ncommand = "hf_to_mn"\n',
     "mm-convert: error: {job}: command = 'hf_to_mn': unknown command 'hf_to_mn'; did you mean hf_to_mm?"),
    ('converter = "Qwen2VLConverter"\n',
     'mm-convert: error: {job}: give both converter and command at the top (converter = "Qwen2VLConverter", '
     "command = \"hf_to_mm\"), got converter = 'Qwen2VLConverter', command = None"),
    ('converter = "Qwen2VLConverter"\ncommand = "hf_to_mm"\n[cfg]\nmm_dir = 3\n',
     "mm-convert: error: {job}: cfg.mm_dir = 3: Input is not a valid path"),
    ('converter = "Qwen2VLConverter"\ncommand = "hf_to_mm"\n[cfg\n', "mm-convert: error: {job}: not valid TOML ("),
]  # fmt: skip


@pytest.mark.parametrize(("text", "line"), BAD_HEADS)
def test_bad_job_files(tmp_path: Path, text: str, line: str) -> None:
    job = tmp_path / "job.toml"
    job.write_text(text)
    expected = line.format(job=job)
    for prog, r in (("mm-convert", mm_convert("--config", str(job))), ("mmtui", mmtui("--replay", str(job)))):
        _bad(r)
        assert r.stderr.startswith(expected.replace("mm-convert:", f"{prog}:", 1)), r.stderr
    _nothing_written(tmp_path, "job.toml")


def test_a_job_file_and_a_command_line_that_disagree(qwen2vl_dir: Path, tmp_path: Path) -> None:
    job = _wizard_toml(tmp_path / "job.toml", _job(qwen2vl_dir, tmp_path / "out"))
    r = mm_convert("Qwen2VLConverter", "mm_to_hf", "--config", str(job))
    _bad(r)
    assert (
        r.stderr
        == f"mm-convert: error: {job}: names Qwen2VLConverter hf_to_mm, the command line Qwen2VLConverter mm_to_hf\n"
    )
    r = mm_convert("--config", str(job), "Qwen2_5_VLConverter", "hf_to_mm")
    assert r.stderr == (
        f"mm-convert: error: {job}: names Qwen2VLConverter hf_to_mm, the command line Qwen2_5_VLConverter hf_to_mm\n"
    )
    _bad(mm_convert("--config", str(tmp_path / "nope.toml")), f"--config {tmp_path / 'nope.toml'}: no such file")
    _bad(mmtui("--demo", "--replay", str(job)), "--replay runs a job file alone; --demo does not go with it")
    _nothing_written(tmp_path, "job.toml")
