"""JSON from a user's files, parsed strictly: duplicate keys and absurd nesting are bad input.

Python's json keeps the last of two equal keys silently (so a header could say two
things about one tensor), and overflows the C stack's guard on deeply nested input
with a RecursionError. Both become one-line ConvertErrors naming the file.
"""

from __future__ import annotations

import json
from typing import Any

from ..errors import ConvertError


class _DuplicateKey(Exception):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return out


def parse_json(data: bytes, where: object, what: str = "JSON") -> Any:
    """The JSON value of `data` (UTF-8); ConvertError naming `where` for anything malformed."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConvertError(f"{where}: {what} is not UTF-8 text (byte {e.start})") from None
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates)
    except _DuplicateKey as e:
        raise ConvertError(f"{where}: {what} has the key {e.args[0]!r} twice; each key may appear once") from None
    except RecursionError:
        raise ConvertError(f"{where}: {what} nests brackets too deeply to parse; a {what} nests a few levels") from None
    except json.JSONDecodeError as e:
        raise ConvertError(f"{where}: {what} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
