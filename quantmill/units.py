"""Human-readable units (core, no imports)."""

from __future__ import annotations


def human_bytes(n: float) -> str:
    """Binary units with one decimal, whole bytes below 1 KiB: 1536 -> '1.5 KiB', 35 MiB -> '35.0 MiB', 12 -> '12 B'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"
