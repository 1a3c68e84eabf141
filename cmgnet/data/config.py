"""Data configuration: one dataclass of plain values (read from YAML, flattened into MLflow)."""

from __future__ import annotations

from dataclasses import dataclass, field

from cmgnet.errors import shown
from cmgnet.inference import IMAGENET_MEAN, IMAGENET_STD
from cmgnet.text.pseudo_text import TEXT_REGIMES

from .augment.params import AUGMENTS
from .imageio import DEFAULT_MAX_PIXELS
from .protocols import PAPER_FRACTIONS, PROTOCOLS
from .readers import FORMATS
from .sources import SourceConfig
from .validate import LEVELS

LOADERS: tuple[str, ...] = ("auto", "dali", "torch")
DALI_DEVICES: tuple[str, ...] = ("auto", "cpu", "gpu")


@dataclass
class DataConfig:
    """Where the data is and how it becomes batches.

    Args:
        format: dataset layout: ``isic2017``, ``isic2018``, ``ph2``, ``ham10000``, ``folder``
            or ``auto`` (detected from the folder).
        root: dataset folder.
        metadata: extra metadata CSV files/folders joined by image id (e.g. the ISIC 2017
            label and metadata CSVs for ISIC 2018 Task 1 images), or ``None``.
        image_size: output height and width (a multiple of 16).
        protocol: ``official`` (the dataset's splits), ``split-csv`` (``split_csv``),
            ``grouped`` (random split by lesion in ``split_fractions``), ``paper`` (24 variants
            per image, random 8:1:1 split of the variants: leaks) or ``paper-grouped`` (same,
            split by source image: no leak).
        split_csv: CSV with ``image_id, split`` for ``protocol="split-csv"``.
        split_fractions: train, val and test shares of ``protocol="grouped"``.
        sources: several datasets at once (:class:`~cmgnet.data.sources.SourceConfig`: each
            its own ``name``, ``format``, ``root``, ``metadata``, ``protocol``, ``split_csv``,
            ``split_fractions`` and sampling ``weight``), replacing the five fields above; the
            other fields apply to every source. Images of every size are resized to
            ``image_size`` alike (see ``center_crop``).
        epoch_size: training samples per epoch with several sources, drawn from each in
            proportion to its ``weight`` (0: the sum of the sources' training splits).
        text_regime_train: sentence regime for training: ``none``, ``metadata``, ``shuffled``
            (another image's metadata), ``predicted`` or ``oracle``.
        text_regime_eval: sentence regime for evaluation (name it in every result).
        augment: training augmentation: ``paper`` (random one of the 24 variants),
            ``paper+strong`` (plus flips and colour jitter) or ``none``.
        scale_range: training zoom factor, drawn log-uniformly from ``[low, high]`` per sample
            and epoch (above 1 enlarges the lesion); ``[1, 1]`` (default) or ``augment: none``
            turns it off.
        shift_range: largest training translation, a fraction of the side per axis (0: none).
        center_crop: crop the centred square before resizing (the paper's reading; keeps the
            aspect ratio); applied in training and evaluation alike so both see the same
            geometry. ``False`` resizes the whole image.
        loader: ``dali``, ``torch`` or ``auto`` (DALI when importable).
        num_workers: DALI threads or PyTorch ``DataLoader`` worker processes.
        seed: seed of the paper protocols' split and of shuffling/augmentation draws.
        mean: per-channel normalisation mean (images scaled to 0..1).
        std: per-channel normalisation standard deviation.
        validate: files checked before training starts and when a loader is built: ``full``
            (default: decodes every image and mask once, so a truncated JPEG or a grey-level
            mask fails before the first step, not mid-epoch; results are cached by file size
            and mtime, so reruns are instant) or ``header`` (sizes, formats, masks present and
            matching, pixel limit only).
        max_pixels: images larger than this are refused before decoding.
        dali_device: where the DALI pipeline runs: ``gpu`` (mixed decode + GPU operators),
            ``cpu``, or ``auto`` (GPU when CUDA is available).
    """

    format: str = "isic2017"
    root: str = ""
    metadata: list[str] | None = None
    image_size: int = 256
    protocol: str = "official"
    split_csv: str | None = None
    split_fractions: tuple[float, float, float] = PAPER_FRACTIONS
    sources: list[SourceConfig] = field(default_factory=list)
    epoch_size: int = 0
    text_regime_train: str = "oracle"
    text_regime_eval: str = "none"
    augment: str = "paper"
    scale_range: tuple[float, float] = (1.0, 1.0)
    shift_range: float = 0.0
    center_crop: bool = False
    loader: str = "auto"
    num_workers: int = 2
    seed: int = 0
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    validate: str = "full"
    max_pixels: int = DEFAULT_MAX_PIXELS
    dali_device: str = "auto"

    def __post_init__(self) -> None:
        self.root = str(self.root)
        if isinstance(self.metadata, str):
            self.metadata = [self.metadata]
        elif self.metadata is not None:
            self.metadata = [str(path) for path in self.metadata]
        self.mean = tuple(float(v) for v in self.mean)  # YAML gives lists
        self.std = tuple(float(v) for v in self.std)
        self.scale_range = tuple(float(v) for v in self.scale_range)
        self.split_fractions = tuple(float(v) for v in self.split_fractions)
        self.sources = [SourceConfig(**s) if isinstance(s, dict) else s for s in self.sources]
        if self.sources and self.root:
            raise ValueError("DataConfig: give data.root (one dataset) or data.sources (several), not both")
        choices = {
            "format": (*FORMATS, "auto"),
            "protocol": PROTOCOLS,
            "text_regime_train": TEXT_REGIMES,
            "text_regime_eval": TEXT_REGIMES,
            "augment": AUGMENTS,
            "loader": LOADERS,
            "validate": LEVELS,
            "dali_device": DALI_DEVICES,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"DataConfig.{name}={shown(getattr(self, name))}; "
                                 f"expected one of {', '.join(allowed)}")
        if self.protocol == "split-csv" and not self.split_csv:
            raise ValueError("DataConfig.protocol='split-csv' needs split_csv")
        sources = self.source_configs()  # checks each source's format, protocol, split CSV and fractions
        if len({s.name for s in sources}) != len(sources):
            raise ValueError(f"DataConfig.sources: names must differ; got {[s.name for s in sources]}")
        if self.epoch_size < 0:
            raise ValueError("DataConfig.epoch_size must be >= 0")
        if self.image_size <= 0 or self.image_size % 16:
            raise ValueError(f"DataConfig.image_size={self.image_size} must be a positive multiple of 16")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError("DataConfig.mean and std need 3 values each, std positive")
        low, high = self.scale_range
        if not 0 < low <= high:
            raise ValueError(f"DataConfig.scale_range={list(self.scale_range)} needs 0 < low <= high")
        if not 0 <= self.shift_range < 0.5:
            raise ValueError(f"DataConfig.shift_range={self.shift_range} must be in [0, 0.5)")
        if self.num_workers < 0:
            raise ValueError("DataConfig.num_workers must be >= 0")

    def describe(self) -> str:
        """The datasets in words: ``isic2018 at <root> (protocol split-csv)``, joined by ``+``."""
        return " + ".join(f"{s.format} at {s.root} (protocol {s.protocol})" for s in self.source_configs())

    def source_configs(self) -> list[SourceConfig]:
        """The run's datasets: ``sources``, or the one that ``format``, ``root``, ... describe."""
        if self.sources:
            return list(self.sources)
        return [SourceConfig(format=self.format, root=self.root, metadata=self.metadata, protocol=self.protocol,
                             split_csv=self.split_csv, split_fractions=self.split_fractions)]
