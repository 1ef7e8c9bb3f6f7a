"""Byte counts for people: binary units everywhere (KiB, MiB, GiB, TiB), as every summary and table prints them.

Example:
    >>> human_bytes(81 * 2**20), human_bytes(512), human_bytes(3 * 2**40)
    ('81.0 MiB', '512 B', '3.0 TiB')
"""

from __future__ import annotations

__all__ = ["human_bytes"]


def human_bytes(num: float) -> str:
    """Bytes in binary units."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(num) < 1024:
            return f"{num:.0f} {unit}" if unit == "B" else f"{num:.1f} {unit}"
        num /= 1024
    return f"{num:.1f} TiB"
