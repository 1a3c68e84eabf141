"""Dataset readers: one function per on-disk layout, all returning ``list[LesionRecord]``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..errors import DataError
from ..records import LesionRecord
from .common import MetadataSources, require_dir
from .folder import read_folder
from .ham10000 import read_ham10000
from .isic import read_isic2017, read_isic2018
from .ph2 import IMAGES_DIR as _PH2_IMAGES
from .ph2 import read_ph2

READERS: dict[str, Callable[..., list[LesionRecord]]] = {
    "isic2017": read_isic2017,
    "isic2018": read_isic2018,
    "ph2": read_ph2,
    "ham10000": read_ham10000,
    "folder": read_folder,
}
FORMATS: tuple[str, ...] = tuple(READERS)


def detect_format(root: str | Path) -> str:
    """Guess a folder's layout from its entries.

    Returns:
        One of :data:`FORMATS`.

    Raises:
        DataError: the folder does not exist or matches no known layout.
    """
    root = require_dir(root)
    names = {p.name for p in root.iterdir()}
    if any(n.startswith("ISIC-2017_") for n in names):
        return "isic2017"
    if any(n.startswith("ISIC2018_Task1") for n in names):
        return "isic2018"
    if _PH2_IMAGES in names or "PH2Dataset" in names:
        return "ph2"
    if any(n.startswith("HAM10000_metadata") for n in names):
        return "ham10000"
    if "images" in names:
        return "folder"
    raise DataError(f"cannot tell the dataset layout; pass a format ({', '.join(FORMATS)})", root)


def read_dataset(format: str, root: str | Path, metadata: MetadataSources = None) -> list[LesionRecord]:
    """Read a dataset by layout name.

    Args:
        format: one of :data:`FORMATS`, or ``"auto"`` to use :func:`detect_format`.
        root: the dataset folder.
        metadata: extra metadata CSV files/folders joined by image id.

    Returns:
        The records.

    Raises:
        DataError: unknown format or any reader error.
    """
    if format == "auto":
        format = detect_format(root)
    if format not in READERS:
        raise DataError(f"unknown dataset format {format!r}; expected one of {', '.join(FORMATS)} or auto")
    return READERS[format](root, metadata=metadata)


__all__ = [
    "FORMATS",
    "READERS",
    "detect_format",
    "read_dataset",
    "read_folder",
    "read_ham10000",
    "read_isic2017",
    "read_isic2018",
    "read_ph2",
]
