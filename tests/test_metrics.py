"""Segmentation metrics against hand-computed values, including the empty-mask conventions."""

from __future__ import annotations

import math

import pytest
import torch

from cmgnet.metrics import confusion_counts, hd95, per_image_rows, scores, summarize


def masks(*rows: str) -> torch.Tensor:
    """``masks("11..", "....")`` -> a 1 x 1 x H x W boolean mask."""
    return torch.tensor([[c == "1" for c in r] for r in rows]).view(1, 1, len(rows), len(rows[0]))


PRED = masks("1100", "1100", "0000", "0000")
TARGET = masks("1111", "1111", "0000", "0000")


def test_counts_and_ratios_by_hand():
    counts = confusion_counts(PRED, TARGET)
    assert counts.tolist() == [[4, 0, 4, 8]]  # TP, FP, FN, TN
    s = {k: float(v[0]) for k, v in scores(counts).items()}
    assert s["dice"] == pytest.approx(2 * 4 / (2 * 4 + 0 + 4))  # 0.667
    assert s["iou"] == pytest.approx(4 / 8)
    assert s["precision"] == pytest.approx(1.0)
    assert s["recall"] == pytest.approx(0.5)
    assert s["f1"] == pytest.approx(2 * 1.0 * 0.5 / 1.5)  # equals Dice for binary masks
    assert s["accuracy"] == pytest.approx(12 / 16)


@pytest.mark.parametrize(
    "pred, target, expected",
    [
        # both empty: agreement on "no lesion"
        (masks("00", "00"), masks("00", "00"),
         dict(dice=1, iou=1, precision=1, recall=1, f1=1, accuracy=1, hd95=0.0)),
        # missed lesion: nothing predicted
        (masks("00", "00"), masks("10", "00"),
         dict(dice=0, iou=0, precision=0, recall=0, f1=0, accuracy=0.75, hd95=math.nan)),
        # false alarm on a lesion-free image
        (masks("11", "00"), masks("00", "00"),
         dict(dice=0, iou=0, precision=0, recall=0, f1=0, accuracy=0.5, hd95=math.nan)),
    ],
    ids=["both-empty", "pred-empty", "target-empty"],
)
def test_empty_mask_conventions(pred, target, expected):
    row = per_image_rows(pred, target, ["x"])[0]
    for key, value in expected.items():
        if math.isnan(value):
            assert math.isnan(row[key]), key
        else:
            assert row[key] == pytest.approx(value), key


def test_hd95_by_hand():
    # Single pixels 3 apart along a row: every surface distance is 3.
    pred = masks("1000", "0000")
    target = masks("0001", "0000")
    assert float(hd95(pred, target)[0]) == pytest.approx(3.0)
    # Identical masks: distance 0.
    assert float(hd95(TARGET, TARGET)[0]) == pytest.approx(0.0)


def test_per_image_mean_vs_pooled_by_hand():
    a_pred, a_tgt = PRED, TARGET  # TP 4, FP 0, FN 4 -> Dice 2/3
    b_pred = masks("0000", "0000", "0000", "0000")
    b_tgt = masks("0000", "0000", "0000", "0001")  # missed one pixel -> Dice 0
    rows = per_image_rows(torch.cat([a_pred, b_pred]), torch.cat([a_tgt, b_tgt]), ["a", "b"])
    summary = summarize(rows)
    assert summary["n_images"] == 2
    assert summary["per_image_mean"]["dice"] == pytest.approx((2 / 3 + 0) / 2)
    # pooled: TP 4, FP 0, FN 5 -> Dice 8 / 13, accuracy (4 + 8 + 15) / 32
    assert summary["pooled"]["dice"] == pytest.approx(8 / 13)
    assert summary["pooled"]["recall"] == pytest.approx(4 / 9)
    assert summary["pooled"]["accuracy"] == pytest.approx(27 / 32)
    # HD95 is undefined for image b (prediction empty): excluded from the mean and counted.
    assert summary["per_image_mean"]["hd95_undefined"] == 1
    assert summary["per_image_mean"]["hd95"] == pytest.approx(rows[0]["hd95"])
    assert "per_image_mean" in summary["conventions"] and "pooled" in summary["conventions"]


def test_summarize_refuses_double_counting():
    rows = per_image_rows(torch.cat([PRED, PRED]), torch.cat([TARGET, TARGET]), ["a", "a"], with_hd95=False)
    with pytest.raises(ValueError, match="more than once"):
        summarize(rows)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shape"):
        confusion_counts(PRED, TARGET[..., :2])


def test_overlay_colours_agreement_and_carries_a_legend():
    import numpy as np

    from cmgnet.train.evaluate import OVERLAY_COLOURS, overlay

    image = np.full((32, 80, 3), 100, np.uint8)
    pred, truth = np.zeros((32, 80), bool), np.zeros((32, 80), bool)
    pred[:, :20], truth[:, 10:30] = True, True
    out = overlay(image, pred, truth)
    assert out.shape == (32 + 14, 160, 3)
    assert (out[:32, :80] == image).all()  # the plain image on the left
    coloured = out[:32, 80:].astype(int)
    for col, key in ((5, (True, False)), (15, (True, True)), (25, (False, True))):
        rgb = np.array(OVERLAY_COLOURS[key][0])
        assert np.argmax(coloured[0, col]) == np.argmax(rgb)  # tinted towards its legend colour
    legend = out[32:]
    for rgb, _ in OVERLAY_COLOURS.values():
        assert (legend == np.array(rgb, np.uint8)).all(-1).any()  # every colour has its swatch
