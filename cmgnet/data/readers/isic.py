"""ISIC challenge layouts: ISIC 2017 (Part 1 masks + Part 3 labels) and ISIC 2018 Task 1."""

from __future__ import annotations

from pathlib import Path

from ..metadata import merge_tables, read_metadata_table
from ..records import LesionRecord
from .common import MetadataSources, finish, list_images, make_records, pair_masks, require_dir, wrong_layout

ISIC_ID = r"ISIC_\d+"  # skips ISIC 2017's ISIC_XXXXXXX_superpixels.png beside the images
MASK_NAMES = ("{id}_segmentation.png",)

ISIC2017_SPLITS = {"train": "Training", "val": "Validation", "test": "Test_v2"}
ISIC2018_SPLITS = {"train": "Training", "val": "Validation", "test": "Test"}


def _read_split(data_dir: Path, mask_dir: Path, tables: list[Path], *, source: str, split: str) -> list[LesionRecord]:
    images = list_images(data_dir, ISIC_ID)
    table = merge_tables(read_metadata_table(path) for path in tables if path.is_file())
    return make_records(images, pair_masks(images, mask_dir, MASK_NAMES), source=source, split=split, table=table)


def read_isic2017(root: str | Path, metadata: MetadataSources = None) -> list[LesionRecord]:
    """Read ISIC 2017 as the challenge ships it.

    Layout (any subset of the three splits)::

        ISIC-2017_{Training,Validation,Test_v2}_Data/ISIC_XXXXXXX.jpg
        ISIC-2017_{...}_Data/ISIC-2017_{...}_Data_metadata.csv      (age_approximate, sex; or beside the folders)
        ISIC-2017_{...}_Part1_GroundTruth/ISIC_XXXXXXX_segmentation.png
        ISIC-2017_{...}_Part3_GroundTruth.csv                       (melanoma, seborrheic_keratosis)

    Args:
        root: the folder holding the challenge folders.
        metadata: extra metadata CSV files/folders joined by image id (see :mod:`cmgnet.data.metadata`).

    Returns:
        Records with ``split`` train/val/test, sorted by split then id. A split without its
        ``Part1_GroundTruth`` folder is read unlabelled (``mask_path=None``).

    Raises:
        DataError: wrong layout, missing mask, bad label/metadata rows, duplicate ids.
    """
    root = require_dir(root)
    records: list[LesionRecord] = []
    for split, name in ISIC2017_SPLITS.items():
        data_dir = root / f"ISIC-2017_{name}_Data"
        if not data_dir.is_dir():
            continue
        tables = [
            root / f"ISIC-2017_{name}_Part3_GroundTruth.csv",
            data_dir / f"ISIC-2017_{name}_Data_metadata.csv",
            root / f"ISIC-2017_{name}_Data_metadata.csv",
        ]
        mask_dir = root / f"ISIC-2017_{name}_Part1_GroundTruth"
        records += _read_split(data_dir, mask_dir, tables, source="isic2017", split=split)
    if not records:
        raise wrong_layout(root, [f"ISIC-2017_{name}_Data/" for name in ISIC2017_SPLITS.values()])
    return finish(records, metadata)


def read_isic2018(root: str | Path, metadata: MetadataSources = None) -> list[LesionRecord]:
    """Read ISIC 2018 Task 1 as the challenge ships it.

    Layout (any subset of the three splits)::

        ISIC2018_Task1-2_{Training,Validation,Test}_Input/ISIC_XXXXXXX.jpg
        ISIC2018_Task1_{Training,Validation,Test}_GroundTruth/ISIC_XXXXXXX_segmentation.png

    Task 1 ships no diagnosis; pass tables that have one. For example the ISIC 2017 label
    and metadata CSVs (most ISIC 2018 Task 1 images are ISIC 2017 images), HAM10000's
    ``HAM10000_metadata.csv`` or the ISIC 2018 Task 3 ground truth::

        read_isic2018("isic2018", metadata=["isic2017-metadata/"])

    Args:
        root: the folder holding the challenge folders.
        metadata: metadata CSV files/folders joined by image id; ids absent from them get
            no diagnosis/age/sex (the neutral sentence).

    Returns:
        Records with ``split`` train/val/test, sorted by split then id.

    Raises:
        DataError: wrong layout, missing mask, bad metadata rows, duplicate ids.
    """
    root = require_dir(root)
    records: list[LesionRecord] = []
    for split, name in ISIC2018_SPLITS.items():
        data_dir = root / f"ISIC2018_Task1-2_{name}_Input"
        if data_dir.is_dir():
            mask_dir = root / f"ISIC2018_Task1_{name}_GroundTruth"
            records += _read_split(data_dir, mask_dir, [], source="isic2018", split=split)
    if not records:
        raise wrong_layout(root, [f"ISIC2018_Task1-2_{name}_Input/" for name in ISIC2018_SPLITS.values()])
    return finish(records, metadata)
