"""Sizes in bytes as people write them: ``"4MiB"``, ``"256KiB"``, ``"1G"``, and back.

Configs and the ``iopipe`` command accept a size as an int or such a string
(:func:`parse_size`); :func:`format_size` writes the shortest exact form.
"""

from __future__ import annotations

import fractions
import re

from ..runtime.errors import show

__all__ = ["MAX_SIZE", "format_size", "format_size_approx", "parse_size"]

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1 << 10,
    "kib": 1 << 10,
    "kb": 10**3,
    "m": 1 << 20,
    "mib": 1 << 20,
    "mb": 10**6,
    "g": 1 << 30,
    "gib": 1 << 30,
    "gb": 10**9,
    "t": 1 << 40,
    "tib": 1 << 40,
    "tb": 10**12,
}
#: Sizes fit a signed 64-bit count of bytes (what the OS and numpy take).
MAX_SIZE = (1 << 63) - 1
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*")


def parse_size(value: int | str) -> int:
    """Return the number of bytes ``value`` denotes.

    Accepts an int or a string: ``"4MiB"``, ``"256KiB"``, ``"1G"``, ``"1.5GiB"``,
    ``"512"``.  ``K``/``M``/``G``/``T`` and ``KiB``... are powers of 1024;
    ``KB``/``MB``/``GB``/``TB`` are powers of 1000.

    Raises:
        ValueError: not a size, or a fraction of a byte.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        if value > MAX_SIZE:  # negative ones are the caller's to refuse, by name
            raise ValueError(f"size {show(value)} is larger than 2**63 - 1 bytes")
        return value
    if isinstance(value, str) and len(value) <= 64 and (m := _SIZE.fullmatch(value)):
        unit = _UNITS.get(m.group(2).lower())
        exact = fractions.Fraction(m.group(1)) * (unit or 0)  # exact: no float rounding
        n = -1 if unit is None or exact.denominator != 1 else int(exact)
    else:
        n = -1
    if n < 0:
        raise ValueError(
            f"not a size in bytes: {show(value)} (write e.g. 4194304, '4MiB', '256KiB')"
        )
    if n > MAX_SIZE:
        raise ValueError(f"size {show(value)} is larger than 2**63 - 1 bytes")
    return n


def format_size(n: int) -> str:
    """Return ``n`` bytes in the shortest exact binary unit: ``4194304 -> "4MiB"``."""
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale}{unit}"
    return f"{n}B"


def format_size_approx(n: int) -> str:
    """``3461234 -> "3.3 MiB"`` (for titles; sizes users type go through format_size)."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"  # pragma: no cover
