"""Mask post-processing (largest connected component, filled holes) and where it is applied."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cmgnet.inference import InferenceRecord
from cmgnet.model.postprocess import MODES, clean_mask, clean_masks


def _lesion_with_hole_and_speck() -> np.ndarray:
    mask = np.zeros((12, 12), dtype=bool)
    mask[2:8, 2:8] = True      # the lesion, 36 px
    mask[4:6, 4:6] = False     # a 4 px hole inside it
    mask[10, 10] = True        # a 1 px false positive elsewhere
    return mask


@pytest.mark.parametrize("mode, pixels", [("none", 33), ("largest", 32), ("fill", 37), ("largest+fill", 36)])
def test_each_mode(mode, pixels):
    mask = _lesion_with_hole_and_speck()
    out = clean_mask(mask, mode)
    assert out.dtype == bool and out.shape == mask.shape and int(out.sum()) == pixels
    assert out[2:8, 2:8].sum() >= 32  # the lesion itself is never removed


def test_diagonal_neighbours_are_one_component_and_empty_masks_stay_empty():
    mask = np.zeros((4, 4), dtype=bool)
    mask[0, 0] = mask[1, 1] = mask[3, 3] = True  # (0,0)-(1,1) touch diagonally
    assert int(clean_mask(mask, "largest").sum()) == 2
    empty = np.zeros((5, 5), dtype=bool)
    assert not clean_mask(empty, "largest+fill").any()


def test_batches_and_bad_modes():
    batch = torch.from_numpy(np.stack([_lesion_with_hole_and_speck()] * 2))[:, None]
    out = clean_masks(batch, "largest+fill")
    assert out.shape == batch.shape and out.dtype == torch.bool and out.sum().item() == 72
    assert clean_masks(batch, "none") is batch
    with pytest.raises(ValueError, match="postprocess must be one of"):
        clean_mask(np.zeros((2, 2), bool), "biggest")
    with pytest.raises(ValueError, match="postprocess"):
        InferenceRecord(postprocess="biggest")
    assert set(MODES) == {"none", "largest", "fill", "largest+fill"}


def test_evaluation_scores_the_cleaned_masks():
    from cmgnet.metrics import per_image_rows

    truth = torch.zeros(1, 1, 12, 12, dtype=torch.bool)
    truth[0, 0, 2:8, 2:8] = True
    pred = torch.from_numpy(_lesion_with_hole_and_speck())[None, None]
    raw = per_image_rows(pred, truth, ["a"], with_hd95=False)[0]
    cleaned = per_image_rows(clean_masks(pred, "largest+fill"), truth, ["a"], with_hd95=False)[0]
    assert raw["dice"] < cleaned["dice"] == 1.0
