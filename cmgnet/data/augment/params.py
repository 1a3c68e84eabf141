"""Augmentation parameters, drawn once per sample in Python and applied by either backend.

Drawing the numbers outside the pipeline means the DALI and PyTorch paths apply *the same*
transform to the same sample of the same epoch, and the draw depends only on
``(seed, epoch, sample key)``: not on worker count, rank or backend.

The paper's 24 variants (section 4.1): rotation ``45 * (v % 8)`` degrees combined with
effect ``v // 8``: 0 plain, 1 Gaussian blur, 2 RGB shift. Beyond the paper, training can
also zoom and translate (``scale``, ``shift``): lesions in the ISIC sets cover from 1% to
all of the frame, and the same warp draws new sizes and positions of them.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, replace

import numpy as np

from cmgnet.inference import InferenceRecord

from ..records import Sample

NUM_ROTATIONS = 8
ROTATION_STEP = 45.0
EFFECTS: tuple[str, ...] = ("plain", "blur", "rgb_shift")
NUM_VARIANTS = NUM_ROTATIONS * len(EFFECTS)

# The paper gives no magnitudes; these are mild, dermoscopy-plausible choices.
BLUR_SIGMA = (0.5, 1.5)  # Gaussian sigma range, in output pixels
RGB_SHIFT = 20.0  # max per-channel offset in 0..255 units (albumentations' RGBShift default)
FLIP_PROBABILITY = 0.5
JITTER = 0.2  # brightness, contrast and saturation factors drawn from [1 - JITTER, 1 + JITTER]

AUGMENTS: tuple[str, ...] = ("paper", "paper+strong", "none")


@dataclass(frozen=True)
class TransformSpec:
    """What a loader's transform does, fixed when the loader is built.

    Args:
        record: the preprocessing (image size, centre crop, normalisation): the model's
            :class:`~cmgnet.inference.InferenceRecord`, so evaluation transforms images exactly
            as serving does. With ``center_crop`` the centred square (:func:`crop_box`) is
            taken before resizing, keeping the aspect ratio; otherwise the whole image is resized.
        variants: rotations, blur and RGB shift may occur (training, or fixed paper variants).
        strong: flips and colour jitter may occur (``augment="paper+strong"`` in training).
        scale: range of the random zoom factor (drawn log-uniformly; ``(1, 1)``: no zoom).
        shift: largest random translation, as a fraction of the side, per axis (0: none).
    """

    record: InferenceRecord
    variants: bool = False
    strong: bool = False
    scale: tuple[float, float] = (1.0, 1.0)
    shift: float = 0.0

    @property
    def affine(self) -> bool:
        """Zoom or translation may occur (the general warp, not only rotations)."""
        return self.scale != (1.0, 1.0) or self.shift > 0

    @property
    def image_size(self) -> tuple[int, int]:
        """Output ``(height, width)``."""
        return self.record.image_size

    @property
    def size(self) -> int:
        """Output side of the square images the augmentations (rotations, warps) work on.

        Raises:
            ValueError: the record's image is not square.
        """
        height, width = self.record.image_size
        if height != width:
            raise ValueError(f"augmentation needs a square image size, got {height} x {width}")
        return height

    @property
    def center_crop(self) -> bool:
        return self.record.center_crop

    @property
    def mean(self) -> tuple[float, float, float]:
        return self.record.mean

    @property
    def std(self) -> tuple[float, float, float]:
        return self.record.std


@dataclass(frozen=True)
class AugmentParams:
    """One sample's transform; the defaults are the identity.

    Attributes:
        angle: counter-clockwise rotation in degrees (canvas size kept, corners filled with 0).
        blur_sigma: Gaussian blur sigma in pixels (0: no blur).
        rgb_shift: offsets added to R, G, B in 0..255 units.
        flip_h: mirror left-right.
        flip_v: mirror top-bottom.
        brightness: multiplicative brightness factor.
        contrast: contrast factor around grey level 128.
        saturation: saturation factor (0 grey, 1 unchanged).
        scale: zoom about the image centre (above 1 enlarges the content; uncovered
            borders are filled with 0).
        shift: ``(dx, dy)`` translation of the content, in fractions of the side (positive:
            right, down), applied after rotation and zoom.
    """

    angle: float = 0.0
    blur_sigma: float = 0.0
    rgb_shift: tuple[float, float, float] = (0.0, 0.0, 0.0)
    flip_h: bool = False
    flip_v: bool = False
    brightness: float = 1.0
    contrast: float = 1.0
    saturation: float = 1.0
    scale: float = 1.0
    shift: tuple[float, float] = (0.0, 0.0)

    @property
    def affine(self) -> bool:
        """This draw zooms or translates."""
        return self.scale != 1.0 or self.shift != (0.0, 0.0)


def warp_matrix(params: AugmentParams, size: int) -> np.ndarray:
    """Rotation, zoom and translation of a ``size x size`` image as a destination-to-source map.

    Pixel ``(x, y)`` of the output samples the input at ``M @ (x, y, 1)``, in pixel units
    with pixel centres at half-integers (DALI's ``warp_affine`` convention; ``align_corners=False``
    in PyTorch). Content is rotated counter-clockwise by ``angle`` and zoomed by ``scale``
    about the centre, then moved by ``shift * size``.

    Returns:
        A ``2 x 3`` ``float32`` array.
    """
    radians = math.radians(params.angle)
    cos, sin = math.cos(radians), math.sin(radians)
    inverse = np.array([[cos, -sin], [sin, cos]]) / params.scale  # undoes the zoom and the CCW turn (y down)
    centre = np.full(2, size / 2.0)
    offset = centre - inverse @ (centre + size * np.asarray(params.shift, dtype=np.float64))
    return np.concatenate([inverse, offset[:, None]], axis=1).astype(np.float32)


def crop_box(height: int, width: int) -> tuple[int, int, int]:
    """The centred square crop ``(top, left, side)`` in whole source pixels, used by both backends."""
    side = min(height, width)
    return (height - side) // 2, (width - side) // 2, side


LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601 weights: saturation blends towards this grey


def color_matrix(params: AugmentParams) -> tuple[np.ndarray, np.ndarray]:
    """Brightness, contrast (around grey 128) and saturation as one affine map ``M @ rgb + t``.

    ``b * (128 + c * (x - 128))`` followed by ``grey + s * (x - grey)``; one map instead of
    three passes, clamped to 0..255 once afterwards by both backends.

    Returns:
        ``(M, t)``: ``3 x 3`` and ``3`` ``float32`` arrays on the 0..255 scale.
    """
    b, c, s = params.brightness, params.contrast, params.saturation
    saturate = s * np.eye(3) + (1 - s) * np.outer(np.ones(3), LUMA)
    # Rows of `saturate` sum to 1, so the constant brightness/contrast term passes unchanged.
    return (b * c * saturate).astype(np.float32), np.full(3, b * 128 * (1 - c), dtype=np.float32)


def blur_radius(sigma: float) -> int:
    """Kernel radius used by both backends (DALI's default, ``ceil(3 * sigma)``); 0 means no blur."""
    return math.ceil(3 * sigma) if sigma > 0 else 0


def variant_params(variant: int, rng: np.random.Generator) -> AugmentParams:
    """The transform of paper variant ``variant`` (0..23), effect magnitudes drawn from ``rng``."""
    if not 0 <= variant < NUM_VARIANTS:
        raise ValueError(f"variant {variant} is outside 0..{NUM_VARIANTS - 1}")
    angle = ROTATION_STEP * (variant % NUM_ROTATIONS)
    effect = EFFECTS[variant // NUM_ROTATIONS]
    if effect == "blur":
        return AugmentParams(angle=angle, blur_sigma=float(rng.uniform(*BLUR_SIGMA)))
    if effect == "rgb_shift":
        shift = rng.uniform(-RGB_SHIFT, RGB_SHIFT, size=3)
        return AugmentParams(angle=angle, rgb_shift=(float(shift[0]), float(shift[1]), float(shift[2])))
    return AugmentParams(angle=angle)


def _key_hash(key: str) -> int:
    return zlib.crc32(key.encode())  # stable across processes, unlike hash()


def sample_params(sample: Sample, spec: TransformSpec, *, seed: int, epoch: int, train: bool) -> AugmentParams:
    """Draw one sample's transform.

    A sample pinned to a paper variant always gets that variant, with magnitudes fixed by
    ``(seed, image id, variant)`` (the expanded data set does not change between epochs).
    Other training samples get a random variant per epoch when ``spec.variants`` is set.
    ``spec.strong`` adds random flips and colour jitter in training, ``spec.affine`` a
    random zoom and translation.

    Args:
        sample: the sample.
        spec: the loader's transform.
        seed: the loader's seed.
        epoch: the epoch (training draws change with it).
        train: training (random draws) or evaluation (deterministic).

    Returns:
        The parameters.
    """
    record_hash = _key_hash(sample.record.image_id)
    rng = np.random.default_rng([seed, epoch, _key_hash(sample.key)])
    if sample.variant is not None:
        params = variant_params(sample.variant, np.random.default_rng([seed, record_hash, sample.variant]))
    elif train and spec.variants:
        params = variant_params(int(rng.integers(NUM_VARIANTS)), rng)
    else:
        params = AugmentParams()
    if train and spec.strong:
        low, high = 1 - JITTER, 1 + JITTER
        flips = rng.random(2) < FLIP_PROBABILITY
        jitter = rng.uniform(low, high, size=3)
        params = replace(
            params,
            flip_h=bool(flips[0]),
            flip_v=bool(flips[1]),
            brightness=float(jitter[0]),
            contrast=float(jitter[1]),
            saturation=float(jitter[2]),
        )
    if train and spec.affine:  # drawn last: the draws above stay those of runs without it
        low, high = np.log(spec.scale)
        shift = rng.uniform(-spec.shift, spec.shift, size=2) if spec.shift > 0 else np.zeros(2)
        params = replace(params, scale=float(np.exp(rng.uniform(low, high))),
                         shift=(float(shift[0]), float(shift[1])))
    return params
