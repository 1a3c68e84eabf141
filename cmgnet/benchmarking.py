"""Helpers shared by the benchmark scripts: hardware description, timing, table + JSON output."""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from cmgnet.tables import render
from cmgnet.train.precision import cpu_capability
from cmgnet.hardware import cpu_name


def hardware() -> dict:
    """Name the machine a number was measured on."""
    info = {
        "cpu": cpu_name(),
        "cpu_capability": cpu_capability(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def cost_variants() -> dict[str, dict]:
    """Paper-table label -> CMGNetConfig switches for the ablation rows whose cost differs.

    (w/o text and w/o alpha cost what their neighbours do, so speed tables leave them out.)
    """
    from cmgnet.train.ablate import VARIANTS

    keep = ("full", "no_masa", "no_cmfm", "unet")
    return {label: {k: v for k, v in switches.items() if k != "arch"} for key, (label, switches) in VARIANTS.items() if key in keep}


def scaled_config(width: int, text_model: str, **switches: object):
    """The benchmarks' CMG-Net at base width ``width``: the one scaling rule every speed table uses.

    Attention heads ``clamp(width // 8, 1, 8)`` (MASA and CMFM), fusion width ``max(64, 4 * width)``;
    the paper-sized model is width 64 (8 heads, fusion 256).

    Args:
        width: U-Net base width.
        text_model: text encoder id or folder.
        **switches: further :class:`~cmgnet.model.CMGNetConfig` fields (ablation switches).

    Returns:
        The :class:`~cmgnet.model.CMGNetConfig`.
    """
    from cmgnet.model import CMGNetConfig

    heads = max(1, min(8, width // 8))
    return CMGNetConfig(base_width=width, masa_heads=heads, fusion_heads=heads, fusion_dim=max(64, 4 * width),
                        text_model=text_model, **switches)


def time_fn(fn: Callable[[], object], warmup: int, iters: int, cuda: bool = False) -> list[float]:
    """Wall-clock seconds of ``iters`` calls after ``warmup`` calls (CUDA-synchronised)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if len(values) > 1 else values[0]


def print_table(rows: list[dict], columns: list[str]) -> None:
    print(render(columns, [[r.get(c, "") for c in columns] for r in rows], labels=len(columns)))


def write_json(path: str | Path, rows: list[dict], **extra: object) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Every row names the kernels it ran on: AVX2 and AVX-512 machines differ by up to 8x.
    capability = cpu_capability()
    rows = [{**row, "cpu_capability": row.get("cpu_capability", capability)} for row in rows]
    path.write_text(json.dumps({"hardware": hardware(), **extra, "results": rows}, indent=2) + "\n")
    print(f"wrote {path}")
