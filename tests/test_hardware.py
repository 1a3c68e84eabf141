"""What the process knows of its machine, without loading torch."""

from __future__ import annotations

import os
import subprocess
import sys

from cmgnet.hardware import cpu_name, physical_cores


def test_physical_cores_counts_the_cores_this_process_may_use(monkeypatch):
    assert 1 <= physical_cores() <= len(os.sched_getaffinity(0))
    monkeypatch.setitem(sys.modules, "psutil", None)  # psutil is a dev dependency: without it, the allowed CPUs
    assert physical_cores() == len(os.sched_getaffinity(0))
    assert cpu_name()


def test_the_serving_launcher_loads_no_framework():
    """`cmgnet serve` shares the cores among its instances before any model is loaded."""
    code = "import sys, deploy.server, cmgnet.hardware; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"
