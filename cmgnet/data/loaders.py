"""``build_loader``: one call from a :class:`DataConfig` to an iterable of batches.

Every loader yields dicts::

    {"image": float32 B x 3 x S x S (normalised), "mask": float32 B x 1 x S x S in {0, 1},
     "text": list[str], "image_id": list[str]}

has ``len()`` (batches per epoch on this rank) and ``set_epoch(epoch)``; each
``for batch in loader`` pass is one epoch (the one set, else the next). Both backends draw
the same augmentation for the same ``(seed, epoch, sample)`` and read the same order.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from functools import cache
from typing import Protocol

import torch
from torch.utils.data import DataLoader, Sampler

from .config import DataConfig
from .dataset import Batch, SegmentationDataset, prepare_split
from .sampling import EpochPlan
from .sources import Source


class SegmentationLoader(Protocol):
    """What :func:`build_loader` returns, whichever backend."""

    plan: EpochPlan

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[Batch]: ...

    def set_epoch(self, epoch: int) -> None: ...


@cache
def dali_available() -> bool:
    """True when NVIDIA DALI and its PyTorch plugin import (a broken install counts as absent)."""
    try:
        import nvidia.dali.plugin.pytorch  # noqa: F401
    except (ImportError, OSError):  # OSError: a CUDA library DALI links against is missing
        return False
    return True


class _EpochBatchSampler(Sampler[list[tuple[int, int]]]):
    """Batches of ``(index, epoch)`` keys; lives in the main process, so workers can persist."""

    def __init__(self, plan: EpochPlan, epoch: int) -> None:
        self.plan, self.epoch = plan, epoch

    def __len__(self) -> int:
        return len(self.plan)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for batch in self.plan.batches(self.epoch):
            yield [(int(i), self.epoch) for i in batch]


class TorchLoader:
    """Batches from :class:`SegmentationDataset` through a PyTorch ``DataLoader``.

    Args:
        dataset: the dataset.
        plan: order and sharding.
        epoch: the first epoch.
        num_workers: worker processes (0: load in the calling process).
        pin_memory: pin batches for faster host-to-GPU copies.
    """

    def __init__(
        self,
        dataset: SegmentationDataset,
        plan: EpochPlan,
        *,
        epoch: int = 0,
        num_workers: int = 2,
        pin_memory: bool = False,
    ) -> None:
        self.dataset, self.plan = dataset, plan
        self._sampler = _EpochBatchSampler(plan, epoch)
        self._loader = DataLoader(
            dataset,
            batch_sampler=self._sampler,
            num_workers=num_workers,
            persistent_workers=num_workers > 0,
            pin_memory=pin_memory,
            # Without its own generator, each iterator creation draws the workers' base seed from
            # torch's global RNG; with persistent workers that happens once per process, so a
            # resumed run would draw at other points and shift modality dropout (inexact resume).
            generator=torch.Generator().manual_seed(plan.seed),
        )

    @property
    def epoch(self) -> int:
        """The epoch the next pass yields."""
        return self._sampler.epoch

    def __len__(self) -> int:
        return len(self.plan)

    def set_epoch(self, epoch: int) -> None:
        """Make the next pass yield ``epoch`` (reshuffled and redrawn for training)."""
        self._sampler.epoch = epoch

    def __iter__(self) -> Iterator[Batch]:
        yield from self._loader
        self._sampler.epoch += 1


def resolve_backend(cfg: DataConfig) -> str:
    """``"dali"`` or ``"torch"`` for ``cfg.loader`` (``auto``: DALI when importable).

    Raises:
        RuntimeError: ``loader="dali"`` but DALI is not installed.
    """
    if cfg.loader == "torch" or (cfg.loader == "auto" and not dali_available()):
        return "torch"
    if not dali_available():
        raise RuntimeError("DataConfig.loader='dali' but nvidia-dali is not installed (pip install cmgnet[train])")
    return "dali"


def build_loader(
    cfg: DataConfig,
    split: str,
    batch_size: int,
    *,
    train: bool,
    rank: int = 0,
    world_size: int = 1,
    seed: int | None = None,
    drop_last: bool | None = None,
    epoch: int = 0,
    sources: Sequence[Source] | None = None,
    predicted_diagnoses: Mapping[str, str] | None = None,
) -> SegmentationLoader:
    """Build the loader of one split.

    Args:
        cfg: the data configuration (``cfg.loader`` picks DALI or PyTorch).
        split: ``"train"``, ``"val"`` or ``"test"`` under ``cfg.protocol``.
        batch_size: samples per batch (per rank).
        train: shuffle, augment (``cfg.augment``) and caption with ``cfg.text_regime_train``;
            otherwise resize only, dataset order, ``cfg.text_regime_eval``.
        rank: this process' rank.
        world_size: number of processes. Training shards are equal-sized and reshuffled per
            epoch; evaluation shards are sample-exact (disjoint, no padding, union = split).
        seed: seed of shuffling and augmentation draws (default ``cfg.seed``); the paper
            protocols' split always uses ``cfg.seed``.
        drop_last: drop a final partial batch (default: ``train``).
        epoch: the first epoch (e.g. when resuming).
        sources: the data sources when already read.
        predicted_diagnoses: image id -> diagnosis for the ``predicted`` text regime.

    Returns:
        A :class:`SegmentationLoader`.

    Raises:
        DataError: unreadable dataset, empty split or files failing validation.
        ValueError: bad arguments (e.g. fewer samples per rank than one batch with ``drop_last``).
    """
    data = prepare_split(cfg, split, train=train, sources=sources, predicted_diagnoses=predicted_diagnoses)
    seed = cfg.seed if seed is None else seed
    weights = {s.name: s.weight for s in cfg.source_configs()}
    strata = tuple((n, weights[name]) for name, n in data.counts.items()) if train and len(data.counts) > 1 else ()
    plan = EpochPlan(
        num_samples=len(data.samples),
        batch_size=batch_size,
        shuffle=train,
        drop_last=train if drop_last is None else drop_last,
        rank=rank,
        world_size=world_size,
        seed=seed,
        strata=strata,
        epoch_size=cfg.epoch_size,
    )
    if resolve_backend(cfg) == "torch":
        dataset = SegmentationDataset(data, seed=seed, max_pixels=cfg.max_pixels)
        return TorchLoader(
            dataset, plan, epoch=epoch, num_workers=cfg.num_workers, pin_memory=torch.cuda.is_available()
        )
    from .dali_loader import DaliLoader  # imports DALI only when used

    device = cfg.dali_device
    if device == "auto":
        device = "gpu" if torch.cuda.is_available() else "cpu"
    device_id = torch.cuda.current_device() if device == "gpu" else None
    return DaliLoader(
        data, plan, seed=seed, epoch=epoch, num_threads=max(1, cfg.num_workers), device=device, device_id=device_id,
        max_pixels=cfg.max_pixels,
    )
