"""Bootstrap confidence intervals of per-image means, and the paired comparison of two evaluations.

Every interval is a **percentile bootstrap over images**: the ``n`` images are resampled with
replacement :data:`RESAMPLES` times, each resample's mean is taken, and the 2.5th and 97.5th
percentiles of those means (numpy's linear interpolation) bound the 95% interval. The seed is
fixed (:data:`SEED`), so the same per-image values give the same interval on every run, and
metrics of the same images share the same resamples. NaN values (an HD95 that is undefined)
are left out, as they are of the mean.

A **paired** comparison scores two evaluations of the same images (two text regimes, two
models): the per-image differences ``a_i - b_i`` are bootstrapped, so the interval of the
difference reflects how consistently one beats the other image by image, which two separate
intervals side by side cannot show.

``cmgnet compare-evals A B`` (:mod:`cmgnet.train.cli`) compares two evaluations' per-image CSVs.

This module needs numpy only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from cmgnet.tables import render


RESAMPLES = 2000
CONFIDENCE = 0.95
SEED = 0
BOOTSTRAP = {"method": "percentile bootstrap over images", "resamples": RESAMPLES, "confidence": CONFIDENCE,
             "seed": SEED}
"""How every interval is computed (written beside the intervals)."""

_CHUNK = 1 << 22  # indices drawn at once: bounds memory for large sets (same stream as one draw)


def resampled_means(values: Sequence[float] | np.ndarray, resamples: int = RESAMPLES, seed: int = SEED) -> np.ndarray:
    """The means of ``resamples`` bootstrap resamples of ``values`` (drawn with replacement).

    Args:
        values: one value per image, without NaN.
        resamples: number of resamples.
        seed: seed of ``numpy.random.default_rng``.

    Returns:
        ``resamples`` float64 means, in draw order.
    """
    x = np.asarray(values, dtype=np.float64).ravel()
    if x.size == 0:
        raise ValueError("no values to resample")
    rng = np.random.default_rng(seed)
    out = np.empty(resamples, dtype=np.float64)
    rows = max(1, _CHUNK // x.size)
    for start in range(0, resamples, rows):
        stop = min(resamples, start + rows)
        out[start:stop] = x[rng.integers(0, x.size, size=(stop - start, x.size))].mean(axis=1)
    return out


def bootstrap_ci(values: Sequence[float] | np.ndarray, *, resamples: int = RESAMPLES,
                 confidence: float = CONFIDENCE, seed: int = SEED) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (NaN left out).

    Args:
        values: one value per image.
        resamples: bootstrap resamples.
        confidence: coverage of the interval (0.95: the 2.5th and 97.5th percentiles).
        seed: seed of the resampling.

    Returns:
        ``(low, high)``; ``(nan, nan)`` when no value is finite.

    Example:
        >>> low, high = bootstrap_ci([0.8, 0.9, 0.85, 0.95, 0.7])
        >>> 0.7 <= low < high <= 0.95
        True
    """
    x = np.asarray(values, dtype=np.float64).ravel()
    x = x[~np.isnan(x)]
    if x.size == 0:
        return math.nan, math.nan
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(resampled_means(x, resamples, seed), [tail, 100 - tail])
    return float(low), float(high)


def mean_ci(columns: Mapping[str, Sequence[float]], **options: Any) -> dict[str, list[float]]:
    """``{name: [low, high]}``: the interval of each column's mean (see :func:`bootstrap_ci`)."""
    return {name: list(bootstrap_ci(values, **options)) for name, values in columns.items()}


def paired_difference(a: Mapping[str, float], b: Mapping[str, float], **options: Any) -> dict[str, Any]:
    """Mean of ``a - b`` over the same images, with its paired bootstrap interval.

    Args:
        a, b: image id -> value of two evaluations of the same images.
        options: ``resamples``, ``confidence``, ``seed`` of :func:`bootstrap_ci`.

    Returns:
        ``{"n_images", "mean_a", "mean_b", "difference", "ci95"}``: means over the images where both
        values are defined (NaN in either: left out), ``difference = mean_a - mean_b`` and the
        ``[low, high]`` interval of the per-image differences' mean.

    Raises:
        ValueError: the two do not hold the same image ids.
    """
    if set(a) != set(b):
        only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
        raise ValueError(f"not the same images: {len(only_a)} only in the first (e.g. {only_a[:3]}), "
                         f"{len(only_b)} only in the second (e.g. {only_b[:3]})")
    ids = sorted(a)  # a fixed order: the resamples do not depend on how the rows were listed
    va = np.array([a[i] for i in ids], dtype=np.float64)
    vb = np.array([b[i] for i in ids], dtype=np.float64)
    keep = ~(np.isnan(va) | np.isnan(vb))
    va, vb = va[keep], vb[keep]
    if not va.size:
        return {"n_images": 0, "mean_a": math.nan, "mean_b": math.nan, "difference": math.nan,
                "ci95": [math.nan, math.nan]}
    return {"n_images": int(va.size), "mean_a": float(va.mean()), "mean_b": float(vb.mean()),
            "difference": float((va - vb).mean()), "ci95": list(bootstrap_ci(va - vb, **options))}


def paired_differences(a: Sequence[Mapping[str, Any]], b: Sequence[Mapping[str, Any]], metrics: Sequence[str],
                       **options: Any) -> dict[str, dict[str, Any]]:
    """:func:`paired_difference` of every metric between two lists of per-image rows (``image_id`` + metrics)."""
    return {m: paired_difference({str(r["image_id"]): float(r[m]) for r in a},
                                 {str(r["image_id"]): float(r[m]) for r in b}, **options)
            for m in metrics if all(m in r for r in a) and all(m in r for r in b)}


def format_paired(comparisons: Mapping[str, Mapping[str, Mapping[str, Any]]], percent: Sequence[str] = ()) -> str:
    """A fixed-width table of paired comparisons, one line per (comparison, metric).

    Args:
        comparisons: ``{label: {metric: paired_difference(...)}}``.
        percent: metrics shown in percent (the fractions); others as they are (HD95 in pixels).

    Returns:
        The table, headed by how the intervals were computed.
    """
    head = ["comparison", "metric", "n", "A", "B", "A - B", "95% CI"]
    lines = []
    for label, metrics in comparisons.items():
        for metric, d in metrics.items():
            scale = 100.0 if metric in percent else 1.0
            lines.append([label, metric, str(d["n_images"]), f"{scale * d['mean_a']:.2f}", f"{scale * d['mean_b']:.2f}",
                          f"{scale * d['difference']:+.2f}",
                          f"[{scale * d['ci95'][0]:+.2f}, {scale * d['ci95'][1]:+.2f}]"])
    title = (f"[paired per-image differences over the same images; {BOOTSTRAP['method']}, {RESAMPLES} resamples, "
             f"seed {SEED}; fractions in %, HD95 in px]")
    return title + "\n" + render(head, lines, labels=2)
