"""Number formatting shared by the widgets."""

from __future__ import annotations


def size(n: int) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.2f} GB"
    if n >= 1e6:
        return f"{n / 1e6:.2f} MB"
    return f"{n / 1e3:.1f} kB"


def count(n: int) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.2f} B"
    if n >= 1e6:
        return f"{n / 1e6:.1f} M"
    return f"{n:,}"


def bar(share: float, width: int) -> str:
    """A horizontal bar, full at share 1.0 (stage costs against the most expensive stage)."""
    full = round(share * width)
    return "█" * full + "·" * (width - full)
