"""Augmentation: the 24 variants, per-sample draws, and the PyTorch ops against DALI."""

from __future__ import annotations

import io
from dataclasses import replace

import numpy as np
import pytest
import torch
from data_fixtures import case, requires_dali
from PIL import Image

from cmgnet.data import LesionRecord, Sample
from cmgnet.data.augment import (
    NUM_VARIANTS,
    AugmentParams,
    TransformSpec,
    apply_transform,
    sample_params,
    variant_params,
)
from cmgnet.data.augment.params import BLUR_SIGMA, RGB_SHIFT, crop_box
from cmgnet.inference import IMAGENET_MEAN, IMAGENET_STD
from cmgnet.inference import InferenceRecord

SPEC = TransformSpec(InferenceRecord(image_size=32, mean=IMAGENET_MEAN, std=IMAGENET_STD), variants=True)


def sample(image_id="ISIC_0000001", variant=None):
    record = LesionRecord(image_id, None, None, None, None, None, None, None, None, "test")
    return Sample(record, variant)


def test_24_variants_are_8_rotations_times_3_effects():
    rng = np.random.default_rng(0)
    params = [variant_params(v, rng) for v in range(NUM_VARIANTS)]
    assert sorted({p.angle for p in params}) == [45.0 * k for k in range(8)]
    effects = [("blur" if p.blur_sigma else "shift" if any(p.rgb_shift) else "plain", p.angle) for p in params]
    assert len(set(effects)) == 24
    assert all(BLUR_SIGMA[0] <= p.blur_sigma <= BLUR_SIGMA[1] for p in params if p.blur_sigma)
    assert all(abs(s) <= RGB_SHIFT for p in params for s in p.rgb_shift)
    with pytest.raises(ValueError):
        variant_params(24, rng)


def test_draws_depend_only_on_seed_epoch_and_sample():
    train = [sample_params(sample(f"ISIC_{i:07d}"), SPEC, seed=1, epoch=0, train=True) for i in range(48)]
    again = [sample_params(sample(f"ISIC_{i:07d}"), SPEC, seed=1, epoch=0, train=True) for i in range(48)]
    later = [sample_params(sample(f"ISIC_{i:07d}"), SPEC, seed=1, epoch=1, train=True) for i in range(48)]
    assert train == again and train != later
    assert len({p.angle for p in train}) == 8  # every rotation occurs
    assert sample_params(sample(), SPEC, seed=1, epoch=3, train=False) == AugmentParams()  # evaluation: identity
    pinned = [sample_params(sample(variant=17), SPEC, seed=1, epoch=e, train=e > 0) for e in range(3)]
    assert pinned[0] == pinned[1] == pinned[2] and pinned[0].angle == 45.0 and any(pinned[0].rgb_shift)


def test_strong_adds_flips_and_jitter_only_in_training():
    strong = replace(SPEC, strong=True)
    draws = [sample_params(sample(f"ISIC_{i:07d}"), strong, seed=0, epoch=0, train=True) for i in range(32)]
    assert any(p.flip_h for p in draws) and any(p.flip_v for p in draws)
    assert all(0.8 <= p.brightness <= 1.2 and 0.8 <= p.saturation <= 1.2 for p in draws)
    assert sample_params(sample(variant=3), strong, seed=0, epoch=0, train=False).flip_h is False


def test_identity_transform_normalizes_exactly():
    image = np.full((40, 40, 3), (200, 100, 50), np.uint8)
    mask = np.zeros((40, 40), np.uint8)
    mask[10:30, 5:20] = 255
    x, m = apply_transform(image, mask, SPEC, AugmentParams())
    expected = (torch.tensor([200, 100, 50]) / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert torch.allclose(x.mean((1, 2)), expected.float(), atol=1e-5)
    assert m.shape == (1, 32, 32) and set(m.unique().tolist()) == {0.0, 1.0}
    shifted, _ = apply_transform(image, mask, SPEC, AugmentParams(rgb_shift=(10.0, 0.0, -10.0)))
    delta = (shifted - x).mean((1, 2)) * torch.tensor(IMAGENET_STD) * 255
    assert torch.allclose(delta, torch.tensor([10.0, 0.0, -10.0]), atol=1e-3)


@pytest.mark.parametrize("angle", [45.0 * k for k in range(8)])
def test_image_and_mask_share_the_geometry(angle):
    _, mask = case(3, 64)
    mask[:8, :8] = 255  # asymmetric marker
    image = np.repeat(mask[..., None], 3, axis=-1)
    params = AugmentParams(angle=angle, flip_h=True)
    x, m = apply_transform(image, mask, replace(SPEC, strong=True), params)
    grey = x[0] * IMAGENET_STD[0] + IMAGENET_MEAN[0] > 0.5
    assert (grey == m[0].bool()).float().mean() > 0.97


def test_rotation_by_90_is_counter_clockwise():
    image = np.zeros((32, 32, 3), np.uint8)
    image[:4, -4:] = 255  # top-right corner
    x, _ = apply_transform(image, np.zeros((32, 32), np.uint8), SPEC, AugmentParams(angle=90.0))
    assert x[0, :4, :4].mean() > x[0].mean()  # now top-left


def test_center_crop_box_and_non_square_input():
    assert crop_box(30, 40) == (0, 5, 30) and crop_box(41, 30) == (5, 0, 30)
    image = np.zeros((30, 40, 3), np.uint8)
    image[:, :5] = 255  # a stripe the centre crop removes
    spec = replace(SPEC, record=replace(SPEC.record, center_crop=True))
    x, m = apply_transform(image, np.zeros((30, 40), np.uint8), spec, AugmentParams())
    assert x.shape == (3, 32, 32) and m.shape == (1, 32, 32)
    assert torch.allclose(x[0], torch.full_like(x[0], -IMAGENET_MEAN[0] / IMAGENET_STD[0]), atol=1e-5)


def encode(array: np.ndarray) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return np.frombuffer(buffer.getvalue(), np.uint8)


def run_dali(spec: TransformSpec, image: np.ndarray, mask: np.ndarray, params: list[AugmentParams]) -> dict:
    """One DALI batch of ``image``/``mask`` under each of ``params`` (CPU operators)."""
    from nvidia.dali.plugin.pytorch import DALIGenericIterator

    from cmgnet.data.augment.dali_pipeline import build_pipeline, sample_inputs, source_inputs

    top, left, side = crop_box(*mask.shape)
    values = [
        {
            "image_bytes": encode(image),
            "mask_bytes": encode(mask),
            "mean": np.array([255 * m - s for m, s in zip(IMAGENET_MEAN, p.rgb_shift, strict=True)], np.float32),
            "index": np.array(v, np.int64),
            "resize": np.array(True),
            "roi_start": np.array([top, left], np.float32),
            "roi_end": np.array([top + side, left + side], np.float32),
            **sample_inputs(p, spec.size),
        }
        for v, p in enumerate(params)
    ]
    batch = tuple([sample[name] for sample in values] for name in source_inputs(spec))
    pipe = build_pipeline([batch], spec, batch_size=len(params), num_threads=1)
    return next(iter(DALIGenericIterator([pipe], ["image", "mask", "index", "ambiguous"], size=-1)))[0]


def assert_dali_matches_torch(spec: TransformSpec, params: list[AugmentParams]) -> None:
    image, mask = case(1, 48)
    image, mask = image[:40], mask[:40]  # non-square: 48 x 40
    output = run_dali(spec, image, mask, params)
    for v, p in enumerate(params):
        x, m = apply_transform(image, mask, spec, p)
        assert (output["image"][v] - x).abs().mean() < 0.02, (v, p)
        assert (output["mask"][v] != m).float().mean() < 0.01, (v, p)


@requires_dali
@pytest.mark.parametrize("center_crop", [False, True])
def test_dali_matches_torch_for_every_variant(center_crop):
    """Both backends, the same fixed variant: equal within interpolation tolerance."""
    spec = TransformSpec(InferenceRecord(image_size=32, mean=IMAGENET_MEAN, std=IMAGENET_STD, center_crop=center_crop),
                         variants=True, strong=True)
    rng = np.random.default_rng(0)
    params = [variant_params(v, rng) for v in range(NUM_VARIANTS)]
    params[5] = AugmentParams(angle=225.0, blur_sigma=1.0, flip_h=True, brightness=1.1, contrast=0.85, saturation=1.2)
    assert_dali_matches_torch(spec, params)


@requires_dali
def test_dali_matches_torch_with_zoom_and_translation():
    spec = replace(SPEC, strong=True, scale=(0.7, 1.4), shift=0.15)
    draws = [sample_params(sample(f"ISIC_{i:07d}"), spec, seed=3, epoch=0, train=True) for i in range(24)]
    draws[0] = AugmentParams(angle=90.0, scale=1.3, shift=(0.1, -0.05), flip_v=True)  # a right angle inside the warp
    draws[1] = AugmentParams(angle=180.0)  # no zoom in this draw: the exact transpose + flip path
    assert any(p.scale < 1 for p in draws) and any(p.scale > 1 for p in draws)
    assert_dali_matches_torch(spec, draws)


def test_warp_matrix_zooms_and_moves_about_the_centre():
    from cmgnet.data.augment.params import warp_matrix

    def source_of(params, x, y, size=100):
        return warp_matrix(params, size) @ np.array([x, y, 1.0])

    assert np.allclose(warp_matrix(AugmentParams(), 10), [[1, 0, 0], [0, 1, 0]])
    assert np.allclose(source_of(AugmentParams(scale=2.0), 50, 50), [50, 50])  # the centre stays
    assert np.allclose(source_of(AugmentParams(scale=2.0), 100, 0), [75, 25])  # a corner shows half as far out
    assert np.allclose(source_of(AugmentParams(shift=(0.1, 0.0)), 60, 50), [50, 50])  # content moves right
    assert np.allclose(source_of(AugmentParams(angle=90.0), 0, 0), [100, 0])  # counter-clockwise, y down


def test_zoom_and_translation_move_image_and_mask_together():
    image = np.zeros((64, 64, 3), np.uint8)
    mask = np.zeros((64, 64), np.uint8)
    image[24:40, 24:40], mask[24:40, 24:40] = 255, 255  # a centred 16 px square
    spec = replace(SPEC, record=replace(SPEC.record, image_size=(64, 64)))
    _, zoomed = apply_transform(image, mask, spec, AugmentParams(scale=2.0))
    assert zoomed.sum() == pytest.approx(32 * 32, rel=0.05)
    x, moved = apply_transform(image, mask, spec, AugmentParams(angle=45.0, shift=(0.25, 0.0)))
    columns = moved[0].nonzero()[:, 1].float()
    assert columns.mean() == pytest.approx(32 + 16 - 0.5, abs=1)  # the centre moved right by a quarter side
    grey = x[0] * IMAGENET_STD[0] + IMAGENET_MEAN[0] > 0.5
    assert (grey == moved[0].bool()).float().mean() > 0.98


def test_zoom_and_translation_are_drawn_last_and_only_in_training():
    spec = replace(SPEC, strong=True, scale=(0.75, 1.33), shift=0.1)
    keys = [sample(f"ISIC_{i:07d}") for i in range(64)]
    draws = [sample_params(s, spec, seed=0, epoch=2, train=True) for s in keys]
    plain = [sample_params(s, replace(spec, scale=(1.0, 1.0), shift=0.0), seed=0, epoch=2, train=True) for s in keys]
    assert all(0.75 <= p.scale <= 1.33 and max(map(abs, p.shift)) <= 0.1 for p in draws)
    assert min(p.scale for p in draws) < 0.85 and max(p.scale for p in draws) > 1.2
    assert [replace(p, scale=1.0, shift=(0.0, 0.0)) for p in draws] == plain  # earlier draws unchanged
    assert sample_params(keys[0], spec, seed=0, epoch=2, train=False) == AugmentParams()


def test_data_config_checks_the_ranges():
    from cmgnet.data.config import DataConfig

    assert DataConfig(scale_range=[0.8, 1.25]).scale_range == (0.8, 1.25)
    with pytest.raises(ValueError, match="scale_range"):
        DataConfig(scale_range=(1.2, 0.8))
    with pytest.raises(ValueError, match="shift_range"):
        DataConfig(shift_range=0.5)
