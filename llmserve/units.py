"""Parsing human units: durations ("5m", Ollama's keep_alive) and byte sizes ("4GiB").

Imports nothing of ours, so config.py and schemas.py can both use it.
"""

from __future__ import annotations

import math
import re

_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_DURATION_UNITS = {
    "ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0,
}  # fmt: skip
_SIZE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]?)(i?)(b?)", re.IGNORECASE)
_SIZE_POWERS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}

FOREVER = math.inf


def parse_duration(value: str | float | int) -> float:
    """Seconds from a number or a Go-style duration ("30s", "5m", "1h30m", "-1").

    Ollama's keep_alive semantics: any negative value means forever (returned as math.inf);
    0 means "right away". Raises ValueError on anything else.
    """
    if isinstance(value, bool):
        raise ValueError("a duration must be a number of seconds or a string like '5m'")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        text = value.strip().lower()
        sign = -1.0 if text.startswith("-") else 1.0
        body = text.lstrip("+-")
        try:
            seconds = sign * float(body)
        except ValueError:
            parts = _DURATION_PART.findall(body)
            if not body or "".join(n + u for n, u in parts) != body:
                raise ValueError(
                    f"invalid duration {value!r}: use seconds or units like '30s', '5m', '1h'"
                ) from None
            seconds = sign * sum(float(n) * _DURATION_UNITS[u] for n, u in parts)
    if math.isnan(seconds):
        raise ValueError("a duration cannot be NaN")
    return FOREVER if seconds < 0 else seconds


def parse_size(value: str | int) -> int:
    """Bytes from an int or a string like "512MB", "4G", "1.5GiB" (K/M/G/T are powers of 1024)."""
    if isinstance(value, bool):
        raise ValueError("a size must be a number of bytes or a string like '4GB'")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return value
    match = _SIZE.fullmatch(value.strip())
    if match is None:
        raise ValueError(f"invalid size {value!r}: use bytes or units like '512MB', '4GB'")
    number, prefix, _, _ = match.groups()
    return int(float(number) * 1024 ** _SIZE_POWERS[prefix.lower()])


def format_size(count: int | None) -> str:
    """1536 -> "1.5 KiB"; None -> "-"."""
    if count is None:
        return "-"
    if count < 1024:
        return f"{count} B"
    size = count / 1024
    for unit in ("KiB", "MiB"):
        if size < 1024:
            return f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"
