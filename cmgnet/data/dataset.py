"""The map-style dataset of the PyTorch path, and how a split becomes samples + sentences."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch.utils.data import Dataset

from cmgnet.inference import record_from_data
from cmgnet.text.pseudo_text import make_sentence, shuffled_sentences

from .augment.params import TransformSpec, sample_params
from .augment.torch_ops import apply_transform
from .config import DataConfig
from .imageio import DEFAULT_MAX_PIXELS, decode_image, decode_mask, read_encoded
from .records import Sample
from .sources import Source, read_sources, split_samples
from .validate import validate_records

Item = dict[str, torch.Tensor | str]
"""One sample: ``image`` (3 x S x S), ``mask`` (1 x S x S), ``text``, ``image_id``."""
Batch = dict[str, torch.Tensor | list[str]]
"""A batch: ``image`` (B x 3 x S x S), ``mask`` (B x 1 x S x S), ``text`` and ``image_id`` lists."""


@dataclass(frozen=True)
class SplitData:
    """A split ready for a loader: samples, their sentences and the transform.

    Attributes:
        samples: the split's samples, in dataset order; every one has a validated mask.
        texts: one sentence per sample (the split's text regime applied).
        spec: the transform.
        train: training (augmented, shuffled) or evaluation (deterministic).
        sizes: image id -> ``(width, height)`` from the file headers, as displayed.
        converted: image id -> why its files are not plain 8-bit upright ones (see
            :class:`~cmgnet.data.validate.ValidationReport`); DALI leaves their decoding to PIL.
        counts: samples per data source, in the order of ``samples``.
    """

    samples: list[Sample]
    texts: list[str]
    spec: TransformSpec
    train: bool
    sizes: dict[str, tuple[int, int]]
    converted: dict[str, str] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)


def sentences(
    samples: Sequence[Sample], regime: str, predicted_diagnoses: Mapping[str, str] | None = None, seed: int = 0
) -> list[str]:
    """The sentence of every sample under a text regime.

    Args:
        samples: the samples (a whole split: ``shuffled`` draws its donors among them).
        regime: ``none``, ``metadata``, ``shuffled``, ``predicted`` or ``oracle``.
        predicted_diagnoses: image id -> predicted diagnosis, required by ``predicted``.
        seed: seed of the ``shuffled`` derangement.

    Raises:
        ValueError: ``predicted`` without a prediction for some image.
    """
    if regime == "shuffled":
        return shuffled_sentences([s.record for s in samples], [s.record.image_id for s in samples], seed)
    if regime != "predicted":
        return [make_sentence(s.record, regime) for s in samples]
    predictions = predicted_diagnoses or {}
    if missing := [s.record.image_id for s in samples if s.record.image_id not in predictions]:
        raise ValueError(
            f"text regime 'predicted' has no predicted diagnosis for {len(missing)} images, e.g. {missing[:3]}"
        )
    return [make_sentence(s.record, regime, predictions[s.record.image_id]) for s in samples]


def prepare_split(
    cfg: DataConfig,
    split: str,
    *,
    train: bool,
    sources: Sequence[Source] | None = None,
    predicted_diagnoses: Mapping[str, str] | None = None,
) -> SplitData:
    """Read, split, validate and caption one split of the configured datasets.

    Args:
        cfg: the data configuration.
        split: ``"train"``, ``"val"`` or ``"test"``.
        train: augment with ``cfg.augment`` and use ``cfg.text_regime_train``; otherwise
            deterministic with ``cfg.text_regime_eval``.
        sources: the data sources when already read (saves re-reading per split).
        predicted_diagnoses: image id -> diagnosis for the ``predicted`` text regime.

    Returns:
        The split's samples, sentences and transform.

    Raises:
        DataError: unreadable dataset, empty split, or files failing ``cfg.validate`` checks.
    """
    if sources is None:
        sources = read_sources(cfg)
    chosen = split_samples(sources, split, cfg.seed)
    samples = chosen.samples
    unique = list({id(s.record): s.record for s in samples}.values())
    report = validate_records(unique, level=cfg.validate, max_pixels=cfg.max_pixels, workers=max(1, cfg.num_workers))
    report.raise_if_failed()
    pinned = any(s.variant is not None for s in samples)
    augmented = train and cfg.augment != "none"
    spec = TransformSpec(
        record_from_data(cfg),
        variants=pinned or augmented,
        strong=train and cfg.augment == "paper+strong",
        scale=cfg.scale_range if augmented else (1.0, 1.0),
        shift=cfg.shift_range if augmented else 0.0,
    )
    regime = cfg.text_regime_train if train else cfg.text_regime_eval
    return SplitData(samples, sentences(samples, regime, predicted_diagnoses, cfg.seed), spec, train, report.sizes,
                     report.converted, chosen.counts)


class SegmentationDataset(Dataset):
    """Map-style dataset: decoded, transformed ``(image, mask, text, image_id)`` samples.

    Index it with a sample index (epoch 0) or an ``(index, epoch)`` pair: augmentation
    draws depend on ``(seed, epoch, sample)`` only, so any worker gives the same result.

    Args:
        data: the split (from :func:`prepare_split`).
        seed: seed of the augmentation draws.
        max_pixels: images above this many pixels are refused before decoding.
    """

    def __init__(self, data: SplitData, *, seed: int = 0, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        self.data = data
        self.seed = seed
        self.max_pixels = max_pixels

    @classmethod
    def from_config(cls, cfg: DataConfig, split: str, *, train: bool, seed: int | None = None) -> SegmentationDataset:
        """The dataset of one split (see :func:`prepare_split`); ``seed`` defaults to ``cfg.seed``."""
        data = prepare_split(cfg, split, train=train)
        return cls(data, seed=cfg.seed if seed is None else seed, max_pixels=cfg.max_pixels)

    def __len__(self) -> int:
        return len(self.data.samples)

    def __getitem__(self, key: int | tuple[int, int]) -> Item:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        sample = self.data.samples[index]
        record = sample.record
        assert record.mask_path is not None  # prepare_split validated masks and sizes
        image = decode_image(read_encoded(record.image_path), record.image_path, self.max_pixels)
        mask = decode_mask(read_encoded(record.mask_path), record.mask_path, self.max_pixels)
        params = sample_params(sample, self.data.spec, seed=self.seed, epoch=epoch, train=self.data.train)
        image_tensor, mask_tensor = apply_transform(image, mask, self.data.spec, params)
        return {"image": image_tensor, "mask": mask_tensor, "text": self.data.texts[index], "image_id": sample.key}
