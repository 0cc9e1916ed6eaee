"""Types in help texts as people read them: `int >= 0`, `list of lists of int >= 0`, `path or null`.

jsonargparse prints Python's spelling (`Annotated[int, Ge(ge=0)]`, `<class 'Path'>`), which
tells a user of the command line nothing they can type.
"""

from __future__ import annotations

import types
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

_BOUNDS = (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))
_NAMES = {bool: "true/false", int: "int", float: "float", str: "str", Path: "path"}


def readable(hint: Any, flag: str = "") -> str:
    """A type hint in words; `flag` names the option, for a nested model's pointer to its own help."""
    origin, args = get_origin(hint), get_args(hint)
    if origin is Annotated:
        text = readable(args[0], flag)
        for meta in args[1:]:
            text += "".join(f" {op} {getattr(meta, k)}" for k, op in _BOUNDS if getattr(meta, k, None) is not None)
        return text
    if origin in (Union, types.UnionType):
        shown = [readable(a, flag) for a in args if a is not type(None)]
        if type(None) in args:
            shown.append("null")
        return " or ".join(shown)
    if origin in (list, tuple, set, frozenset):
        inner = readable(args[0], flag) if args else "values"
        return "list of " + (inner.replace("list of ", "lists of ", 1) if inner.startswith("list of ") else inner)
    if origin is Literal:
        return "one of " + ", ".join(str(a).lower() if isinstance(a, bool) else str(a) for a in args)
    if hint in _NAMES:
        return _NAMES[hint]
    if hasattr(hint, "model_fields"):  # a nested pydantic model: given field by field
        return f"fields ({flag}.help)" if flag else "fields"
    return getattr(hint, "__name__", str(hint))
