"""Procedural dermoscopy-like images written in the ISIC 2017 layout (demo and tests).

Each case is skin-toned background with smooth blotches, a few hairs and dermoscope
vignetting, plus one pigmented lesion whose shape and colour follow its diagnosis, so a
text branch that knows the diagnosis has something to learn from:

- nevus: round, symmetric, smooth border, uniform brown with a regular pigment network;
- melanoma: larger, asymmetric, irregular border, several colours (dark brown, black,
  blue-grey);
- seborrheic keratosis: sharply bordered, light tan to brown, waxy, bright milia-like dots.

Deterministic per ``seed``: case ``i`` depends only on ``(seed, i)``.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .readers.isic import ISIC2017_SPLITS


@dataclass(frozen=True)
class LesionStyle:
    """Shape and colour statistics of one diagnosis (colours are RGB 0..255)."""

    radius: tuple[float, float]  # mean radius, fraction of the half-width
    irregularity: float  # amplitude of the border's Fourier harmonics
    elongation: tuple[float, float]  # aspect-ratio range (asymmetry)
    colors: tuple[tuple[int, int, int], ...]  # mixed by smooth noise; one colour = uniform
    softness: float  # border blur, fraction of the half-width
    network: float  # pigment-network contrast
    dots: int  # bright milia-like dots


STYLES: dict[str, LesionStyle] = {
    "nevus": LesionStyle((0.30, 0.45), 0.03, (1.0, 1.15), ((120, 75, 50),), 0.03, 0.12, 0),
    "melanoma": LesionStyle(
        (0.40, 0.60), 0.16, (1.1, 1.5), ((90, 55, 40), (35, 25, 25), (95, 100, 125), (140, 90, 65)), 0.05, 0.2, 0
    ),
    "seborrheic_keratosis": LesionStyle((0.30, 0.50), 0.07, (1.0, 1.3), ((165, 120, 80), (115, 80, 55)), 0.01, 0.0, 12),
}
DIAGNOSIS_MIX = {"nevus": 0.65, "melanoma": 0.2, "seborrheic_keratosis": 0.15}  # close to ISIC 2017 training
SKIN_TONES = ((232, 190, 170), (218, 170, 145), (200, 150, 120), (236, 205, 190), (180, 130, 100))


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Zero-mean, roughly unit-variance noise with features about ``size / cells`` pixels wide."""
    coarse = Image.fromarray(rng.standard_normal((cells, cells)).astype(np.float32), mode="F")
    return np.asarray(coarse.resize((size, size), Image.BICUBIC))


def render_case(rng: np.random.Generator, size: int, diagnosis: str) -> tuple[np.ndarray, np.ndarray]:
    """Draw one dermoscopy-like image and its lesion mask.

    Args:
        rng: the random source (the case is a function of its state).
        size: image height and width in pixels.
        diagnosis: a key of :data:`STYLES`.

    Returns:
        ``(image, mask)``: ``size x size x 3`` ``uint8`` RGB and ``size x size`` ``uint8`` in {0, 255}.
    """
    style = STYLES[diagnosis]
    axis = (np.arange(size) + 0.5) / size * 2 - 1
    y, x = np.meshgrid(axis, axis, indexing="ij")
    skin = np.array(SKIN_TONES[rng.integers(len(SKIN_TONES))], dtype=np.float32) + rng.normal(0, 6, 3)
    image = skin + 10 * _smooth_noise(rng, size, 6)[..., None] + rng.normal(0, 3, (size, size, 1))

    # Lesion: an ellipse with a Fourier-perturbed border, centred near the middle.
    cy, cx = rng.normal(0, 0.08, 2)
    tilt = rng.uniform(0, np.pi)
    u = (x - cx) * np.cos(tilt) + (y - cy) * np.sin(tilt)
    v = -(x - cx) * np.sin(tilt) + (y - cy) * np.cos(tilt)
    v = v * rng.uniform(*style.elongation)
    r, theta = np.hypot(u, v), np.arctan2(v, u)
    border = np.ones_like(theta)
    for k in range(2, 8):
        border += (
            style.irregularity * rng.uniform(0.3, 1.0) / np.sqrt(k - 1) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
        )
    radius = rng.uniform(*style.radius) * border
    mask = r < radius
    alpha = 1 / (1 + np.exp(-(radius - r) / style.softness))

    # Colour: mix the style's colours with smooth noise (one colour = uniform), then structures.
    weights = np.stack([np.exp(2 * _smooth_noise(rng, size, 5)) for _ in style.colors], -1)
    lesion = (weights / weights.sum(-1, keepdims=True)) @ np.array(style.colors, dtype=np.float32)
    lesion *= 1 - 0.15 * np.clip(1 - r / np.maximum(radius, 1e-3), 0, 1)[..., None]  # darker centre
    if style.network:
        period = rng.uniform(0.06, 0.1)
        jitter = 0.5 * _smooth_noise(rng, size, 8) * (style.irregularity > 0.1)
        mesh = np.sin((x + jitter * period) * np.pi / period) * np.sin((y + jitter * period) * np.pi / period)
        lesion *= 1 - style.network * (mesh[..., None] > 0.4)
    image = image * (1 - alpha[..., None]) + lesion * alpha[..., None]
    for _ in range(style.dots):
        dy, dx = rng.normal(cy, 0.15), rng.normal(cx, 0.15)
        dot = np.exp(-((y - dy) ** 2 + (x - dx) ** 2) / (2 * rng.uniform(0.01, 0.02) ** 2))
        image += (80 * dot * mask)[..., None]

    # Dermoscope vignetting: darker towards a circular field stop.
    image *= np.clip(1.15 - rng.uniform(0.2, 0.45) * (x**2 + y**2) ** 2, 0, 1)[..., None]
    picture = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))

    # Hairs: dark, slightly curved strokes over everything (not part of the mask).
    draw = ImageDraw.Draw(picture)
    for _ in range(rng.poisson(3)):
        start, bend, end = rng.uniform(0, size, (3, 2))
        t = np.linspace(0, 1, 12)[:, None]
        curve = (1 - t) ** 2 * start + 2 * (1 - t) * t * bend + t**2 * end
        shade = rng.uniform(0.4, 1.3)  # dark brown to black
        colour = (int(45 * shade), int(32 * shade), int(25 * shade))
        draw.line([tuple(p) for p in curve], fill=colour, width=int(rng.integers(1, 3)))
    picture = picture.filter(ImageFilter.GaussianBlur(0.5))
    return np.array(picture), mask.astype(np.uint8) * 255


def _metadata(rng: np.random.Generator, diagnosis: str) -> tuple[str, str]:
    """ISIC-2017-style ``age_approximate`` and ``sex`` cells ("unknown" about 10% of the time)."""
    centre = 60 if diagnosis != "nevus" else 40
    age = "unknown" if rng.random() < 0.1 else str(int(np.clip(rng.normal(centre, 15) // 5 * 5, 5, 85)))
    sex = "unknown" if rng.random() < 0.1 else str(rng.choice(["male", "female"]))
    return age, sex


def generate_dataset(root: str | Path, n_train: int, n_val: int, n_test: int, size: int = 128, seed: int = 0) -> Path:
    """Write a synthetic dataset in the ISIC 2017 challenge layout.

    Writes ``ISIC-2017_{Training,Validation,Test_v2}_Data/ISIC_XXXXXXX.jpg`` with a
    ``*_Data_metadata.csv`` (age_approximate, sex), ``*_Part1_GroundTruth/*_segmentation.png``
    masks and ``*_Part3_GroundTruth.csv`` labels; a split with zero images is not written.

    Args:
        root: output folder (created).
        n_train: training images.
        n_val: validation images.
        n_test: test images.
        size: image height and width.
        seed: seed; the same arguments give the same files.

    Returns:
        ``root`` as a :class:`Path`, readable by :func:`cmgnet.data.read_isic2017`.
    """
    root = Path(root)
    diagnoses, probabilities = list(DIAGNOSIS_MIX), list(DIAGNOSIS_MIX.values())
    index = 0
    for name, count in zip(ISIC2017_SPLITS.values(), (n_train, n_val, n_test), strict=True):
        if count == 0:
            continue
        data_dir, mask_dir = root / f"ISIC-2017_{name}_Data", root / f"ISIC-2017_{name}_Part1_GroundTruth"
        data_dir.mkdir(parents=True, exist_ok=True)
        mask_dir.mkdir(parents=True, exist_ok=True)
        labels, metadata = [], []
        for _ in range(count):
            rng = np.random.default_rng([seed, index])
            image_id, index = f"ISIC_{index:07d}", index + 1
            diagnosis = str(rng.choice(diagnoses, p=probabilities))
            image, mask = render_case(rng, size, diagnosis)
            Image.fromarray(image).save(data_dir / f"{image_id}.jpg", quality=92)
            Image.fromarray(mask).save(mask_dir / f"{image_id}_segmentation.png")
            labels.append(
                (image_id, f"{float(diagnosis == 'melanoma')}", f"{float(diagnosis == 'seborrheic_keratosis')}")
            )
            metadata.append((image_id, *_metadata(rng, diagnosis)))
        _write_csv(
            root / f"ISIC-2017_{name}_Part3_GroundTruth.csv", ("image_id", "melanoma", "seborrheic_keratosis"), labels
        )
        _write_csv(data_dir / f"ISIC-2017_{name}_Data_metadata.csv", ("image_id", "age_approximate", "sex"), metadata)
    return root


def _write_csv(path: Path, header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
