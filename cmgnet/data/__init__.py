"""Data: dataset readers, validation, split protocols, augmentation and loaders (DALI or PyTorch).

Typical use::

    from cmgnet.data import DataConfig, build_loader

    cfg = DataConfig(format="isic2017", root="data/isic2017", protocol="official")
    train = build_loader(cfg, "train", batch_size=24, train=True, rank=rank, world_size=world)
    for epoch in range(epochs):
        train.set_epoch(epoch)
        for batch in train:  # {"image", "mask", "text", "image_id"}
            ...

DALI is imported only when a DALI loader is built.
"""

from typing import TYPE_CHECKING

from cmgnet._lazy import lazy_exports

from .config import DataConfig
from .errors import DataError
from .metadata import read_metadata
from .protocols import PROTOCOLS, paper_split, resolve_split
from .readers import (
    FORMATS,
    detect_format,
    read_dataset,
    read_folder,
    read_ham10000,
    read_isic2017,
    read_isic2018,
    read_ph2,
)
from .records import LesionRecord, Sample
from .sampling import EpochPlan
from .synthetic import generate_dataset
from .validate import ValidationReport, validate_records

if TYPE_CHECKING:
    from .dataset import SegmentationDataset, SplitData, prepare_split, sentences
    from .loaders import SegmentationLoader, TorchLoader, build_loader, dali_available, resolve_backend

# The torch-backed parts load on first use, so `cmgnet data check --help` does not import torch.
__getattr__, __dir__ = lazy_exports(__name__, {
    **dict.fromkeys(("SegmentationDataset", "SplitData", "prepare_split", "sentences"), ".dataset"),
    **dict.fromkeys(("SegmentationLoader", "TorchLoader", "build_loader", "dali_available", "resolve_backend"),
                    ".loaders"),
})

__all__ = [
    "FORMATS",
    "PROTOCOLS",
    "DataConfig",
    "DataError",
    "EpochPlan",
    "LesionRecord",
    "Sample",
    "SegmentationDataset",
    "SegmentationLoader",
    "SplitData",
    "TorchLoader",
    "ValidationReport",
    "build_loader",
    "dali_available",
    "detect_format",
    "generate_dataset",
    "paper_split",
    "prepare_split",
    "read_dataset",
    "read_folder",
    "read_ham10000",
    "read_isic2017",
    "read_isic2018",
    "read_metadata",
    "read_ph2",
    "resolve_backend",
    "resolve_split",
    "sentences",
    "validate_records",
]
