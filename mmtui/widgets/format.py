"""Number formatting shared by the widgets."""

from __future__ import annotations


def size(n: int) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.2f} GB"
    if n >= 1e6:
        return f"{n / 1e6:.2f} MB"
    return f"{n / 1e3:.1f} kB"


def rate(bytes_per_second: float) -> str:
    """A throughput in the unit that shows its digits: a tiny model's "4.32 MB/s", not "0.00 GB/s"."""
    for factor, unit in ((1e9, "GB/s"), (1e6, "MB/s"), (1e3, "kB/s")):
        if bytes_per_second >= factor:
            return f"{bytes_per_second / factor:.2f} {unit}"
    return f"{bytes_per_second:.0f} B/s"


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
