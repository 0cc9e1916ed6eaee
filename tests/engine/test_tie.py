"""tie_word_embeddings read as transformers reads it (issue 19.4), and messages naming what config and weights say."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import transformers
from safetensors.torch import load_file, save_file

from engine.errors import ConvertError
from engine.job import HfConfig, HfToMmConfig, Job, MmToHfConfig, prepare
from engine.layout import ParallelConfig
from engine.planning.build import build_plan
from engine.preset import builtin_presets
from engine.run.execute import run
from engine.source.hf_source import inspect_hf
from engine.source.tie import is_tied

PP2 = ParallelConfig(llm_pp_layers=[[2, 2]])


def _edited(src: Path, dst: Path, *, config=None, drop: str | None = None) -> Path:
    """A copy of a model directory with config.json edited and one tensor taken out of the weights."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    if config:
        config(cfg)
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    if drop:
        index = dst / "model.safetensors.index.json"
        for f in dst.glob("*.safetensors"):
            state = load_file(f)
            if drop in state:
                del state[drop]
                save_file(state, f, metadata={"format": "pt"})
        if index.is_file():
            data = json.loads(index.read_text())
            data["weight_map"].pop(drop, None)
            index.write_text(json.dumps(data))
    return dst


def _pop(*path: str):
    def edit(cfg: dict) -> None:
        node = cfg
        for p in path[:-1]:
            node = node[p]
        node.pop(path[-1], None)

    return edit


@pytest.mark.parametrize("name", sorted(builtin_presets()))
def test_each_presets_default_is_its_config_class_default(name: str) -> None:
    preset = builtin_presets()[name]
    if preset.tie is None:  # InternVL: the language model's preset decides
        assert preset.language_model is not None
        return
    cls = preset.tie.config_class
    assert cls, f"preset {name} names no config class for its tie default"
    default = preset.defaults[preset.tie.field]
    if cls == "InternLM2Config":  # remote code (trust_remote_code), not in transformers: its __init__ says False
        assert default is False
        return
    assert getattr(transformers, cls)().tie_word_embeddings is default
    assert preset.architectures[0].startswith(cls.removesuffix("Config"))  # the family's own class


@pytest.mark.parametrize(
    ("top", "text"), [(None, None), (False, None), (True, None), (None, True), (False, True), (True, False)]
)
def test_qwen2_vl_tie_is_read_as_transformers_reads_it(
    tiny_dirs: dict[str, Path], tmp_path: Path, top: bool | None, text: bool | None
) -> None:
    """Qwen2VLConfig: the top-level key, or text_config's (transformers 5 forwards it), default false."""

    def edit(cfg: dict) -> None:
        for node, value in ((cfg, top), (cfg["text_config"], text)):
            node.pop("tie_word_embeddings", None)
            if value is not None:
                node["tie_word_embeddings"] = value

    hf = _edited(tiny_dirs["qwen2_vl_tied"], tmp_path / "hf", config=edit)
    cfg = json.loads((hf / "config.json").read_text())
    assert is_tied(inspect_hf(hf)) is transformers.Qwen2VLConfig.from_dict(cfg).tie_word_embeddings


def test_an_absent_key_with_tied_weights_names_what_each_says(tiny_llms: dict[str, Path], tmp_path: Path) -> None:
    hf = _edited(tiny_llms["qwen2_tied"], tmp_path / "hf", config=_pop("tie_word_embeddings"))
    info = inspect_hf(hf)
    assert not is_tied(info) and not transformers.Qwen2Config.from_pretrained(hf).tie_word_embeddings
    with pytest.raises(ConvertError) as e:
        build_plan(info, PP2)
    assert str(e.value) == (
        f"{hf}: config.json has no tie_word_embeddings (Qwen2Config's default: false), so the output layer is its "
        "own tensor, but the weights have no lm_head.weight, as a tied model's; set tie_word_embeddings true in "
        "config.json if the model ties them"
    )


def test_an_explicit_false_with_tied_weights(tiny_llms: dict[str, Path], tmp_path: Path) -> None:
    hf = _edited(tiny_llms["qwen2_tied"], tmp_path / "hf", config=lambda c: c.update(tie_word_embeddings=False))
    with pytest.raises(ConvertError) as e:
        build_plan(inspect_hf(hf), PP2)
    assert str(e.value).startswith(f"{hf}: tie_word_embeddings is false in config.json, so the output layer is its own")


def test_a_vlm_without_the_key_anywhere(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    hf = _edited(
        tiny_dirs["qwen2_vl_tied"], tmp_path / "hf",
        config=lambda c: (c.pop("tie_word_embeddings", None), c["text_config"].pop("tie_word_embeddings", None)),
    )  # fmt: skip
    with pytest.raises(ConvertError) as e:
        build_plan(inspect_hf(hf), ParallelConfig(llm_pp_layers=[[4]], vit_pp_layers=[[3]]))
    assert str(e.value).startswith(
        f"{hf}: config.json has no tie_word_embeddings or text_config.tie_word_embeddings (Qwen2VLConfig's default: "
        "false), so the output layer is its own tensor, but the weights have no "
    )


def test_an_absent_key_with_an_output_layer_converts_untied(tiny_llms: dict[str, Path], tmp_path: Path) -> None:
    """Llama without the key and with lm_head.weight: untied, as LlamaConfig's default says; there and back."""
    hf = _edited(tiny_llms["llama"], tmp_path / "hf", config=_pop("tie_word_embeddings"))
    job = Job(
        converter="LlamaConverter", command="hf_to_mm",
        cfg=HfToMmConfig(mm_dir=tmp_path / "mm", hf_config=HfConfig(hf_dir=hf), parallel_config=PP2),
    )  # fmt: skip
    info, plan = prepare(job)
    assert not is_tied(info)
    assert not any("tied" in n for n in plan.notes)
    run(plan, tmp_path / "mm")
    cfg = MmToHfConfig(save_hf_dir=tmp_path / "back", mm_dir=tmp_path / "mm", hf_config=HfConfig(hf_dir=hf),
                       parallel_config=PP2)  # fmt: skip
    run(prepare(Job(converter="LlamaConverter", command="mm_to_hf", cfg=cfg))[1], tmp_path / "back")
    for f in hf.glob("*.safetensors"):
        assert (tmp_path / "back" / f.name).read_bytes() == f.read_bytes()


def test_tied_with_an_output_layer_in_the_weights_says_so(tiny_llms: dict[str, Path], tmp_path: Path) -> None:
    """Config says tied, the weights also hold lm_head.weight: it is not written, and the plan says why."""
    hf = _edited(tiny_llms["llama"], tmp_path / "hf", config=lambda c: c.update(tie_word_embeddings=True))
    plan = build_plan(inspect_hf(hf), PP2)
    assert plan.dropped["lm_head.weight"] == "tie_word_embeddings is true: the output layer is the embedding"
    assert (
        "tie_word_embeddings is true in config.json, but the weights also hold lm_head.weight: it is not written "
        "(tied, the output layer is the embedding, as transformers loads it)"
    ) in plan.notes
