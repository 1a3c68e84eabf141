"""Bootstrap intervals, the paired comparison of two evaluations, and the thresholded Jaccard (issue 21)."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch

from cmgnet.cli import main as cli_main
from cmgnet.metrics import JACCARD_THRESHOLD, per_image_rows, summarize, thresholded_jaccard
from cmgnet.stats import RESAMPLES, SEED, bootstrap_ci, paired_difference, paired_differences, resampled_means

VALUES = np.random.default_rng(1).beta(8, 2, size=121)  # Dice-like scores of a 121-image test split


def loop_ci(values, resamples=RESAMPLES, seed=SEED, confidence=0.95):
    """The textbook percentile bootstrap, one resample at a time."""
    rng = np.random.default_rng(seed)
    means = []
    for _ in range(resamples):
        sample = [values[int(i)] for i in rng.integers(0, len(values), size=len(values))]
        means.append(sum(sample) / len(sample))
    tail = 100 * (1 - confidence) / 2
    return tuple(np.percentile(means, [tail, 100 - tail]))


def test_ci_equals_a_loop_over_resamples_with_the_same_seed():
    assert bootstrap_ci(VALUES) == pytest.approx(loop_ci(list(VALUES)), abs=1e-12)
    assert bootstrap_ci(VALUES, seed=5, confidence=0.9) == pytest.approx(loop_ci(list(VALUES), seed=5, confidence=0.9),
                                                                         abs=1e-12)
    assert bootstrap_ci(VALUES) == bootstrap_ci(VALUES)  # fixed seed: reproducible
    low, high = bootstrap_ci(VALUES)
    assert low < VALUES.mean() < high


def test_large_sets_are_resampled_in_chunks_with_the_same_stream(monkeypatch):
    import cmgnet.stats as stats

    whole = resampled_means(VALUES, 300)
    monkeypatch.setattr(stats, "_CHUNK", 7 * VALUES.size)  # 7 resamples per draw
    assert np.array_equal(resampled_means(VALUES, 300), whole)


def test_ci_agrees_with_scipy_percentile_bootstrap():
    scipy_stats = pytest.importorskip("scipy.stats")
    se = VALUES.std(ddof=1) / math.sqrt(VALUES.size)
    ours = bootstrap_ci(VALUES, resamples=20000)
    ref = scipy_stats.bootstrap((VALUES,), np.mean, n_resamples=20000, method="percentile",
                                random_state=0).confidence_interval
    # Different random streams: equal up to Monte-Carlo error (a 90% interval would be ~0.3 SE off).
    assert abs(ours[0] - ref.low) < 0.1 * se and abs(ours[1] - ref.high) < 0.1 * se


def test_ci_leaves_nan_out_and_handles_degenerate_sets():
    assert bootstrap_ci([0.5, math.nan, 0.7, 0.9]) == bootstrap_ci([0.5, 0.7, 0.9])
    assert bootstrap_ci([0.8]) == (0.8, 0.8)
    assert all(math.isnan(v) for v in bootstrap_ci([math.nan]))


def test_paired_difference_bootstraps_per_image_differences():
    rng = np.random.default_rng(2)
    a = {f"img{i}": float(v) for i, v in enumerate(VALUES)}
    b = {k: v - 0.01 + float(rng.normal(0, 0.005)) for k, v in a.items()}  # a little worse on every image
    d = paired_difference(a, b)
    ids = sorted(a)
    diffs = np.array([a[i] - b[i] for i in ids])
    assert d["n_images"] == 121 and d["difference"] == pytest.approx(d["mean_a"] - d["mean_b"], abs=1e-12)
    assert d["difference"] == pytest.approx(diffs.mean(), abs=1e-12)
    assert d["ci95"] == pytest.approx(loop_ci(list(diffs)), abs=1e-12)
    assert 0 < d["ci95"][0] < d["difference"] < d["ci95"][1]
    # Unpaired, the two intervals overlap: pairing is what shows the consistent gap.
    assert bootstrap_ci(list(b.values()))[1] > bootstrap_ci(list(a.values()))[0]
    assert paired_difference(dict(reversed(list(a.items()))), b) == d  # the row order does not matter
    with pytest.raises(ValueError, match="not the same images"):
        paired_difference(a, {**b, "extra": 0.5})


def test_paired_difference_leaves_out_images_undefined_in_either():
    d = paired_difference({"x": 1.0, "y": math.nan, "z": 3.0}, {"x": 0.5, "y": 2.0, "z": math.nan})
    assert d["n_images"] == 1 and d["difference"] == 0.5 and d["ci95"] == [0.5, 0.5]
    rows = paired_differences([{"image_id": "x", "dice": 0.9}], [{"image_id": "x", "dice": 0.8}], ["dice", "hd95"])
    assert list(rows) == ["dice"] and rows["dice"]["difference"] == pytest.approx(0.1)


def _square(size: int, side: int, x0: int = 0) -> torch.Tensor:
    mask = torch.zeros(size, size, dtype=torch.bool)
    mask[:side, x0:x0 + side] = True
    return mask


def test_thresholded_jaccard_on_hand_made_masks():
    target = _square(20, 10)  # 100 px
    exact_pred, exact_target = torch.zeros(20, 20, dtype=torch.bool), torch.zeros(20, 20, dtype=torch.bool)
    exact_target.view(-1)[:100] = True
    exact_pred.view(-1)[:65] = True  # IoU 65 / 100 = 0.65: kept (only scores below 0.65 become 0)
    preds = {"above": _square(20, 10, 2),  # IoU 80 / 120 = 0.667: kept
             "below": _square(20, 10, 3)}  # IoU 70 / 130 = 0.538: 0
    empty = torch.zeros(20, 20, dtype=torch.bool)
    cases = {  # id -> (prediction, ground truth, expected thresholded Jaccard)
        "above": (preds["above"], target, 80 / 120),
        "below": (preds["below"], target, 0.0),
        "exact": (exact_pred, exact_target, 0.65),
        "both_empty": (empty, empty, 1.0),  # agreement on "no lesion": IoU 1
        "missed": (empty, target, 0.0),
        "false_alarm": (target, empty, 0.0),
    }
    ids = list(cases)
    pred = torch.stack([cases[i][0] for i in ids])[:, None]
    truth = torch.stack([cases[i][1] for i in ids])[:, None]
    rows = {r["image_id"]: r for r in per_image_rows(pred, truth, ids, with_hd95=False)}
    for image_id, (_, _, expected) in cases.items():
        assert rows[image_id]["thresholded_jaccard"] == pytest.approx(expected), image_id
    assert rows["below"]["iou"] == pytest.approx(70 / 130)  # IoU itself is untouched
    summary = summarize(rows.values(), with_hd95=False)
    assert summary["per_image_mean"]["thresholded_jaccard"] == pytest.approx(sum(c[2] for c in cases.values()) / 6)
    assert "thresholded_jaccard" not in summary["pooled"]  # a per-image metric only
    assert JACCARD_THRESHOLD == 0.65
    iou = torch.tensor([0.0, 0.6499, 0.65, 0.9], dtype=torch.float64)
    assert thresholded_jaccard(iou).tolist() == [0.0, 0.0, 0.65, 0.9]


def test_summary_has_an_interval_for_every_per_image_mean():
    size = 16
    g = torch.Generator().manual_seed(0)
    target = torch.rand(12, 1, size, size, generator=g) > 0.5
    pred = target ^ (torch.rand(12, 1, size, size, generator=g) > 0.8)
    rows = per_image_rows(pred, target, [f"i{k:02d}" for k in range(12)])
    summary = summarize(rows)
    means, intervals = summary["per_image_mean"], summary["per_image_ci95"]
    assert set(intervals) == set(means) - {"hd95_undefined"}
    for metric, (low, high) in intervals.items():
        assert low <= means[metric] <= high, metric
        column = sorted(rows, key=lambda r: r["image_id"])
        assert (low, high) == bootstrap_ci([r[metric] for r in column]), metric
    assert summary["bootstrap"]["resamples"] == RESAMPLES and summary["bootstrap"]["seed"] == SEED
    assert summarize(list(reversed(rows)))["per_image_ci95"] == intervals  # gather order does not matter


def _write_per_image(path, values: dict[str, float], extra: dict[str, float] | None = None):
    path.mkdir(parents=True, exist_ok=True)
    with open(path / "per_image.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image_id", "dice", "hd95", "split", "text_regime"])
        for image_id, v in {**values, **(extra or {})}.items():
            writer.writerow([image_id, v, "", "test", "x"])
    return path


def test_compare_evals_cli(tmp_path, capsys):
    a = {f"ISIC_{i}": float(v) for i, v in enumerate(VALUES[:30])}
    b = {k: v - 0.02 for k, v in a.items()}
    dir_a, dir_b = _write_per_image(tmp_path / "test-metadata", a), _write_per_image(tmp_path / "test-shuffled", b)
    assert cli_main(["compare-evals", str(dir_a), str(dir_b / "per_image.csv"), "--json",
                     str(tmp_path / "paired.json")]) == 0
    out = capsys.readouterr().out
    assert "dice" in out and "+2.00" in out and "95% CI" in out
    saved = json.loads((tmp_path / "paired.json").read_text())
    assert saved["paired"]["dice"] == paired_difference(a, b) and saved["bootstrap"]["resamples"] == RESAMPLES
    assert "hd95" in saved["paired"] and saved["paired"]["hd95"]["n_images"] == 0  # empty cells: NaN, left out

    other = _write_per_image(tmp_path / "val-shuffled", b, {"ISIC_extra": 0.5})
    assert cli_main(["compare-evals", str(dir_a), str(other)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "not the same images" in err and str(other) in err
    assert cli_main(["compare-evals", str(dir_a), str(tmp_path / "nowhere")]) == 1
    assert "nowhere" in capsys.readouterr().err
    assert cli_main(["compare-evals", str(dir_a), str(dir_b), "--metric", "iou"]) == 1
    assert "'iou'" in capsys.readouterr().err
