"""HAM10000-style data: images + masks with ``HAM10000_metadata.csv`` (dx, age, sex, localization)."""

from __future__ import annotations

from pathlib import Path

from ..errors import DataError
from ..metadata import read_metadata_table
from ..records import LesionRecord
from .common import MetadataSources, finish, list_images, make_records, pair_masks, require_dir, wrong_layout

METADATA_NAMES = ("HAM10000_metadata.csv", "HAM10000_metadata")
IMAGE_DIRS = ("images", "HAM10000_images_part_1", "HAM10000_images_part_2", "HAM10000_images")
MASK_DIRS = ("masks", "HAM10000_segmentations_lesion_tschandl")
MASK_NAMES = ("{id}.png", "{id}_segmentation.png")


def read_ham10000(root: str | Path, metadata: MetadataSources = None) -> list[LesionRecord]:
    """Read a HAM10000-style folder.

    Layout::

        HAM10000_metadata.csv            lesion_id, image_id, dx, dx_type, age, sex, localization
        images/ISIC_XXXXXXX.jpg          (or the release's HAM10000_images_part_{1,2}/)
        masks/ISIC_XXXXXXX.png           (or HAM10000_segmentations_lesion_tschandl/*_segmentation.png)

    Metadata rows without an image are ignored (the table covers the whole release; a
    folder may hold a subset). HAM10000 has no official split (``split=None``); ``lesion_id``
    is kept so grouped splits keep images of one lesion together.

    Args:
        root: the dataset folder.
        metadata: extra metadata CSV files/folders joined by image id.

    Returns:
        Records sorted by image id.

    Raises:
        DataError: no metadata file or image folder, missing mask, bad metadata rows,
            duplicate ids.
    """
    root = require_dir(root)
    table_path = next((root / name for name in METADATA_NAMES if (root / name).is_file()), None)
    image_dirs = [root / name for name in IMAGE_DIRS if (root / name).is_dir()]
    if table_path is None or not image_dirs:
        raise wrong_layout(root, [METADATA_NAMES[0], *(f"{name}/" for name in IMAGE_DIRS)])
    images: dict[str, Path] = {}
    for folder in image_dirs:
        for image_id, path in list_images(folder).items():
            if image_id in images:
                raise DataError(f"duplicate image id {image_id!r} (also {images[image_id]})", path)
            images[image_id] = path
    images = dict(sorted(images.items()))
    mask_dir = next((root / name for name in MASK_DIRS if (root / name).is_dir()), None)
    table = read_metadata_table(table_path)
    records = make_records(images, pair_masks(images, mask_dir, MASK_NAMES), source="ham10000", table=table)
    return finish(records, metadata)
