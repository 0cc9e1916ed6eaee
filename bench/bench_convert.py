"""hf_to_mm, mm_to_hf and resplit against `cp -r` + `sync` of the same checkpoint, side by side in one run.

Each round runs the copy and every layout once, in turn, each starting after a `sync`
with a warm page cache for the source (`--cold`: an empty one, as on a first conversion);
the table reports medians over rounds (this machine's disk throughput varies 2-3x from
minute to minute, so single runs mislead).
Peak RSS is the converter process's own `ru_maxrss` from wait4.

    python bench/bench_convert.py /work/bench-data/qwen2vl-2b --rounds 5 [--cold]

`--runs llm_copy,llm_legacy,llm_torch_dist` times Megatron-Core's torch_dist against legacy rank files on the
same model's language model alone (Qwen2, TP 2 / PP 4), made once from the VLM's files in the work directory
(torch_dist is written for GPT language models); those rows' ratios are to `llm_copy`.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

LAYOUTS = {
    "tp1pp1": (1, "[[28]]", "[[32]]"),
    "tp2pp4": (2, "[[1,9,9,9]]", "[[32,0,0,0]]"),
    "tp1pp2": (1, "[[10,18]]", "[[32,0]]"),
}


def timed(cmd: list[str]) -> tuple[float, int]:
    """Wall seconds of cmd followed by sync, and cmd's peak RSS in bytes."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode() if proc.stderr else ""
    if proc.returncode:
        raise SystemExit(f"{cmd[0]} failed ({proc.returncode}): {err.strip()}")
    subprocess.run(["sync"], check=True)
    return time.perf_counter() - start, usage.ru_maxrss * 1024


MM_CONVERT = str(Path(sys.executable).parent / "mm-convert")


def _layout_args(prefix: str, layout: str) -> list[str]:
    tp, llm, vit = LAYOUTS[layout]
    return [
        f"--cfg.{prefix}.llm_pp_layers",
        llm,
        f"--cfg.{prefix}.vit_pp_layers",
        vit,
        f"--cfg.{prefix}.tp_size",
        str(tp),
    ]


def convert_cmd(hf: Path, out: Path, layout: str) -> list[str]:
    return [
        MM_CONVERT, "Qwen2VLConverter", "hf_to_mm", "--cfg.mm_dir", str(out), "--cfg.hf_config.hf_dir", str(hf),
        *_layout_args("parallel_config", layout),
    ]  # fmt: skip


def mm_to_hf_cmd(hf: Path, mm: Path, out: Path) -> list[str]:
    return [
        MM_CONVERT, "Qwen2VLConverter", "mm_to_hf", "--cfg.save_hf_dir", str(out), "--cfg.mm_dir", str(mm),
        "--cfg.hf_config.hf_dir", str(hf), *_layout_args("parallel_config", "tp2pp4"),
    ]  # fmt: skip


def resplit_cmd(hf: Path, mm: Path, out: Path) -> list[str]:
    return [
        MM_CONVERT, "Qwen2VLConverter", "resplit", "--cfg.source_dir", str(mm), "--cfg.target_dir", str(out),
        "--cfg.hf_config.hf_dir", str(hf), *_layout_args("source_parallel_config", "tp2pp4"),
        *_layout_args("target_parallel_config", "tp1pp2"),
    ]  # fmt: skip


LLM_LAYOUT = ["--cfg.parallel_config.tp_size", "2", "--cfg.parallel_config.llm_pp_layers", "[[4,8,8,8]]"]


def llm_cmd(llm: Path, out: Path, fmt: str) -> list[str]:
    return [
        MM_CONVERT, "Qwen2Converter", "hf_to_mm", "--cfg.mm_dir", str(out), "--cfg.hf_config.hf_dir", str(llm),
        *LLM_LAYOUT, "--cfg.format", fmt,
    ]  # fmt: skip


def make_llm(hf: Path, out: Path) -> Path:
    """The VLM's language model as a Qwen2ForCausalLM directory (its tensors, renamed; config's text fields)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    if (out / "config.json").exists():
        return out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    config = json.loads((hf / "config.json").read_text())
    config = config | config.get("text_config", {})
    config = {k: v for k, v in config.items() if k not in ("vision_config", "text_config")}
    config |= {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}
    config.pop("rope_scaling", None)
    for f in sorted(hf.glob("*.safetensors")):
        state = {}
        with safe_open(f, "pt") as sf:
            for k in sf.keys():  # noqa: SIM118 - safe_open is not a mapping
                name = k.replace("model.language_model.", "model.")
                if name.startswith(("model.layers.", "model.embed_tokens.", "model.norm.", "lm_head.")):
                    state[name] = sf.get_tensor(k)
        save_file(state, out / f.name, metadata={"format": "pt"})
        del state
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def command(name: str, hf: Path, mm: Path, out: Path, llm: Path | None = None) -> list[str]:
    if name == "copy":
        return ["cp", "-r", str(hf), str(out)]
    if name.startswith("llm_"):
        assert llm is not None
        if name == "llm_copy":
            return ["cp", "-r", str(llm), str(out)]
        return llm_cmd(llm, out, name.removeprefix("llm_"))
    if name == "mm_to_hf":
        return mm_to_hf_cmd(hf, mm, out)
    if name == "resplit":
        return resplit_cmd(hf, mm, out)
    return convert_cmd(hf, out, name)


LABELS = {
    "copy": "cp -r + sync",
    "llm_copy": "language model alone: cp -r + sync",
    "llm_legacy": "LM hf_to_mm tp2pp4 legacy + sync",
    "llm_torch_dist": "LM hf_to_mm tp2pp4 torch_dist + sync",
    "mm_to_hf": "mm_to_hf tp2pp4 -> HF + sync",
    "resplit": "resplit tp2pp4 -> tp1pp2 + sync",
}


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("hf_dir", type=Path)
    ap.add_argument("--work", type=Path, default=Path("/work/bench-data/run"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--runs", default="tp1pp1,tp2pp4,mm_to_hf,resplit", help="hf_to_mm layouts, mm_to_hf, resplit")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--cold", action="store_true", help="drop the page cache before every run (needs root)")
    args = ap.parse_args()
    names = args.runs.split(",")
    args.work.mkdir(parents=True, exist_ok=True)
    mm = args.work / "source-tp2pp4"  # the Megatron source of mm_to_hf and resplit, made once
    if {"mm_to_hf", "resplit"} & set(names) and not (mm / "latest_checkpointed_iteration.txt").exists():
        shutil.rmtree(mm, ignore_errors=True)
        subprocess.run(convert_cmd(args.hf_dir, mm, "tp2pp4"), check=True)
    llm = None
    if any(n.startswith("llm_") for n in names):
        llm = args.work / "qwen2-lm"
        # in a child: the tensors it loads would otherwise count in every later child's peak RSS (inherited)
        child = multiprocessing.get_context("spawn").Process(target=make_llm, args=(args.hf_dir, llm))
        child.start()
        child.join()
        if child.exitcode:
            raise SystemExit(f"making {llm} failed")
    sources = [*args.hf_dir.iterdir(), *(p for p in mm.rglob("*") if p.is_file())]
    sources += [*llm.iterdir()] if llm else []
    for f in [] if args.cold else sources:  # warm the page cache for the sources, as a re-run would find them
        with open(f, "rb") as fh:
            while fh.read(64 << 20):
                pass
    subprocess.run(["sync"], check=True)
    base = ["copy"] if any(not n.startswith("llm_") for n in names) else []
    runs: dict[str, list[tuple[float, int, int]]] = {name: [] for name in dict.fromkeys([*base, *names])}
    for _ in range(args.rounds):
        for name in runs:
            out = args.work / name
            shutil.rmtree(out, ignore_errors=True)
            subprocess.run(["sync"], check=True)
            if args.cold:  # every source byte comes from the disk, as on a first conversion
                Path("/proc/sys/vm/drop_caches").write_text("1\n")
            time.sleep(1)
            cmd = command(name, args.hf_dir, mm, out, llm)
            wall, rss = timed(cmd)
            runs[name].append((wall, rss, du(out)))
            shutil.rmtree(out)
    copies = {c: statistics.median(w for w, _, _ in runs[c]) for c in ("copy", "llm_copy") if c in runs}
    rows = []
    cache = "cold page cache" if args.cold else "sources in the page cache"
    print(f"source: {args.hf_dir} ({du(args.hf_dir) / 1e9:.2f} GB), {cache}, {args.rounds} rounds, medians\n")
    print("| run | wall s (median) | all runs | ratio to copy | peak RSS MB | output GB |")
    print("|---|---|---|---|---|---|")
    for name, rs in runs.items():
        wall = statistics.median(w for w, _, _ in rs)
        rss = max(r for _, r, _ in rs)
        copy_wall = copies["llm_copy" if name.startswith("llm_") and "llm_copy" in copies else "copy"]
        row = {"run": name, "wall": wall, "walls": [w for w, _, _ in rs], "ratio": wall / copy_wall,
               "peak_rss_mb": rss / 2**20, "output_gb": rs[0][2] / 1e9}  # fmt: skip
        rows.append(row)
        label = LABELS.get(name, f"hf_to_mm {name} + sync")
        walls = " ".join(f"{w:.1f}" for w in row["walls"])
        ratio, rss_mb, gb = row["ratio"], row["peak_rss_mb"], row["output_gb"]
        print(f"| {label} | {wall:.2f} | {walls} | {ratio:.2f}x | {rss_mb:.0f} | {gb:.2f} |")
    print("\ncommands:")
    for name in names:
        print("  " + " ".join(command(name, args.hf_dir, mm, Path("OUT"), llm)))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
