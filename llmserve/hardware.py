"""What the machine offers a model: physical CPU cores and available memory (Linux first).

Imports nothing of ours. The readers take the file text so tests can feed sample
/proc/cpuinfo and /proc/meminfo; the `machine_*` functions read the real ones.
"""

from __future__ import annotations

import os
from pathlib import Path

_CPUINFO = Path("/proc/cpuinfo")
_MEMINFO = Path("/proc/meminfo")


def physical_cores(cpuinfo: str) -> int | None:
    """Unique (physical id, core id) pairs in /proc/cpuinfo text (None: the file has none,
    e.g. on ARM, where it lists processors without a core id)."""
    cores: set[tuple[str, str]] = set()
    physical = "0"  # NOTE: some VMs list core ids without a physical id: one package
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key == "processor":
            physical = "0"
        elif key == "physical id":
            physical = value
        elif key == "core id":
            cores.add((physical, value))
    return len(cores) or None


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="ascii", errors="replace")
    except OSError:
        return None


def machine_threads() -> int:
    """Threads llama.cpp should use: the physical cores (as llama-server picks them; SMT
    siblings only contend for the same units), never more than this process may run on."""
    text = _read(_CPUINFO)
    cores = (physical_cores(text) if text else None) or os.cpu_count() or 1
    try:
        allowed = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        allowed = cores
    return max(1, min(cores, allowed))


def mem_available(meminfo: str) -> int | None:
    """MemAvailable from /proc/meminfo text, in bytes (None if absent)."""
    for line in meminfo.splitlines():
        if line.startswith("MemAvailable:"):
            fields = line.split()
            if len(fields) >= 2 and fields[1].isdigit():
                unit = 1024 if len(fields) < 3 or fields[2].lower() == "kb" else 1
                return int(fields[1]) * unit
    return None


def machine_available_memory() -> int | None:
    """Bytes the kernel says can be allocated without swapping (MemAvailable: free memory
    plus reclaimable page cache), else free physical pages; None when neither is known."""
    text = _read(_MEMINFO)
    available = mem_available(text) if text else None
    if available is not None:
        return available
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
