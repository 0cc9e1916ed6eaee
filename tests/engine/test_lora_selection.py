"""Which modules an adapter changes is peft's answer, read from adapter_config.json as peft reads it.

peft itself is the oracle: adapters are made by `get_peft_model`, merged by
`PeftModel.from_pretrained(...).merge_and_unload()`, and an adapter_config.json edited
to contradict its weights is either refused by peft or merged differently from what the
file holds; we refuse such a contradiction in one line instead of guessing.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from engine.errors import ConvertError
from tests.engine.test_lora import _files_state, _merge
from tests.fixtures.tiny_lora import ALL_LINEAR, hf_model, reference_merge


def _adapter(base: Path, out: Path, **config) -> Path:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(hf_model(base), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, **config))
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    model.save_pretrained(out)
    return out


def _edit(adapter: Path, **changes) -> None:
    path = adapter / "adapter_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


def _peft_merged(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    from peft import PeftModel

    merged = PeftModel.from_pretrained(hf_model(base), adapter).merge_and_unload()
    return {k: v.detach() for k, v in merged.state_dict().items()}


@pytest.mark.parametrize(
    "config",
    [
        {"target_modules": r".*\.layers\.1\.self_attn\.(q|v)_proj"},
        {"target_modules": ["q_proj", "down_proj"], "layers_to_transform": [0, 2]},
        {"target_modules": ["q_proj", "k_proj"], "exclude_modules": ["model.layers.3.self_attn.k_proj"]},
        {"target_modules": ["gate_proj"], "layers_to_transform": 3, "layers_pattern": "layers"},
    ],
    ids=["regex", "layers_to_transform", "exclude_modules", "layers_pattern"],
)
def test_what_peft_selects_is_what_is_merged(tiny_llms: dict[str, Path], tmp_path: Path, config: dict) -> None:
    hf = tiny_llms["llama"]
    adapter = _adapter(hf, tmp_path / "adapter", **config)
    got = _files_state(_merge(hf, adapter, tmp_path / "merged"))
    base = _files_state(hf)
    want = reference_merge(base, adapter)
    peft = _peft_merged(hf, adapter)
    changed_by_peft = {k for k in base if not torch.equal(peft[k], base[k])}
    assert changed_by_peft == {k for k in base if not torch.equal(got[k], base[k])}
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_a_regex_matching_nothing_is_refused_as_peft_refuses_it(tiny_llms: dict[str, Path], tmp_path: Path) -> None:
    hf = tiny_llms["llama"]
    adapter = _adapter(hf, tmp_path / "adapter", target_modules=ALL_LINEAR)
    _edit(adapter, target_modules=r"^no_such_module$")
    from peft import PeftModel

    with pytest.raises(ValueError, match="not found in the base model"):  # NoMatchingPeftModuleError
        PeftModel.from_pretrained(hf_model(hf), adapter)
    with pytest.raises(
        ConvertError, match=r"target_modules '\^no_such_module\$' matches no module of the base model in "
    ):
        _merge(hf, adapter, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_weights_the_config_does_not_select_are_refused(tiny_llms: dict[str, Path], tmp_path: Path) -> None:
    """Issue 18's recipe: target_modules ["q_proj"] beside A/B for all seven projections: peft merges 4
    weights (q_proj of each layer), the file holds 28."""
    hf = tiny_llms["llama"]
    adapter = _adapter(hf, tmp_path / "adapter", target_modules=ALL_LINEAR)
    _edit(adapter, target_modules=["q_proj"])
    base = _files_state(hf)
    peft = _peft_merged(hf, adapter)
    assert sorted(k for k in base if not torch.equal(peft[k], base[k])) == [
        f"model.layers.{i}.self_attn.q_proj.weight" for i in range(4)
    ]
    with pytest.raises(ConvertError) as e:
        _merge(hf, adapter, tmp_path / "merged")
    assert str(e.value) == (
        f"{adapter}/adapter_model.safetensors: holds lora_A/lora_B for model.layers.0.mlp.down_proj (and 23 more), which "
        "adapter_config.json does not select (target_modules ['q_proj']), so peft would not merge it; "
        "make the two agree"
    )
    _edit(adapter, target_modules=ALL_LINEAR, layers_to_transform=[1])
    with pytest.raises(ConvertError, match=r"target_modules \[.*\], layers_to_transform \[1\]\), so peft would not"):
        _merge(hf, adapter, tmp_path / "merged")
