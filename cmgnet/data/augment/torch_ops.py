"""The PyTorch implementation of the transform (the path for machines without DALI).

Each step mirrors the DALI pipeline in :mod:`cmgnet.data.augment.dali_pipeline`, with the
same conventions (checked against DALI in the tests): antialiased bilinear resize for
images and nearest-neighbour for masks, counter-clockwise rotation, zoom and translation
about the image centre with zero fill, Gaussian blur with reflect-101 borders, colour
jitter as one affine colour map, and the RGB shift folded into normalisation.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from cmgnet.inference import InferenceRecord

from .params import AugmentParams, TransformSpec, blur_radius, color_matrix, crop_box, warp_matrix


def _resize(x: torch.Tensor, size: tuple[int, int], mask: bool) -> torch.Tensor:
    if tuple(x.shape[-2:]) == size:
        return x
    if mask:
        return F.interpolate(x, size=size, mode="nearest-exact")
    return F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)


def geometry(x: torch.Tensor, record: InferenceRecord, mask: bool) -> torch.Tensor:
    """Resize ``1 x C x H x W`` to the record's image size (after the centred square crop if ``record.center_crop``)."""
    if record.center_crop:
        top, left, side = crop_box(x.shape[-2], x.shape[-1])
        x = x[..., top : top + side, left : left + side]
    return _resize(x, tuple(record.image_size), mask)


def warp(x: torch.Tensor, params: AugmentParams, mask: bool) -> torch.Tensor:
    """Rotate counter-clockwise, zoom and translate a square ``1 x C x S x S`` tensor (:func:`warp_matrix`).

    The canvas is kept and uncovered pixels are 0; right angles without zoom or translation
    are exact (``rot90``, which is what the interpolating warp gives there).
    """
    angle = params.angle % 360.0
    if not params.affine and angle % 90 == 0:
        return torch.rot90(x, int(angle // 90), dims=(-2, -1)) if angle else x
    size = x.shape[-1]
    matrix = torch.from_numpy(warp_matrix(params, size)).double()
    linear, offset = matrix[:, :2], matrix[:, 2]
    # The same map in affine_grid's coordinates, u = 2 x / S - 1 on both sides.
    shift = linear.sum(1) + 2 * offset / size - 1
    theta = torch.cat([linear, shift[:, None]], 1)[None].to(x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="nearest" if mask else "bilinear", padding_mode="zeros", align_corners=False)


def flip(x: torch.Tensor, params: AugmentParams) -> torch.Tensor:
    """Mirror left-right and/or top-bottom."""
    dims = [d for d, on in ((-1, params.flip_h), (-2, params.flip_v)) if on]
    return torch.flip(x, dims) if dims else x


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``1 x C x H x W``, window ``2 * ceil(3 sigma) + 1``, reflect-101 borders."""
    radius = blur_radius(sigma)
    if radius == 0:
        return x
    offsets = torch.arange(-radius, radius + 1, dtype=x.dtype)
    kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    channels = x.shape[1]
    x = F.pad(x, (radius, radius, radius, radius), mode="reflect")
    x = F.conv2d(x, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    return F.conv2d(x, kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)


def color_jitter(x: torch.Tensor, params: AugmentParams) -> torch.Tensor:
    """Brightness, contrast and saturation as one affine colour map (:func:`color_matrix`), clamped to 0..255."""
    if params.brightness == params.contrast == params.saturation == 1:
        return x
    matrix, offset = (torch.from_numpy(a) for a in color_matrix(params))
    return (torch.einsum("ij,bjhw->bihw", matrix, x) + offset.view(1, 3, 1, 1)).clamp(0, 255)


def normalize(x: torch.Tensor, record: InferenceRecord, rgb_shift: tuple[float, float, float] = (0.0, 0.0, 0.0)
              ) -> torch.Tensor:
    """``((x + shift) / 255 - mean) / std`` per channel, ``x`` in 0..255."""
    offset = torch.tensor([255 * m - s for m, s in zip(record.mean, rgb_shift, strict=True)], dtype=x.dtype).view(
        1, 3, 1, 1
    )
    scale = torch.tensor([255 * s for s in record.std], dtype=x.dtype).view(1, 3, 1, 1)
    return (x - offset) / scale


def _as_tensor(pixels: np.ndarray) -> torch.Tensor:
    # from_numpy needs writable memory; np.require copies only arrays that are not.
    return torch.from_numpy(np.require(pixels, requirements=("C", "W")))


def preprocess_image(image: np.ndarray, record: InferenceRecord) -> torch.Tensor:
    """The evaluation transform of one decoded image: crop, resize and normalise as the record says.

    What evaluation loaders give the network (:func:`apply_transform` with no augmentation
    computes exactly this) and what serving gives it (:func:`cmgnet.deploy.runtime.preprocess`).

    Args:
        image: ``H x W x 3`` ``uint8`` RGB.
        record: the model's inference record.

    Returns:
        ``1 x 3 x h x w`` normalised ``float32``.
    """
    x = _as_tensor(image).permute(2, 0, 1)[None].float()
    return normalize(geometry(x, record, mask=False), record)


def apply_transform(
    image: np.ndarray, mask: np.ndarray, spec: TransformSpec, params: AugmentParams
) -> tuple[torch.Tensor, torch.Tensor]:
    """Transform one decoded image and its mask with identical geometry.

    Args:
        image: ``H x W x 3`` ``uint8`` RGB.
        mask: ``H x W`` ``uint8``, 0 background and above 127 lesion.
        spec: the loader's transform.
        params: this sample's draw (:func:`~cmgnet.data.augment.params.sample_params`).

    Returns:
        ``(image, mask)``: ``3 x S x S`` normalised ``float32`` and ``1 x S x S`` ``float32`` in {0, 1}.
    """
    x = _as_tensor(image).permute(2, 0, 1)[None].float()
    m = _as_tensor(mask)[None, None].float()
    x, m = geometry(x, spec.record, mask=False), geometry(m, spec.record, mask=True)
    x, m = warp(x, params, mask=False), warp(m, params, mask=True)
    x, m = flip(x, params), flip(m, params)
    x = color_jitter(gaussian_blur(x, params.blur_sigma), params)
    x = normalize(x, spec.record, params.rgb_shift)
    return x[0].contiguous(), (m[0] > 127).float()
