"""Several datasets in one run: each source keeps its own reader, split and sampling weight.

A single-source config (``data.format``, ``data.root``, ...) is one :class:`SourceConfig`;
``data.sources`` lists several. A split is the concatenation of every source's split (in
source order), so evaluation reads each source's own split and training draws from each
source by weight (:class:`~cmgnet.data.sampling.EpochPlan`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cmgnet.errors import shown

from .errors import DataError
from .protocols import PAPER_FRACTIONS, PROTOCOLS, resolve_split
from .readers import FORMATS, read_dataset
from .records import LesionRecord, Sample

if TYPE_CHECKING:
    from .config import DataConfig


@dataclass
class SourceConfig:
    """One dataset of a run.

    Args:
        name: the label of its metrics (``val/<name>/dice``) and of ``eval.select``; default
            its format, or the folder name when the format is ``auto``.
        format: dataset layout (see :class:`~cmgnet.data.config.DataConfig`).
        root: dataset folder.
        metadata: extra metadata CSV files/folders joined by image id.
        protocol: ``official``, ``split-csv``, ``grouped`` (random split by lesion in
            ``split_fractions``), ``paper`` or ``paper-grouped``.
        split_csv: CSV with ``image_id, split`` for ``protocol="split-csv"``.
        split_fractions: train, val and test shares of ``protocol="grouped"``.
        weight: the source's share of each training epoch, relative to the other sources'
            (``data.epoch_size`` samples in all); ignored with one source.
    """

    name: str = ""
    format: str = "auto"
    root: str = ""
    metadata: list[str] | None = None
    protocol: str = "official"
    split_csv: str | None = None
    split_fractions: tuple[float, float, float] = PAPER_FRACTIONS
    weight: float = 1.0

    def __post_init__(self) -> None:
        self.root = str(self.root)
        if isinstance(self.metadata, (str, Path)):
            self.metadata = [str(self.metadata)]
        elif self.metadata is not None:
            self.metadata = [str(path) for path in self.metadata]
        self.split_fractions = tuple(float(v) for v in self.split_fractions)
        if not self.name:
            self.name = self.format if self.format != "auto" else (Path(self.root).name or "data")
        where = f"data source {shown(self.name)}"
        if self.format not in (*FORMATS, "auto"):
            raise ValueError(f"{where}: format={shown(self.format)}; expected one of {', '.join(FORMATS)}, auto")
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"{where}: protocol={shown(self.protocol)}; expected one of {', '.join(PROTOCOLS)}")
        if self.protocol == "split-csv" and not self.split_csv:
            raise ValueError(f"{where}: protocol 'split-csv' needs split_csv")
        if len(self.split_fractions) != 3 or min(self.split_fractions) < 0 or \
                abs(sum(self.split_fractions) - 1) > 1e-6:
            raise ValueError(f"{where}: split_fractions={list(self.split_fractions)} needs 3 shares >= 0 summing to 1")
        if not self.weight > 0:
            raise ValueError(f"{where}: weight={self.weight} must be positive")


@dataclass(frozen=True)
class Source:
    """A source's settings and its records (read once, reused by every split)."""

    cfg: SourceConfig
    records: list[LesionRecord]

    @property
    def name(self) -> str:
        return self.cfg.name

    def split(self, split: str, seed: int, *, allow_empty: bool = False) -> list[Sample]:
        """This source's samples of ``split`` under its own protocol."""
        cfg = self.cfg
        return resolve_split(self.records, split, cfg.protocol, seed=seed, split_csv=cfg.split_csv,
                             fractions=cfg.split_fractions, allow_empty=allow_empty)


def read_sources(cfg: DataConfig) -> list[Source]:
    """Read every source of ``cfg`` (each with its own reader).

    Raises:
        DataError: an unreadable source, an empty root, or an image id two sources share
            (metrics and sentences are keyed by image id).
    """
    sources = []
    owner: dict[str, str] = {}
    configs = cfg.source_configs()
    for source_cfg in configs:
        if not source_cfg.root:
            which = f" of source {source_cfg.name!r}" if len(configs) > 1 else ""
            raise DataError(f"DataConfig.root is empty: set the dataset folder{which}")
        records = read_dataset(source_cfg.format, source_cfg.root, metadata=source_cfg.metadata)
        for record in records:
            if owner.setdefault(record.image_id, source_cfg.name) != source_cfg.name:
                raise DataError(f"image id {record.image_id!r} is in data sources {owner[record.image_id]!r} "
                                f"and {source_cfg.name!r}", record.image_path)
        sources.append(Source(source_cfg, records))
    return sources


@dataclass(frozen=True)
class SplitSamples:
    """One split over every source: the samples, in source order, and each source's count."""

    samples: list[Sample]
    counts: dict[str, int]

    def source_of(self) -> dict[str, str]:
        """Sample key -> source name."""
        names = [name for name, n in self.counts.items() for _ in range(n)]
        return {s.key: name for s, name in zip(self.samples, names, strict=True)}


def split_samples(sources: Sequence[Source], split: str, seed: int) -> SplitSamples:
    """The samples of ``split`` over every source; a source that lacks the split adds none.

    Raises:
        DataError: the split is empty in every source (one source: its own message).
    """
    if len(sources) == 1:
        samples = sources[0].split(split, seed)
        return SplitSamples(samples, {sources[0].name: len(samples)})
    parts = {}
    for source in sources:
        try:
            parts[source.name] = source.split(split, seed, allow_empty=True)
        except DataError as err:
            if err.path is not None:  # names its file (a split CSV row) already
                raise
            raise DataError(f"data source {source.name!r} ({source.cfg.root}): {err}") from None
    if not any(parts.values()):
        raise DataError(f"split {split!r} is empty in every data source ({', '.join(parts)})")
    return SplitSamples([s for part in parts.values() for s in part], {k: len(v) for k, v in parts.items()})
