"""Whether a model's output layer is its embedding, read from config.json as transformers reads it.

transformers takes the config class's own default when config.json omits `tie_word_embeddings`
(every family here defaults to false: LlamaConfig, Qwen2Config, ... `Tie.config_class` names it),
and Qwen2-VL's config takes the key from the top level or from text_config, whichever says true.
"""

from __future__ import annotations

from .hf_source import ModelInfo, lookup


def _tie_values(info: ModelInfo) -> list[tuple[str, object]]:
    """(config.json path, value) of the tie field, for each path that is set."""
    tie = info.preset.tie
    if tie is None:
        return []
    return [(p, v) for p in info.preset.fields[tie.field] if (v := lookup(info.config, p)) is not None]


def is_tied(info: ModelInfo) -> bool:
    """Whether the output layer is the embedding, read as transformers reads config.json: true when
    any of the field's paths says so (Qwen2-VL's top-level key or its text_config's), and when none
    is set, the config class's default (the preset's [defaults] value)."""
    tie = info.preset.tie
    if tie is None:
        return False
    given = _tie_values(info)
    return any(bool(v) for _, v in given) if given else bool(info.fields.get(tie.field))


def tie_said(info: ModelInfo) -> str:
    """What config.json says about tying, for messages: the values set, or the default taken."""
    tie = info.preset.tie
    assert tie is not None
    given = _tie_values(info)
    if given:
        return " and ".join(f"{p} is {str(bool(v)).lower()}" for p, v in given) + " in config.json"
    paths = " or ".join(info.preset.fields[tie.field])
    default = str(bool(info.fields.get(tie.field))).lower()
    whose = f"{tie.config_class}'s" if tie.config_class else "the"
    return f"config.json has no {paths} ({whose} default: {default})"
