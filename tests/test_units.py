"""Durations (keep_alive, --idle_unload_seconds) and byte sizes (--memory_budget, size labels)."""

from __future__ import annotations

import math

import pytest

from llmserve.config import Settings
from llmserve.units import format_size, parse_duration, parse_size


@pytest.mark.parametrize(
    ("value", "seconds"),
    [(0, 0.0), (30, 30.0), (1.5, 1.5), ("45", 45.0), ("30s", 30.0), ("5m", 300.0),
     ("1h30m", 5400.0), ("250ms", 0.25), (" 2m ", 120.0), (-1, math.inf), ("-5m", math.inf)],
)  # fmt: skip
def test_parse_duration(value: str | float, seconds: float) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value", ["", "soon", "5x", "1.2.3", "m5", True, float("nan")])
def test_bad_duration(value: str | float) -> None:
    with pytest.raises(ValueError):
        parse_duration(value)


@pytest.mark.parametrize(
    ("value", "count"),
    [(0, 0), (123, 123), ("123", 123), ("4GB", 4 << 30), ("1.5GiB", 3 << 29), ("512mb", 512 << 20),
     ("491 MB", 491 << 20), ("2k", 2048)],
)  # fmt: skip
def test_parse_size(value: str | int, count: int) -> None:
    assert parse_size(value) == count


@pytest.mark.parametrize("value", ["lots", "-4GB", "4 XB", -1, ""])
def test_bad_size(value: str | int) -> None:
    with pytest.raises(ValueError):
        parse_size(value)


def test_format_size() -> None:
    assert [format_size(n) for n in (None, 5, 1536, 98_362_432, 5 << 30)] == [
        "-", "5 B", "1.5 KiB", "93.8 MiB", "5.0 GiB"
    ]  # fmt: skip


def test_settings_accept_units(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMSERVE_MEMORY_BUDGET", "2GB")
    monkeypatch.setenv("LLMSERVE_IDLE_UNLOAD_SECONDS", "5m")
    s = Settings()
    assert (s.memory_budget, s.idle_unload_seconds, s.max_loaded_models) == (2 << 30, 300.0, 1)
    assert Settings(idle_unload_seconds=-1).idle_unload_seconds is None  # forever
    with pytest.raises(ValueError):
        Settings(memory_budget="lots")
    with pytest.raises(ValueError):
        Settings(max_loaded_models=0)
