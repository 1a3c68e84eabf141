"""The studies' tables and reports (compare and ablate): the paper's table shape, in Markdown."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from cmgnet.tables import render

PAPER_COLUMNS: tuple[tuple[str, str], ...] = (
    ("IoU", "iou"), ("Dice", "dice"), ("Precision", "precision"), ("Recall", "recall"), ("F1", "f1"),
    ("ACC", "accuracy"), ("Thr. Jaccard", "thresholded_jaccard"),
)
"""Table columns (paper tables 1-3 use IoU, Dice, Precision, Recall and F1 or ACC; the ISIC 2017
challenge ranks by thresholded Jaccard, a per-image metric only) -> metric keys."""

IMAGE_ONLY_MARK = "†"


def _fmt(value: Any, scale: float = 1.0, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{scale * value:.{digits}f}"


def _with_ci(value: Any, interval: Sequence[float] | None, scale: float = 100.0) -> str:
    """``88.1 [86.9, 89.2]``: a per-image mean and its 95% interval (the mean alone without one)."""
    if not interval or value is None or (isinstance(value, float) and math.isnan(value)):
        return _fmt(value, scale)
    return f"{_fmt(value, scale)} [{_fmt(interval[0], scale)}, {_fmt(interval[1], scale)}]"


def row_metrics(row: Mapping[str, Any], regime: str) -> Mapping[str, Any] | None:
    """A row's evaluation in ``regime`` (an image-only row's single evaluation stands for every regime)."""
    results = row.get("results", {})
    if regime in results:
        return results[regime]
    if row.get("image_only") and results:
        return next(iter(results.values()))
    return None


def results_table(rows: Sequence[Mapping[str, Any]], convention: str, text_regime: str, split: str,
                  title: str = "Comparison", cost: bool = True) -> str:
    """The paper's table shape: ``Network | IoU | Dice | Precision | Recall | F1 | ACC`` in percent (+ cost).

    Per-image means are followed by their 95% bootstrap interval, ``88.1 [86.9, 89.2]``; the
    pooled table leaves out the per-image-only thresholded Jaccard.

    Args:
        rows: rows of :func:`run_variants` (``results[regime][convention]`` metrics,
            ``results[regime]["per_image_ci95"]`` intervals).
        convention: ``per_image_mean`` or ``pooled`` (named in the caption).
        text_regime: the regime shown.
        split: the split evaluated (named in the caption).
        title: caption prefix.
        cost: add parameters (M, trainable), GFLOPs and CPU latency (ms, batch 1) columns.

    Returns:
        A Markdown table with a caption line.
    """
    from cmgnet.metrics import PER_IMAGE_ONLY

    size = next((r["cost"]["cost_size"] for r in rows if r.get("cost")), 256)
    columns = [(c, k) for c, k in PAPER_COLUMNS if convention == "per_image_mean" or k not in PER_IMAGE_ONLY]
    head = ["Network", *(c for c, _ in columns)]
    if cost:
        head += ["Params (M)", f"GFLOPs@{size}", "CPU ms (b=1)"]
    body = []
    for row in rows:
        result = row_metrics(row, text_regime)
        values = (result or {}).get(convention) or {}
        intervals = ((result or {}).get("per_image_ci95") or {}) if convention == "per_image_mean" else {}
        label = row["label"] + (f" {IMAGE_ONLY_MARK}" if row.get("image_only") else "")
        cells = [label, *(_with_ci(values.get(k), intervals.get(k)) for _, k in columns)]
        if cost:
            c = row.get("cost") or {}
            cells += [_fmt(c.get("params_M"), digits=2), _fmt(c.get("gflops"), digits=2), _fmt(c.get("latency_ms"))]
        body.append(cells)
    caption = f"{title} ({split} split, text regime '{text_regime}', {convention.replace('_', '-')} metrics in %"
    caption += ", [95% CI])" if convention == "per_image_mean" else ")"
    return caption + "\n" + render(head, body, markdown=True)


def report_markdown(report: Mapping[str, Any], title: str, cost: bool = True) -> str:
    """The whole ``<kind>.md``: recipe, then one table per text regime and convention, then notes."""
    rows, split, boot = report["rows"], report["split"], report["bootstrap"]
    lines = [f"# {title}", "", f"- data: {report['data']}", f"- recipe: {report['recipe']}",
             f"- budget: {report['budget']}",
             f"- conventions: per-image = {report['conventions']['per_image_mean']}; "
             f"pooled = {report['conventions']['pooled']}",
             f"- 95% CI of per-image means: {boot['method']}, {boot['resamples']} resamples, seed {boot['seed']}; "
             "Thr. Jaccard = the ISIC 2017 challenge metric (per-image IoU, 0 below 0.65)"]
    if cost:
        c = next((r["cost"] for r in rows if r.get("cost")), None)
        if c:
            lines.append(f"- cost: trainable parameters (frozen text encoder excluded), FLOPs at {c['cost_size']} px "
                         f"(FlopCounterMode, 2 per multiply-add; cached text features), median CPU latency at "
                         f"batch 1 ({c['latency_cpu']})")
    lines.append("")
    for regime in report["text_regimes"]:
        for convention in ("per_image_mean", "pooled"):
            lines += [results_table(rows, convention, regime, split, title, cost), ""]
    lines.append(render(["Network", "epochs", "steps", "train time (min)", "run"],
                        [[r["label"], _fmt(r.get("epochs"), digits=2), r.get("steps", "n/a"),
                          _fmt(r.get("train_s", math.nan), 1 / 60, 1), f"`{r['run_dir']}`"] for r in rows],
                        markdown=True))
    if any(r.get("image_only") for r in rows):
        lines += ["", f"{IMAGE_ONLY_MARK} image-only model: the text regime does not reach it; evaluated once "
                  f"(regime '{next(iter(next(r for r in rows if r.get('image_only'))['results']), '')}') and "
                  "shown in every regime."]
    notes = [f"- {r['label']}: {r['note']}" for r in rows if r.get("note")]
    if notes:
        lines += ["", "Models:", *notes]
    return "\n".join(lines) + "\n"
