"""Helpers shared by the dataset readers: folder listing, mask pairing, record assembly."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from ..errors import DataError
from ..imageio import IMAGE_EXTENSIONS
from ..metadata import MetadataEntry, MetadataTable, apply_metadata, read_metadata
from ..records import LesionRecord

MetadataSources = Sequence[str | Path] | str | Path | None


def require_dir(root: str | Path) -> Path:
    """``root`` as a :class:`Path`, checked to be an existing folder.

    Raises:
        DataError: it does not exist or is not a folder.
    """
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DataError("dataset folder not found" if not path.exists() else "not a folder", path)
    return path


def list_images(folder: Path, pattern: str | None = None) -> dict[str, Path]:
    """Images in a folder keyed by file stem (the image id), sorted by id.

    Args:
        folder: the folder (not searched recursively).
        pattern: a regular expression the whole stem must match (e.g. ``ISIC_\\d+`` to skip
            ISIC 2017's ``*_superpixels.png``); ``None`` takes every image file.

    Returns:
        ``{image_id: path}``.

    Raises:
        DataError: two files share a stem (``a.jpg`` and ``a.png``), or no image is found.
    """
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in IMAGE_EXTENSIONS or not path.is_file():
            continue
        if pattern is not None and not re.fullmatch(pattern, path.stem):
            continue
        if path.stem in found:
            raise DataError(f"duplicate image id {path.stem!r} (also {found[path.stem].name})", path)
        found[path.stem] = path
    if not found:
        wanted = f"files named {pattern} with" if pattern else "files with"
        raise DataError(f"no images ({wanted} extension {', '.join(IMAGE_EXTENSIONS)}) in this folder", folder)
    return dict(sorted(found.items()))


def pair_masks(images: dict[str, Path], mask_dir: Path | None, names: Sequence[str]) -> dict[str, Path | None]:
    """Find each image's mask.

    Args:
        images: ``{image_id: image_path}``.
        mask_dir: the mask folder; ``None`` or absent means an unlabelled set (all ``None``).
        names: mask file name templates with ``{id}``, tried in order
            (e.g. ``("{id}.png", "{id}_segmentation.png")``).

    Returns:
        ``{image_id: mask_path or None}``.

    Raises:
        DataError: the mask folder exists but lacks an image's mask, or holds two candidates
            for one image.
    """
    if mask_dir is None or not mask_dir.is_dir():
        return {image_id: None for image_id in images}
    masks: dict[str, Path | None] = {}
    for image_id in images:
        candidates = [mask_dir / name.format(id=image_id) for name in names]
        present = [path for path in candidates if path.is_file()]
        if not present:
            raise DataError(
                f"missing mask for image {image_id!r} (looked for {', '.join(p.name for p in candidates)})", mask_dir
            )
        if len(present) > 1:
            raise DataError(f"two masks for image {image_id!r}: {', '.join(p.name for p in present)}", mask_dir)
        masks[image_id] = present[0]
    return masks


def make_records(
    images: dict[str, Path],
    masks: dict[str, Path | None],
    *,
    source: str,
    split: str | None = None,
    table: MetadataTable | None = None,
) -> list[LesionRecord]:
    """Build records for one folder of images, filling metadata from ``table`` where the id is present."""
    records = []
    for image_id, image_path in images.items():
        entry = table[image_id][0] if table and image_id in table else MetadataEntry()
        records.append(
            LesionRecord(
                image_id=image_id,
                image_path=image_path,
                mask_path=masks[image_id],
                diagnosis=entry.diagnosis,
                age=entry.age,
                sex=entry.sex,
                site=entry.site,
                description=entry.description,
                split=entry.split if entry.split is not None else split,
                source=source,
                lesion_id=entry.lesion_id,
            )
        )
    return records


def finish(records: list[LesionRecord], metadata: MetadataSources) -> list[LesionRecord]:
    """Apply the caller's extra metadata tables and check ids are unique across splits.

    Raises:
        DataError: a duplicate id, or any metadata error.
    """
    seen: dict[str, Path] = {}
    for record in records:
        if record.image_id in seen:
            raise DataError(f"duplicate image id {record.image_id!r} (also {seen[record.image_id]})", record.image_path)
        seen[record.image_id] = record.image_path
    if metadata is not None:
        sources = [metadata] if isinstance(metadata, (str, Path)) else list(metadata)
        apply_metadata(records, read_metadata(sources))
    return records


def wrong_layout(root: Path, expected: Sequence[str]) -> DataError:
    """The error for a folder that holds none of a layout's expected entries."""
    present = sorted(p.name for p in root.iterdir())[:10]
    return DataError(
        f"wrong layout: expected one of {', '.join(expected)}; found {', '.join(present) or 'nothing'}",
        root,
    )
