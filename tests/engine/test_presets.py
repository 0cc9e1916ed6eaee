"""The preset schema: every shipped preset loads, and a wrong one is one line naming the entry."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.errors import ConvertError
from engine.preset import builtin_presets, load_preset_file

PRESETS = Path(__file__).resolve().parents[2] / "presets"


def test_every_shipped_preset_loads() -> None:
    assert set(builtin_presets()) == {p.stem for p in PRESETS.glob("*.toml")}
    presets = [p for p in builtin_presets().values() if p.naming == "megatron_core"]  # other namings: variants
    converters = [p.converter for p in presets]
    # one converter per family, but MindSpeed-MM's Qwen3VLMegatronConverter serves Qwen3-VL dense and MoE:
    # config.json's model_type picks, so presets sharing a converter share no model_type
    shared = {c: [p for p in presets if p.converter == c] for c in converters}
    assert {c: sorted(p.name for p in ps) for c, ps in shared.items() if len(ps) > 1} == {
        "Qwen3VLMegatronConverter": ["qwen3_vl", "qwen3_vl_moe"]
    }
    for ps in shared.values():
        types = [t for p in ps for t in p.model_types]
        assert len(set(types)) == len(types)
    variants = [(p.converter, p.naming) for p in builtin_presets().values() if p.naming != "megatron_core"]
    assert len(set(variants)) == len(variants)  # one preset per family naming


def test_extends_takes_everything_not_given() -> None:
    llama, mistral = builtin_presets()["llama"], builtin_presets()["mistral"]
    assert mistral.mappings == llama.mappings and mistral.modules == llama.modules
    assert (mistral.converter, mistral.model_types) == ("MistralConverter", ["mistral"])


MIXTRAL = (PRESETS / "mixtral.toml").read_text()
FC1 = "'decoder.layers.*.mlp.experts.local_experts.#.linear_fc1'"
BROKEN = {
    # name: (edit of mixtral.toml, the message after the file name)
    "unknown key": (
        ('tp = "gated"', 'tp = "gated"\nsplit = "rows"'),
        f"mappings[6].split (the mapping to {FC1}): Extra inputs are not permitted",
    ),
    "source count": (
        ('hf = ["model.layers.*.block_sparse_moe.experts.#.w1", ', "hf = ["),
        f"mappings[6] (the mapping to {FC1}): kind 'gate_up' takes 2 hf name(s), got 1: "
        "['model.layers.*.block_sparse_moe.experts.#.w3']",
    ),
    "layer wildcard": (
        ('mm = "decoder.layers.*.input_layernorm"', 'mm = "decoder.layers.input_layernorm"'),
        "mappings[1] (the mapping to 'decoder.layers.input_layernorm'): hf ['model.layers.*.input_layernorm'] and "
        "mm 'decoder.layers.input_layernorm' must all hold the same single '*' (layer index) or none",
    ),
    "expert field": (
        ('experts = "num_experts"\n', ""),
        f"preset: mapping target {FC1} has an expert index but its module sets no `experts` field",
    ),
    "undeclared field": (
        ('num_experts = ["num_local_experts"]\n', ""),
        "preset: config fields ['num_experts'] are used but not declared under [fields]",
    ),
    "tp rule": (
        ('tp = "cols"', 'tp = "columns"'),
        "mappings[3].tp (the mapping to 'decoder.layers.*.self_attention.linear_proj'): "
        "Input should be 'rows', 'cols', 'gated' or 'replicate' (got 'columns')",
    ),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_a_broken_preset_is_one_line(tmp_path: Path, case: str) -> None:
    (old, new), message = BROKEN[case]
    assert old in MIXTRAL
    path = tmp_path / "broken.toml"
    path.write_text(MIXTRAL.replace(old, new, 1))
    with pytest.raises(ConvertError) as err:
        load_preset_file(path)
    assert str(err.value) == f"{path}: {message}"


def test_extends_names_a_missing_base(tmp_path: Path) -> None:
    path = tmp_path / "x.toml"
    path.write_text('extends = "nope"\nname = "x"\n')
    with pytest.raises(ConvertError, match=r"x.toml: extends 'nope', but there is no nope.toml next to it"):
        load_preset_file(path)
