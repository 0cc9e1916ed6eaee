"""Command lines that never guess: no abbreviated flags, one-line errors, the closest flag for a typo.

argparse takes any unambiguous prefix of a flag by default (`--cfg.overwr true` would be
`--cfg.overwrite true`); here a flag is spelt out or refused, and the refusal names the one
real flag that is closest (difflib), so the user can correct it without guessing either.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from collections.abc import Iterable
from typing import NoReturn

# difflib's ratio over whole flags: `--cfg.overwr` / `--cfg.overwrite` is 0.89, `--cfg.parallel_config.tp` /
# `--cfg.parallel_config.tp_size` 0.91; unrelated flags sharing only `--cfg.` stay below
CUTOFF = 0.75


def _leaf(flag: str) -> str:
    return flag.lstrip("-").rsplit(".", 1)[-1]


def _near_leaf(word: str, choice: str) -> bool:
    """The last parts are alike too: a long shared prefix alone (`--cfg.lora.parallel_config.`) is no match."""
    a, b = _leaf(word), _leaf(choice)
    return b.startswith(a) or difflib.SequenceMatcher(None, a, b).ratio() >= 0.6


def closest(word: str, choices: Iterable[str]) -> str | None:
    """The one choice nearest to `word`, or None when none is near (`--a.b` is not near `--a.b.c`'s parent)."""
    choices = [c for c in dict.fromkeys(choices) if not word.startswith(c + ".")]
    found = difflib.get_close_matches(word, choices, n=len(choices), cutoff=CUTOFF)
    return next((c for c in found if _near_leaf(word, c)), None)


def flags_of(parser: argparse.ArgumentParser) -> list[str]:
    """Every long flag a parser shows (jsonargparse's `--x+` append forms and hidden aliases left out)."""
    shown = [a for a in parser._actions if a.help != argparse.SUPPRESS]
    return [s for a in shown for s in a.option_strings if s.startswith("--") and not s.endswith("+")]


def with_hint(message: str, flags: Iterable[str]) -> str:
    """argparse's "unrecognized arguments: ..." with "; did you mean --x?" for its first near miss."""
    if not message.startswith("unrecognized arguments:"):
        return message
    flags = list(flags)
    for word in message.split(":", 1)[1].split():
        if word.startswith("-") and (near := closest(word.split("=", 1)[0], flags)):
            return f"{message}; did you mean {near}?"
    return message


def choice_error(what: str, given: str, choices: Iterable[str]) -> str:
    """`unknown converter 'Qwen2VLConvertr'; did you mean Qwen2VLConverter?` (or the list when none is near)."""
    choices = list(choices)
    near = closest(given, choices)
    return f"unknown {what} {given!r}; " + (f"did you mean {near}?" if near else f"choose from {', '.join(choices)}")


def fail(prog: str, message: str) -> NoReturn:
    """Bad input: one line on stderr, exit 2."""
    sys.stderr.write(f"{prog}: error: {message}\n")
    sys.exit(2)


class StrictParser(argparse.ArgumentParser):
    """argparse without abbreviations, whose errors are one line naming the closest real flag."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:  # type: ignore[override]
        fail(self.prog, with_hint(message, flags_of(self)))
