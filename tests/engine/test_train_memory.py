"""Will it fit: parameters per rank counted by hand from the safetensors headers and the layout,
and Megatron-LM's bytes per parameter (docs/user-guide/features/dist_optimizer.md): 18, or
6 + 12/d with the distributed optimizer (d / EP for expert weights)."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
from pathlib import Path

import pytest
from safetensors import safe_open

from engine.errors import ConvertError
from engine.layout import ParallelConfig
from engine.planning.balance import human_params
from engine.planning.build import build_plan
from engine.planning.train_memory import GIB, RankMemory, fits, human_bytes, train_memory
from engine.source.hf_source import inspect_hf


def _shapes(hf_dir: Path) -> dict[str, list[int]]:
    out = {}
    for f in sorted(hf_dir.glob("*.safetensors")):
        with safe_open(str(f), "pt") as sf:
            for name in sf.keys():  # noqa: SIM118 (safe_open is not a dict)
                out[name] = sf.get_slice(name).get_shape()
    return out


def _numel(shape: list[int]) -> int:
    return math.prod(shape)


def _stage_of_layers(counts: list[list[int]]) -> list[int]:
    """Global layer -> stage, cells filled chunk-major (chunk 0 stages 0..P-1, then chunk 1, ...)."""
    out = []
    for chunk in counts:
        for stage, n in enumerate(chunk):
            out += [stage] * n
    return out


def _by_hand(
    hf_dir: Path, counts: list[list[int]], tp: int, ep: int, tied: bool, vocab_rows: int | None = None
) -> dict[tuple[int, int, int], tuple[int, int]]:
    """(tp, pp, ep) -> (parameters, of which expert) for a Llama-like model: norms and the router
    are whole on every TP rank, everything else is cut in TP equal parts; expert x of E goes to EP
    rank x // (E / ep); the embedding sits on the first stage, final norm and output layer (a
    tied one as a copy when PP > 1) on the last; `vocab_rows` pads both tables."""
    shapes = _shapes(hf_dir)
    stage_of = _stage_of_layers(counts)
    pp = len(counts[0])
    n_experts = 1 + max((int(m[1]) for k in shapes if (m := re.search(r"experts\.(\d+)\.", k))), default=0)
    out = {(t, s, e): [0, 0] for t in range(tp) for s in range(pp) for e in range(ep)}

    def add(stage: int, numel: int, whole: bool, expert: int | None = None) -> None:
        for t, s, e in out:
            if s != stage or (expert is not None and e != expert // (n_experts // ep)):
                continue
            out[(t, s, e)][0] += numel if whole else numel // tp
            out[(t, s, e)][1] += 0 if expert is None else numel // tp

    for name, shape in shapes.items():
        n = _numel(shape)
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            n = (vocab_rows or shape[0]) * shape[1]
        if name == "model.embed_tokens.weight":
            add(0, n, whole=False)
            if tied and pp > 1:
                add(pp - 1, n, whole=False)
        elif name == "lm_head.weight":
            add(pp - 1, n, whole=False)
        elif name == "model.norm.weight":
            add(pp - 1, n, whole=True)
        else:
            stage = stage_of[int(name.split(".")[2])]
            expert = re.search(r"experts\.(\d+)\.", name)
            whole = name.endswith("layernorm.weight") or ".block_sparse_moe.gate." in name
            add(stage, n, whole, int(expert[1]) if expert else None)
    return {k: (p, x) for k, (p, x) in out.items()}


def _bytes(params: int, expert: int, dp: int, ep: int, distributed: bool) -> int:
    dense = params - expert
    optimizer = 12 * (-(-dense // dp) + -(-expert // (dp // ep))) if distributed else 12 * params
    return 2 * params + 4 * params + optimizer


CASES = [
    # fixture, llm_pp_layers, tp, ep, dp, tied
    ("mixtral", [[1, 3]], 2, 2, 4, False),
    ("mixtral", [[2, 2]], 1, 4, 8, False),
    ("mixtral", [[4]], 2, 1, 3, False),
    ("qwen2_tied", [[2, 2]], 2, 1, 3, True),
    ("qwen2_tied", [[4]], 1, 1, 5, True),
    ("qwen2_tied", [[1, 1], [1, 1]], 2, 1, 2, True),  # VPP: a rank holds both chunks
    ("llama", [[1, 2, 1]], 2, 1, 7, False),
]


@pytest.mark.parametrize("name,counts,tp,ep,dp,tied", CASES)
@pytest.mark.parametrize("distributed", [False, True])
def test_every_rank_by_hand(
    tiny_llms: dict[str, Path],
    name: str,
    counts: list[list[int]],
    tp: int,
    ep: int,
    dp: int,
    tied: bool,
    distributed: bool,
) -> None:
    hf = tiny_llms[name]
    layout = ParallelConfig(llm_pp_layers=counts, tp_size=tp, ep_size=ep)
    got = train_memory(inspect_hf(hf), layout, dp, distributed)
    want = {k: (p, x if ep > 1 else 0) for k, (p, x) in _by_hand(hf, counts, tp, ep, tied).items()}
    assert {(r.tp_rank, r.pp_rank, r.ep_rank): (r.params, r.expert_params) for r in got} == want
    for r in got:
        assert (r.weights, r.grads) == (2 * r.params, 4 * r.params)
        assert r.total == _bytes(r.params, r.expert_params, dp, ep, distributed)
        tail = f"_{r.pp_rank:03d}" if len(counts[0]) > 1 else ""
        assert r.label == f"mp_rank_{r.tp_rank:02d}{tail}" + (f"_{r.ep_rank:03d}" if ep > 1 else "")


def test_numbers_of_one_rank_written_out(tiny_llms: dict[str, Path]) -> None:
    """Tiny Mixtral (hidden 64, 4 layers, 4 experts of 3 x 64 x 128, vocab 128), TP2 PP2 EP2,
    layers [[1,3]], rank mp_rank_01_001_001, by arithmetic alone."""
    layout = ParallelConfig(llm_pp_layers=[[1, 3]], tp_size=2, ep_size=2)
    ranks = {r.label: r for r in train_memory(inspect_hf(tiny_llms["mixtral"]), layout, 4, True)}
    attn = (64 * 64 + 32 * 64 + 32 * 64 + 64 * 64) // 2  # q, k, v, o cut in 2
    dense = 3 * (attn + 64 + 64 + 4 * 64) + 64 + 128 * 64 // 2  # 3 layers: + 2 norms + router; final norm, output
    expert = 3 * 2 * (3 * 64 * 128 // 2)  # 3 layers x experts 2, 3 of 4 x w1, w2, w3 cut in 2
    assert (dense, expert) == (23_744, 73_728)
    r = ranks["mp_rank_01_001_001"]
    assert (r.params, r.expert_params) == (97_472, 73_728)
    assert (r.weights, r.grads) == (194_944, 389_888)
    assert r.optimizer == 12 * (5_936 + 36_864) == 513_600  # dense over dp 4, experts over dp / ep = 2
    assert r.total == 1_098_432


def test_padded_vocabulary_counts_as_held(tiny_llms: dict[str, Path]) -> None:
    """Vocabulary 128 padded to a multiple of 48 x TP 2 = 96: 192 rows in each table."""
    hf = tiny_llms["qwen2_tied"]
    layout = ParallelConfig(llm_pp_layers=[[2, 2]], tp_size=2, make_vocab_size_divisible_by=48)
    got = {(r.tp_rank, r.pp_rank, r.ep_rank): (r.params, 0) for r in train_memory(inspect_hf(hf), layout)}
    assert got == _by_hand(hf, [[2, 2]], 2, 1, tied=True, vocab_rows=192)


def test_vision_language_model_at_tp1(qwen2vl_dir: Path) -> None:
    """TP 1: a stage holds whole tensors, so its parameters are the sums of what it holds."""
    shapes = _shapes(qwen2vl_dir)
    vit = sum(_numel(s) for k, s in shapes.items() if k.startswith("visual."))
    layer = {i: sum(_numel(s) for k, s in shapes.items() if k.startswith(f"model.layers.{i}.")) for i in range(4)}
    embed, head = _numel(shapes["model.embed_tokens.weight"]), _numel(shapes["lm_head.weight"])
    norm = _numel(shapes["model.norm.weight"])
    layout = ParallelConfig(vit_pp_layers=[[3, 0]], llm_pp_layers=[[1, 3]])
    got = [r.params for r in train_memory(inspect_hf(qwen2vl_dir), layout)]
    assert got == [vit + embed + layer[0], layer[1] + layer[2] + layer[3] + norm + head]


def test_a_plan_gives_the_same_as_the_model(tiny_llms: dict[str, Path]) -> None:
    info = inspect_hf(tiny_llms["mixtral"])
    layout = ParallelConfig(llm_pp_layers=[[1, 3]], tp_size=2, ep_size=2)
    for dist in (False, True):
        assert train_memory(build_plan(info, layout), layout, 4, dist) == train_memory(info, layout, 4, dist)


def test_megatron_bytes_per_parameter(tiny_llms: dict[str, Path]) -> None:
    """Dense model, whole numbers of parameters per DP rank: exactly 18 and 6 + 12/d bytes each."""
    info = inspect_hf(tiny_llms["llama"])
    layout = ParallelConfig(llm_pp_layers=[[4]])
    (plain,) = train_memory(info, layout, 8, False)
    (dist,) = train_memory(info, layout, 8, True)
    assert plain.params % 8 == 0
    assert plain.total == 18 * plain.params
    assert dist.total == 6 * plain.params + 12 * plain.params // 8
    assert train_memory(info, layout, 8, False) == train_memory(info, layout, 1, False)  # dp matters only sharded


@pytest.mark.parametrize(
    "dp,message",
    [
        (0, "dp = 0: give the data-parallel size as a whole number >= 1"),
        (-2, "dp = -2: give the data-parallel size as a whole number >= 1"),
        (True, "dp = True: give the data-parallel size as a whole number >= 1"),
        (2.0, "dp = 2.0: give the data-parallel size as a whole number >= 1"),
        (
            3,
            "dp = 3: with ep_size 2 the data-parallel size must be a multiple of 2 "
            "(the expert data-parallel group has dp / ep ranks)",
        ),
    ],
)
def test_bad_data_parallel_sizes(tiny_llms: dict[str, Path], dp: object, message: str) -> None:
    layout = ParallelConfig(llm_pp_layers=[[4]], ep_size=2)
    with pytest.raises(ConvertError) as e:
        train_memory(inspect_hf(tiny_llms["mixtral"]), layout, dp, True)  # type: ignore[arg-type]
    assert str(e.value) == message


def test_a_plan_of_another_layout_is_refused(tiny_llms: dict[str, Path]) -> None:
    info = inspect_hf(tiny_llms["llama"])
    plan = build_plan(info, ParallelConfig(llm_pp_layers=[[2, 2]]))
    with pytest.raises(ConvertError) as e:
        train_memory(plan, ParallelConfig(llm_pp_layers=[[2, 2]], tp_size=2))
    assert str(e.value) == (
        "the plan does not match the layout: it holds 2 Megatron rank file(s), TP 2 x PP 2 x EP 1 has 4; "
        "give the plan built for this layout"
    )
    from engine.planning.build import build_dcp_plan  # one torch.distributed.checkpoint file, not rank files

    with pytest.raises(ConvertError) as e:
        train_memory(build_dcp_plan(info), ParallelConfig(llm_pp_layers=[[4]]))
    assert str(e.value) == (
        "the plan does not match the layout: it holds 0 Megatron rank file(s) and 1 dcp file(s), "
        "TP 1 x PP 1 x EP 1 has 1; give the plan built for this layout"
    )


def _rank(total: int) -> RankMemory:
    return RankMemory(0, 0, 0, "mp_rank_00", total, 0, total, 0, 0)


def test_fits_and_its_words() -> None:
    ranks = [_rank(GIB), _rank(64 * GIB), _rank(3)]
    assert fits(ranks, 64) == (True, "fits on 64 GiB: 64.0 GiB / rank at most")
    assert fits(ranks, 63.5) == (False, "does not fit on 63.5 GiB: mp_rank_00 needs 64.0 GiB")
    assert fits([_rank(51 * GIB + GIB // 5)], 64) == (True, "fits on 64 GiB: 51.2 GiB / rank at most")


@pytest.mark.parametrize("bad", [0, -1, math.nan, math.inf, True, "64"])
def test_bad_device_memory(bad: object) -> None:
    with pytest.raises(ConvertError) as e:
        fits([_rank(1)], bad)  # type: ignore[arg-type]
    assert str(e.value) == f"device memory = {bad!r}: give the device's memory in GiB, a number > 0"


@pytest.mark.parametrize(
    "n,text",
    [(0, "0 B"), (1023, "1023 B"), (1024, "1.00 KiB"), (5 << 20, "5.00 MiB"), (51 * GIB + GIB // 5, "51.2 GiB")],
)
def test_human_bytes(n: int, text: str) -> None:
    assert human_bytes(n) == text


def _suggest_cli(*args: str) -> subprocess.CompletedProcess:
    from tests.test_cli import BIN

    env = {**os.environ, "COLUMNS": "200"}  # no wrapping: lines are compared whole
    return subprocess.run([str(BIN / "mmtui"), "suggest", *args], capture_output=True, text=True, env=env)


@pytest.mark.parametrize(
    "device_gib,fits_plain,fits_dist", [(1, True, True), (0.0005, False, True), (0.0002, False, False)]
)
def test_suggest_command_line_will_it_fit(
    tiny_llms: dict[str, Path], device_gib: float, fits_plain: bool, fits_dist: bool
) -> None:
    """`mmtui suggest --tp 2 --dp 4 --device-gb G`: every stage's TP ranks on one row with the
    counts by hand, one verdict per optimizer; exit 1 only when neither fits."""
    hf = tiny_llms["llama"]
    r = _suggest_cli(str(hf), "--pp", "2", "--tp", "2", "--dp", "4", "--device-gb", str(device_gib))
    assert r.returncode == (0 if fits_dist else 1), r.stderr
    lines = r.stdout.splitlines()
    flag = next(line for line in lines if line.startswith("--cfg.parallel_config.llm_pp_layers "))
    counts = json.loads(flag.split(" ", 1)[1])
    assert "--cfg.parallel_config.tp_size 2" in lines
    want = _by_hand(hf, counts, 2, 1, tied=False)
    assert want[(0, 0, 0)] == want[(1, 0, 0)] and want[(0, 1, 0)] == want[(1, 1, 0)]
    start = lines.index(next(line for line in lines if line.split()[:2] == ["stage", "TP"]))
    assert lines[start].split() == ["stage", "TP", "ranks", "params", "18", "B/param", "6", "+", "12/4", "B/param"]
    plain_top = dist_top = 0
    for st in range(2):
        params = want[(0, st, 0)][0]
        plain, dist = _bytes(params, 0, 4, 1, False), _bytes(params, 0, 4, 1, True)
        plain_top, dist_top = max(plain_top, plain), max(dist_top, dist)
        row = lines[start + 1 + st].split()
        assert row == [
            str(st),
            "0-1",
            *human_params(params).split(),
            *human_bytes(plain).split(),
            *human_bytes(dist).split(),
        ]
    assert plain_top == 18 * max(want[(0, s, 0)][0] for s in range(2))
    g = f"{device_gib:g} GiB"
    top_rank = max(range(2), key=lambda s: want[(0, s, 0)][0])
    verdicts = lines[start + 3 :]
    for what, top, ok in (
        ("plain optimizer", plain_top, fits_plain),
        ("distributed optimizer, dp 4", dist_top, fits_dist),
    ):
        assert (top <= device_gib * GIB) == ok
        line = (
            f"{what}: fits on {g}: {human_bytes(top)} / rank at most"
            if ok
            else f"{what}: does not fit on {g}: mp_rank_00_{top_rank:03d} needs {human_bytes(top)}"
        )
        assert line in verdicts
    assert len(verdicts) == 2


def test_suggest_command_line_without_memory_flags_shows_no_memory(tiny_llms: dict[str, Path]) -> None:
    r = _suggest_cli(str(tiny_llms["llama"]), "--pp", "2", "--tp", "2")
    assert r.returncode == 0 and "training memory" not in r.stdout and "tp_size" not in r.stdout


def test_suggest_command_line_experts(tiny_llms: dict[str, Path]) -> None:
    """EP 2 over dp 4: an EP rank column; expert weights' optimizer state over dp / ep = 2."""
    hf = tiny_llms["mixtral"]
    r = _suggest_cli(str(hf), "--pp", "2", "--tp", "2", "--ep", "2", "--dp", "4")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    counts = json.loads(next(x for x in lines if x.startswith("--cfg.parallel_config.llm_pp_layers ")).split(" ", 1)[1])
    assert "--cfg.parallel_config.ep_size 2" in lines
    want = _by_hand(hf, counts, 2, 2, tied=False)
    start = lines.index(next(line for line in lines if line.split()[:2] == ["stage", "TP"]))
    assert lines[start].split()[:5] == ["stage", "TP", "ranks", "EP", "rank"]
    rows = [line.split() for line in lines[start + 1 : start + 5]]
    for st in range(2):
        for e in range(2):
            params, expert = want[(0, st, e)]
            assert want[(1, st, e)] == (params, expert)
            dist = human_bytes(_bytes(params, expert, 4, 2, True)).split()
            assert [
                str(st),
                "0-1",
                str(e),
                *human_params(params).split(),
                *human_bytes(18 * params).split(),
                *dist,
            ] in rows


@pytest.mark.parametrize(
    "model,args,message",
    [
        (
            "mixtral",
            ["--ep", "2", "--dp", "3"],
            "dp = 3: with ep_size 2 the data-parallel size must be a multiple of 2",
        ),
        ("llama", ["--dp", "0"], "argument --dp: '0' is not a whole number >= 1"),
        (
            "llama",
            ["--device-gb", "0"],
            "argument --device-gb: '0' is not a memory size in GiB (a number > 0, e.g. 64)",
        ),
        ("llama", ["--device-gb", "nan"], "argument --device-gb: 'nan' is not a memory size in GiB"),
        ("llama", ["--device-gb", "64GB"], "argument --device-gb: '64GB' is not a memory size in GiB"),
        ("llama", ["--tp", "3", "--dp", "2"], "parallel_config.tp_size 3 does not divide num_key_value_heads = 2"),
        ("llama", ["--tp", "0", "--dp", "2"], "argument --tp: '0' is not a whole number >= 1"),
    ],
)
def test_suggest_command_line_bad_memory_values(
    tiny_llms: dict[str, Path], model: str, args: list[str], message: str
) -> None:
    r = _suggest_cli(str(tiny_llms[model]), "--pp", "2", *args)
    assert (r.returncode, r.stdout, len(r.stderr.splitlines())) == (2, "", 1), r.stderr
    assert r.stderr.startswith(f"mmtui suggest: error: {message}"), r.stderr
