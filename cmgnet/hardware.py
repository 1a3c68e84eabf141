"""The machine a process runs on: the CPU's name and the cores it may use. Imports no torch, so
the serving launcher and the benchmarks' records can ask without loading a framework."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_name() -> str:
    """The CPU model (``/proc/cpuinfo`` on Linux), else the architecture."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def physical_cores() -> int:
    """Physical cores this process may run on: ONNX Runtime's default thread count, and the
    threads ``cmgnet serve`` shares among its instances (a hyperthread adds little to these kernels)."""
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        import psutil
    except ImportError:
        return allowed
    return min(allowed, psutil.cpu_count(logical=False) or allowed)
