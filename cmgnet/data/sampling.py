"""Per-epoch sample order and per-rank sharding, shared by the DALI and PyTorch loaders."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class EpochPlan:
    """Which samples each rank reads, in which batches, at a given epoch.

    Training (``shuffle=True``): every rank draws the same permutation from
    ``(seed, epoch)``, drops the ``n % world_size`` tail so ranks get equal counts (DDP
    needs equal step counts; the dropped samples change every epoch) and takes every
    ``world_size``-th sample. With ``strata`` (several sources, training only) each epoch
    draws ``epoch_size`` samples, each source's share in proportion to its weight (largest
    remainder), without repeats inside a source until all of its samples were drawn, then
    shuffles them together. Evaluation (``shuffle=False``): sample-exact contiguous shards
    in dataset order; disjoint, no padding duplicates, their union (concatenated in rank
    order) is the whole split, so ranks may differ by one sample.

    Args:
        num_samples: samples in the split.
        batch_size: samples per batch.
        shuffle: training order (see above) or evaluation order.
        drop_last: drop a final partial batch.
        rank: this process' rank.
        world_size: number of processes.
        seed: seed of the permutation.
        strata: ``(count, weight)`` per source, whose samples are consecutive in that order
            (counts sum to ``num_samples``); ``()``: one source, a plain permutation.
        epoch_size: samples drawn per epoch with ``strata`` (0: ``num_samples``).
    """

    num_samples: int
    batch_size: int
    shuffle: bool
    drop_last: bool
    rank: int = 0
    world_size: int = 1
    seed: int = 0
    strata: tuple[tuple[int, float], ...] = ()
    epoch_size: int = 0

    def __post_init__(self) -> None:
        if self.strata and sum(n for n, _ in self.strata) != self.num_samples:
            raise ValueError(f"strata counts {[n for n, _ in self.strata]} do not sum to {self.num_samples} samples")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside 0..{self.world_size - 1}")
        if self.shuffle and len(self) == 0:  # evaluation shards may be empty when ranks > samples
            raise ValueError(
                f"no batch for rank {self.rank}: {self.samples_per_rank} samples per rank"
                f"{' with drop_last and batch_size ' + str(self.batch_size) if self.drop_last else ''}"
            )

    @property
    def samples_per_rank(self) -> int:
        """Samples this rank reads per epoch."""
        if self.shuffle:
            return self.drawn // self.world_size
        return len(np.array_split(np.arange(self.num_samples), self.world_size)[self.rank])

    @property
    def drawn(self) -> int:
        """Samples one training epoch draws (all ranks)."""
        return (self.epoch_size or self.num_samples) if self.strata else self.num_samples

    def quotas(self) -> list[int]:
        """Samples each stratum gives an epoch: ``drawn`` shared by weight (largest remainder)."""
        weights = np.array([w if n else 0.0 for n, w in self.strata], dtype=float)  # an empty source gives none
        exact = self.drawn * weights / weights.sum()
        quotas = np.floor(exact).astype(int)
        quotas[np.argsort(quotas - exact, kind="stable")[: self.drawn - quotas.sum()]] += 1
        return quotas.tolist()

    def _stratified_order(self, epoch: int) -> np.ndarray:
        parts, offset = [], 0
        for index, ((count, _), quota) in enumerate(zip(self.strata, self.quotas())):
            # Successive epochs continue one long stream of permutations, so a source is seen whole
            # before any sample repeats.
            if quota:
                first, last = epoch * quota // count, (epoch + 1) * quota // count
                stream = np.concatenate([np.random.default_rng([self.seed, index, cycle]).permutation(count)
                                         for cycle in range(first, last + 1)])
                parts.append(stream[epoch * quota - first * count:][:quota] + offset)
            offset += count
        order = np.concatenate(parts)
        return order[np.random.default_rng([self.seed, epoch]).permutation(order.size)]

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        rounding = math.floor if self.drop_last else math.ceil
        return rounding(self.samples_per_rank / self.batch_size)

    def indices(self, epoch: int) -> np.ndarray:
        """This rank's sample indices for ``epoch``, in reading order."""
        if not self.shuffle:
            return np.array_split(np.arange(self.num_samples), self.world_size)[self.rank]
        if self.strata:
            order = self._stratified_order(epoch)
        else:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
        usable = order.size - order.size % self.world_size
        return order[:usable][self.rank :: self.world_size]

    def batches(self, epoch: int) -> list[np.ndarray]:
        """This rank's batches of sample indices for ``epoch``."""
        indices = self.indices(epoch)
        return [
            indices[start : start + self.batch_size] for start in range(0, len(self) * self.batch_size, self.batch_size)
        ]
