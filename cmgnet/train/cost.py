"""What a model costs: trainable parameters, FLOPs and CPU latency at batch 1 (the cost columns of the studies)."""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from dataclasses import dataclass
from typing import Any

from cmgnet.hardware import cpu_name


@dataclass(frozen=True)
class CostSpec:
    """How the cost columns are measured.

    Args:
        size: square input side of the GFLOPs count and the latency (paper: 256).
        latency_runs: timed forwards (the median is reported); 0 skips latency.
        warmup: untimed forwards before them.
    """

    size: int = 256
    latency_runs: int = 5
    warmup: int = 2


def measure_cost(arch: str, model_config: Any, spec: CostSpec) -> dict[str, Any]:
    """Parameters, GFLOPs and CPU latency of a freshly built model at ``spec.size`` px, batch 1.

    FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` (2 per multiply-add:
    many papers' "GFLOPs" are multiply-adds, i.e. half) with attention on the reference
    matmul path so it is counted. Text models get cached text-encoder features (the neutral
    sentence), as in training and serving: the frozen encoder itself is not counted or timed.

    Returns:
        ``{"params_M", "frozen_params_M", "gflops", "latency_ms", "cost_size", "latency_cpu", ...}``.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from cmgnet import kernels
    from cmgnet.model import create_model
    from cmgnet.text import NEUTRAL_SENTENCE

    model = create_model(arch, **dataclasses.asdict(model_config)).eval().cpu()
    x = torch.randn(1, getattr(model_config, "in_channels", 3), spec.size, spec.size)
    branch = getattr(model, "text_branch", None)
    args: tuple = (x,)
    if branch is not None:
        with torch.no_grad():
            features, mask = branch.encoder([NEUTRAL_SENTENCE])
        args = (x, features, mask)
    trainable = model.num_parameters(trainable_only=True)
    with torch.no_grad(), kernels.use_backend("reference"):
        counter = FlopCounterMode(display=False)
        with counter:
            model(*args)
    times: list[float] = []
    with torch.inference_mode():
        for i in range(spec.warmup + spec.latency_runs):
            start = time.perf_counter()
            model(*args)
            if i >= spec.warmup:
                times.append(time.perf_counter() - start)
    return {
        "params_M": trainable / 1e6,
        "frozen_params_M": (model.num_parameters() - trainable) / 1e6,
        "gflops": counter.get_total_flops() / 1e9,
        "latency_ms": 1000 * statistics.median(times) if times else math.nan,
        "cost_size": spec.size,
        "latency_cpu": f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
    }
