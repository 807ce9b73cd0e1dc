"""Physical cores and available memory from sample /proc files (llmserve/hardware.py)."""

from __future__ import annotations

from typing import Any

import pytest

from llmserve import hardware


def _cpu(processor: int, physical: int | None, core: int | None) -> str:
    lines = [f"processor\t: {processor}", "model name\t: Test CPU"]
    if physical is not None:
        lines.append(f"physical id\t: {physical}")
    lines.append("siblings\t: 4")
    if core is not None:
        lines.append(f"core id\t\t: {core}")
    return "\n".join(lines) + "\n\n"


# two sockets x two cores x two hyper-threads: 8 processors, 4 physical cores
TWO_SOCKETS_SMT = "".join(
    _cpu(i, physical=i // 4, core=(i // 2) % 2) for i in range(8)
)
# a VM listing core ids without physical ids: one package
VM_NO_PHYSICAL = "".join(_cpu(i, physical=None, core=i) for i in range(3))
# ARM: processors without topology
ARM = "processor\t: 0\nBogoMIPS\t: 48.00\n\nprocessor\t: 1\nBogoMIPS\t: 48.00\n\n"


@pytest.mark.parametrize(("text", "cores"), [
    (TWO_SOCKETS_SMT, 4),
    (_cpu(0, 0, 0) + _cpu(1, 0, 0), 1),  # two hyper-threads of one core
    (_cpu(0, 0, 0) + _cpu(1, 1, 0), 2),  # same core id on two sockets: two cores
    (VM_NO_PHYSICAL, 3),
    (ARM, None),
    ("", None),
])  # fmt: skip
def test_physical_cores_count_unique_socket_core_pairs(text: str, cores: int | None) -> None:
    assert hardware.physical_cores(text) == cores


def _machine(monkeypatch: pytest.MonkeyPatch, cpuinfo: str | None, cpu_count: int,
             affinity: set[int] | None) -> None:
    monkeypatch.setattr(hardware, "_read", lambda path: cpuinfo)
    monkeypatch.setattr(hardware.os, "cpu_count", lambda: cpu_count)

    def sched_getaffinity(pid: int) -> set[int]:
        if affinity is None:
            raise OSError("no affinity")
        return affinity

    monkeypatch.setattr(hardware.os, "sched_getaffinity", sched_getaffinity, raising=False)


@pytest.mark.parametrize(("cpuinfo", "cpu_count", "affinity", "threads"), [
    (TWO_SOCKETS_SMT, 8, set(range(8)), 4),  # physical cores, not processors
    (TWO_SOCKETS_SMT, 8, {0, 1}, 2),  # pinned to two processors: no more threads than that
    (ARM, 6, set(range(6)), 6),  # no topology: os.cpu_count()
    (None, 3, None, 3),  # no /proc/cpuinfo, no affinity
])  # fmt: skip
def test_machine_threads(monkeypatch: pytest.MonkeyPatch, cpuinfo: str | None, cpu_count: int,
                         affinity: set[int] | None, threads: int) -> None:
    _machine(monkeypatch, cpuinfo, cpu_count, affinity)
    assert hardware.machine_threads() == threads


MEMINFO = "MemTotal:       24683792 kB\nMemFree:         1000000 kB\nMemAvailable:   20000000 kB\n"


def test_mem_available_reads_kib() -> None:
    assert hardware.mem_available(MEMINFO) == 20000000 * 1024
    assert hardware.mem_available("MemTotal: 5 kB\n") is None


def test_available_memory_falls_back_to_sysconf(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hardware, "_read", lambda path: None)
    values: dict[str, Any] = {"SC_AVPHYS_PAGES": 1000, "SC_PAGE_SIZE": 4096}
    monkeypatch.setattr(hardware.os, "sysconf", lambda name: values[name])
    assert hardware.machine_available_memory() == 4096 * 1000
    monkeypatch.setattr(hardware, "_read", lambda path: MEMINFO)
    assert hardware.machine_available_memory() == 20000000 * 1024
