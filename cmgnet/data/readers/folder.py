"""The generic folder format users convert their own data to (docs/design.md section 3)."""

from __future__ import annotations

from pathlib import Path

from ..errors import DataError
from ..metadata import read_metadata_table
from ..records import LesionRecord
from .common import MetadataSources, finish, list_images, make_records, pair_masks, require_dir, wrong_layout

MASK_NAMES = ("{id}.png", "{id}_segmentation.png")


def read_folder(root: str | Path, metadata: MetadataSources = None) -> list[LesionRecord]:
    """Read the generic folder format.

    Layout::

        images/<image_id>.{jpg,jpeg,png,bmp}
        masks/<image_id>.png  or  masks/<image_id>_segmentation.png   (0 = background, >127 = lesion;
                                                                      no masks/ folder: unlabelled)
        metadata.csv   (optional) image_id and any of diagnosis, age, sex, site, description,
                       split (train/val/test), lesion_id

    Unlike the challenge tables, ``metadata.csv`` describes exactly this folder: a row naming
    an image that is not there is an error (usually a typo), never silently dropped.

    Args:
        root: the dataset folder.
        metadata: extra metadata CSV files/folders joined by image id.

    Returns:
        Records sorted by image id; ``split`` from the ``split`` column or ``None``.

    Raises:
        DataError: no ``images/`` folder or no image in it, missing mask, a metadata row
            without an image, bad metadata values, duplicate ids.
    """
    root = require_dir(root)
    if not (root / "images").is_dir():
        raise wrong_layout(root, ["images/"])
    images = list_images(root / "images")
    table = None
    if (table_path := root / "metadata.csv").is_file():
        table = read_metadata_table(table_path)
        for image_id, (_, path, line) in table.items():
            if image_id not in images:
                raise DataError(f"image id {image_id!r} has no file in {root / 'images'}", path, line)
    records = make_records(images, pair_masks(images, root / "masks", MASK_NAMES), source="folder", table=table)
    return finish(records, metadata)
