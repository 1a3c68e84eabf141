"""Loaders for the engine: the training split per epoch and any (split, text regime) to evaluate.

:class:`DataModule` reads the dataset once and builds per-rank loaders with
:func:`cmgnet.data.loaders.build_loader`. The engine only relies on the small
:class:`LoaderSource` protocol, so tests and custom pipelines can plug in their own.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any, Protocol

from cmgnet.data.config import DataConfig


class LoaderSource(Protocol):
    """What the engine needs from a data pipeline."""

    def train_loader(self, batch_size: int, epoch: int) -> Iterable[dict[str, Any]]:
        """This rank's training batches; has ``len()`` and ``set_epoch(epoch)``."""

    def eval_loader(self, split: str, batch_size: int, text_regime: str,
                    predicted_diagnoses: Mapping[str, str] | None = None) -> Iterable[dict[str, Any]]:
        """This rank's sample-exact shard of ``split`` captioned with ``text_regime``."""

    def diagnoses(self, split: str) -> dict[str, str | None]:
        """Sample id -> ground-truth diagnosis (``None`` when unknown) of a split."""


class DataModule:
    """:class:`LoaderSource` over a :class:`~cmgnet.data.config.DataConfig`.

    Args:
        cfg: the data section of the experiment.
        rank: this process' rank.
        world_size: number of processes.
        seed: seed of shuffling and augmentation (the experiment seed).
    """

    def __init__(self, cfg: DataConfig, rank: int = 0, world_size: int = 1, seed: int | None = None) -> None:
        from cmgnet.data.sources import read_sources

        self.cfg = cfg
        self.rank = rank
        self.world_size = world_size
        self.seed = cfg.seed if seed is None else seed
        self.sources = read_sources(cfg)  # read once, reused by every split
        self._train = None
        self._eval: dict[tuple[str, str, int], Any] = {}
        self._splits: dict[str, Any] = {}

    def train_loader(self, batch_size: int, epoch: int) -> Iterable[dict[str, Any]]:
        from cmgnet.data.loaders import build_loader

        if self._train is None:  # one loader for the whole run: persistent workers, set_epoch per epoch
            self._train = build_loader(self.cfg, "train", batch_size, train=True, rank=self.rank,
                                       world_size=self.world_size, seed=self.seed, epoch=epoch, sources=self.sources)
        self._train.set_epoch(epoch)
        return self._train

    def eval_loader(self, split: str, batch_size: int, text_regime: str,
                    predicted_diagnoses: Mapping[str, str] | None = None) -> Iterable[dict[str, Any]]:
        from cmgnet.data.loaders import build_loader

        key = (split, text_regime, batch_size)
        if predicted_diagnoses is not None or key not in self._eval:
            cfg = dataclasses.replace(self.cfg, text_regime_eval=text_regime)
            loader = build_loader(cfg, split, batch_size, train=False, rank=self.rank, world_size=self.world_size,
                                  seed=self.seed, sources=self.sources, predicted_diagnoses=predicted_diagnoses)
            if predicted_diagnoses is not None:
                return loader  # predictions change with the classifier: do not cache
            self._eval[key] = loader
        return self._eval[key]

    def validate(self, splits: Iterable[str]) -> None:
        """Check every file of the given splits at ``cfg.validate`` level, before any training step.

        A split the dataset does not have is left out (evaluation skips it too).

        Raises:
            DataError: the files that fail, each named, and any mask without an image (see
                ``cmgnet data check`` for all of them).
        """
        from cmgnet.data.errors import DataError
        from cmgnet.data.validate import orphan_masks, validate_records

        cfg = self.cfg
        records: dict[int, Any] = {}
        for split in dict.fromkeys(splits):
            for source in self.sources:  # every source, before the first step
                try:
                    samples = source.split(split, cfg.seed)
                except DataError:
                    continue
                records.update({id(s.record): s.record for s in samples})
        report = validate_records(list(records.values()), level=cfg.validate, max_pixels=cfg.max_pixels,
                                  workers=max(1, cfg.num_workers))
        for source in self.sources:  # as `cmgnet data check` reports them
            report.errors += orphan_masks(source.records)
        report.raise_if_failed()

    def _split(self, split: str) -> Any:
        """The split's samples over every source (resolved once: validation asks at every epoch)."""
        from cmgnet.data.sources import split_samples

        if split not in self._splits:
            self._splits[split] = split_samples(self.sources, split, self.cfg.seed)
        return self._splits[split]

    def diagnoses(self, split: str) -> dict[str, str | None]:
        return {s.key: s.record.diagnosis for s in self._split(split).samples}

    def source_of(self, split: str) -> dict[str, str]:
        """Sample id -> the name of its data source, for per-source metrics."""
        return self._split(split).source_of()
