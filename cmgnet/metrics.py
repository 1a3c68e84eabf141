"""Binary segmentation metrics: Dice, IoU, thresholded Jaccard, precision, recall, F1, accuracy and HD95.

Every output names its aggregation convention (docs/design.md section 5):

* ``per_image_mean``: each metric is computed on every image, then averaged over images
  (the ISIC challenge convention and the paper's "mean Dice").
* ``pooled``: TP, FP, FN and TN are summed over the whole data set, then the ratio is taken
  (a dataset-level score in which large lesions weigh more).

Empty masks (convention ``EMPTY_CONVENTION``): a ratio whose denominator is zero is 1.0 when
the prediction and the ground truth are both empty (perfect agreement on "no lesion") and
0.0 otherwise (a missed lesion or a false alarm). For HD95 both-empty is 0 pixels and
exactly-one-empty is undefined (NaN): such images are left out of the HD95 mean and counted
in ``hd95_undefined``. HD95 is in pixels of the evaluated mask (MONAI's implementation, 95th
percentile of the symmetric surface distances).

For binary masks F1 equals Dice per image and pooled (2PR / (P + R) = 2TP / (2TP + FP + FN));
it is reported because the paper does.

Thresholded Jaccard is the ISIC 2017 challenge's ranking metric: each image's IoU, set to 0
where it is below :data:`JACCARD_THRESHOLD` (0.65), then averaged over images. It is a
per-image metric only (like HD95, it has no pooled form); its empty masks follow IoU's (both
empty: 1, one empty: 0).

Every per-image mean comes with a 95% percentile-bootstrap interval over images
(:mod:`cmgnet.stats`, ``per_image_ci95``).

Example:
    >>> pred = torch.zeros(1, 1, 4, 4, dtype=torch.bool); pred[..., :2, :2] = True
    >>> target = torch.zeros_like(pred); target[..., :2, :] = True
    >>> round(float(scores(confusion_counts(pred, target))["dice"][0]), 4)
    0.6667
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from cmgnet.stats import BOOTSTRAP, mean_ci

RATIO_METRICS: tuple[str, ...] = ("dice", "iou", "precision", "recall", "f1", "accuracy")
"""Metrics derived from the confusion counts (fractions in [0, 1])."""

PER_IMAGE_ONLY: tuple[str, ...] = ("thresholded_jaccard", "hd95")
"""Metrics without a pooled form (averaged over images only)."""
METRICS: tuple[str, ...] = (*RATIO_METRICS, *PER_IMAGE_ONLY)
JACCARD_THRESHOLD = 0.65
COUNT_KEYS: tuple[str, ...] = ("tp", "fp", "fn", "tn")
CONVENTIONS: dict[str, str] = {
    "per_image_mean": "metric computed per image, then averaged over images (ISIC convention)",
    "pooled": "TP/FP/FN/TN summed over all images, then the ratio (dataset level)",
}
EMPTY_CONVENTION = (
    "0/0 ratios are 1 when prediction and ground truth are both empty, else 0; "
    "HD95 is 0 px when both are empty and undefined (excluded, counted) when exactly one is"
)


def confusion_counts(pred: Tensor, target: Tensor) -> Tensor:
    """Per-image pixel confusion counts.

    Args:
        pred: boolean (or {0, 1}) predictions, ``B x ...``.
        target: boolean (or {0, 1}) ground truth, same shape.

    Returns:
        ``B x 4`` int64 tensor of ``(TP, FP, FN, TN)``.
    """
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    p = pred.bool().flatten(1)
    t = target.bool().flatten(1)
    tp = (p & t).sum(1)
    fp = (p & ~t).sum(1)
    fn = (~p & t).sum(1)
    tn = (~p & ~t).sum(1)
    return torch.stack([tp, fp, fn, tn], dim=1).long()


def _ratio(num: Tensor, den: Tensor, both_empty: Tensor) -> Tensor:
    # The empty-mask convention: 0/0 is agreement (1) only when there is nothing on either side.
    safe = torch.where(den > 0, num / den.clamp_min(1), torch.where(both_empty, 1.0, 0.0))
    return safe


def scores(counts: Tensor) -> dict[str, Tensor]:
    """Ratio metrics from confusion counts, with the module's empty-mask convention.

    Args:
        counts: ``... x 4`` counts ``(TP, FP, FN, TN)`` (one row per image, or one pooled row).

    Returns:
        ``{metric: tensor of shape counts.shape[:-1]}`` for every name in :data:`RATIO_METRICS`,
        float64.
    """
    tp, fp, fn, tn = counts.double().unbind(-1)
    both_empty = (tp + fp + fn) == 0
    precision = _ratio(tp, tp + fp, both_empty)
    recall = _ratio(tp, tp + fn, both_empty)
    pr = precision + recall
    return {
        "dice": _ratio(2 * tp, 2 * tp + fp + fn, both_empty),
        "iou": _ratio(tp, tp + fp + fn, both_empty),
        "precision": precision,
        "recall": recall,
        "f1": torch.where(pr > 0, 2 * precision * recall / pr.clamp_min(1e-12), 0.0),
        "accuracy": (tp + tn) / (tp + fp + fn + tn).clamp_min(1),
    }


def thresholded_jaccard(iou: Tensor, threshold: float = JACCARD_THRESHOLD) -> Tensor:
    """The ISIC 2017 challenge's per-image score: IoU where it reaches ``threshold``, else 0.

    Args:
        iou: per-image IoU (:func:`scores`).
        threshold: the lowest IoU that counts.

    Returns:
        Tensor of ``iou``'s shape.
    """
    return torch.where(iou >= threshold, iou, torch.zeros_like(iou))


def hd95(pred: Tensor, target: Tensor) -> Tensor:
    """95th-percentile symmetric Hausdorff distance per image, in pixels (MONAI).

    Args:
        pred: boolean predictions ``B x 1 x H x W`` (or ``B x H x W``).
        target: boolean ground truth, same shape.

    Returns:
        ``B`` float64 distances: 0 where both masks are empty, NaN where exactly one is.
    """
    from monai.metrics import compute_hausdorff_distance

    p = pred.bool().reshape(pred.shape[0], 1, *pred.shape[-2:]).cpu()
    t = target.bool().reshape(target.shape[0], 1, *target.shape[-2:]).cpu()
    out = torch.full((p.shape[0],), math.nan, dtype=torch.float64)
    p_any = p.flatten(1).any(1)
    t_any = t.flatten(1).any(1)
    out[~p_any & ~t_any] = 0.0
    both = p_any & t_any
    if both.any():
        # MONAI warns on empty inputs; those were handled above, so silence the rest.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dist = compute_hausdorff_distance(p[both].float(), t[both].float(), include_background=True, percentile=95)
        out[both] = dist.reshape(-1).double()
    return out


def per_image_rows(
    pred: Tensor, target: Tensor, image_ids: Sequence[str], with_hd95: bool = True
) -> list[dict[str, float | int | str]]:
    """One metrics row per image: id, counts, ratio metrics and (optionally) HD95.

    Args:
        pred: boolean predictions ``B x 1 x H x W``.
        target: boolean ground truth, same shape.
        image_ids: ``B`` ids.
        with_hd95: compute HD95 (a distance transform per image; skip it for fast validation).

    Returns:
        ``B`` dicts with keys ``image_id``, :data:`COUNT_KEYS`, :data:`RATIO_METRICS`,
        ``thresholded_jaccard`` and ``hd95`` (NaN when not computed or undefined).
    """
    if len(image_ids) != pred.shape[0]:
        raise ValueError(f"{len(image_ids)} image ids for a batch of {pred.shape[0]}")
    counts = confusion_counts(pred, target).cpu()
    ratio = scores(counts)
    ratio["thresholded_jaccard"] = thresholded_jaccard(ratio["iou"])
    dist = hd95(pred, target) if with_hd95 else torch.full((pred.shape[0],), math.nan, dtype=torch.float64)
    rows = []
    for i, image_id in enumerate(image_ids):
        row: dict[str, float | int | str] = {"image_id": str(image_id)}
        row.update({k: int(counts[i, j]) for j, k in enumerate(COUNT_KEYS)})
        row.update({k: float(v[i]) for k, v in ratio.items()})
        row["hd95"] = float(dist[i])
        rows.append(row)
    return rows


def summarize(rows: Iterable[dict], with_hd95: bool = True) -> dict:
    """Aggregate per-image rows under both conventions.

    Args:
        rows: rows from :func:`per_image_rows` (e.g. gathered from every rank).
        with_hd95: include the HD95 mean (per-image convention only: HD95 does not pool).

    Returns:
        ``{"n_images", "per_image_mean": {...}, "per_image_ci95": {...}, "bootstrap", "pooled": {...},
        "conventions", "empty_masks"}``; ``per_image_mean`` also has ``thresholded_jaccard``,
        ``hd95`` and ``hd95_undefined`` (images excluded from it); ``per_image_ci95`` has the
        ``[low, high]`` 95% bootstrap interval of every per-image mean (:mod:`cmgnet.stats`).

    Raises:
        ValueError: no rows, or an image id seen twice (a sharding bug would double-count).
    """
    rows = list(rows)
    if not rows:
        raise ValueError("no images to summarise")
    ids = [r["image_id"] for r in rows]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise ValueError(f"images counted more than once: {dup}")
    rows.sort(key=lambda r: r["image_id"])  # intervals independent of the ranks' gather order
    counts = torch.tensor([[r[k] for k in COUNT_KEYS] for r in rows], dtype=torch.float64)
    columns = {k: [float(r[k]) for r in rows] for k in (*RATIO_METRICS, "thresholded_jaccard")}
    per_image = {k: float(torch.tensor(v, dtype=torch.float64).mean()) for k, v in columns.items()}
    if with_hd95:
        dists = [r["hd95"] for r in rows if not math.isnan(r["hd95"])]
        per_image["hd95"] = float(sum(dists) / len(dists)) if dists else math.nan
        per_image["hd95_undefined"] = len(rows) - len(dists)
        columns["hd95"] = dists
    pooled = {k: float(v) for k, v in scores(counts.sum(0)).items()}
    return {
        "n_images": len(rows),
        "per_image_mean": per_image,
        "per_image_ci95": mean_ci(columns),
        "bootstrap": dict(BOOTSTRAP),
        "pooled": pooled,
        "conventions": CONVENTIONS,
        "empty_masks": EMPTY_CONVENTION,
    }
