"""Dataset validation: every file readable, masks present, same size and binary, sizes bounded.

A ``full`` check decodes every image and mask. Records that pass are remembered in a small
JSON cache keyed by each file's path, size and modification time (``$CMGNET_CACHE_DIR``, else
``$XDG_CACHE_HOME/cmgnet`` or ``~/.cache/cmgnet``), so checking the same, unchanged files again
(every rerun of a training, every split's loader) costs a ``stat`` per file. A file that
changes is decoded again; failures are never cached.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from cmgnet.outputs import WriteFailedError, atomic_write_text

from .errors import DataError
from .imageio import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, ImageInfo, decode_image, decode_mask, probe, read_encoded
from .records import LesionRecord

LEVELS: tuple[str, ...] = ("header", "full")


@dataclass
class ValidationReport:
    """Result of :func:`validate_records`.

    Attributes:
        level: ``"header"`` (file headers only) or ``"full"`` (every pixel decoded).
        sizes: image id -> ``(width, height)`` as displayed (EXIF orientation applied) of every
            image whose header could be read.
        converted: image id -> why its image or mask is not a plain upright 8-bit file
            (:meth:`~cmgnet.data.imageio.ImageInfo.conversion`); the DALI loader decodes these
            through :func:`~cmgnet.data.imageio.to_array` instead of its own decoders.
        errors: one :class:`DataError` per bad file, in record order.
    """

    level: str
    sizes: dict[str, tuple[int, int]] = field(default_factory=dict)
    converted: dict[str, str] = field(default_factory=dict)
    errors: list[DataError] = field(default_factory=list)

    def raise_if_failed(self, shown: int = 10) -> None:
        """Raise one :class:`DataError` listing the first ``shown`` problems, if any."""
        if not self.errors:
            return
        lines = [str(error) for error in self.errors[:shown]]
        if len(self.errors) > shown:
            lines.append(f"... and {len(self.errors) - shown} more (run `cmgnet data check` for all)")
        if len(self.errors) == 1:
            raise self.errors[0]
        raise DataError(f"{len(self.errors)} problems in the dataset:\n  " + "\n  ".join(lines))


_Checked = tuple[tuple[int, int], str | None]  # displayed (width, height), conversion note


def _check_record(record: LesionRecord, level: str, max_pixels: int, require_masks: bool) -> _Checked:
    image = probe(record.image_path, max_pixels)
    notes = [f"image: {image.conversion()}"] if image.conversion() else []
    if record.mask_path is None:
        if require_masks:
            raise DataError(f"no mask for image {record.image_id!r}", record.image_path)
    else:
        mask = probe(record.mask_path, max_pixels)
        if (mask.width, mask.height) != (image.width, image.height):  # both as displayed
            raise DataError(
                f"mask is {mask.width}x{mask.height} but its image {record.image_path.name} "
                f"is {image.width}x{image.height}" + _rotated(image, mask),
                record.mask_path,
            )
        notes += [f"mask: {mask.conversion(mask=True)}"] if mask.conversion(mask=True) else []
    if level == "full":
        decode_image(read_encoded(record.image_path), record.image_path, max_pixels)
        if record.mask_path is not None:
            decode_mask(read_encoded(record.mask_path), record.mask_path, max_pixels)
    return (image.width, image.height), "; ".join(notes) or None


def _rotated(image: ImageInfo, mask: ImageInfo) -> str:
    """A hint when an EXIF orientation is what makes the sizes differ."""
    rotated = [f"{name} has EXIF orientation {info.orientation}" for name, info in (("image", image), ("mask", mask))
               if info.orientation >= 5]
    return f" as displayed ({', '.join(rotated)}: sizes are compared as a viewer shows them)" if rotated else ""


def cache_dir() -> Path:
    """Where validation results are cached (see the module docstring)."""
    if os.environ.get("CMGNET_CACHE_DIR"):
        return Path(os.environ["CMGNET_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cmgnet"


def _stamp(path: Path | None) -> list[int] | None:
    if path is None:
        return None
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns]


class _ValidatedCache:
    """Records that passed the full check, keyed by their files' path, size and mtime."""

    def __init__(self, records: Sequence[LesionRecord], max_pixels: int) -> None:
        folders = sorted({str(r.image_path.resolve().parent) for r in records})
        digest = hashlib.sha1("\n".join(folders).encode()).hexdigest()[:16]
        self.path = cache_dir() / f"validated-{digest}.json"
        self.max_pixels = max_pixels
        try:
            self.entries: dict[str, list] = json.loads(self.path.read_text())
            if not isinstance(self.entries, dict):
                self.entries = {}
        except (OSError, ValueError):  # no cache yet, or a damaged one: start over
            self.entries = {}
        self.dirty = False

    @staticmethod
    def key(record: LesionRecord) -> str:
        return f"{record.image_path.resolve()}|{record.mask_path.resolve() if record.mask_path else ''}"

    def _stamp(self, record: LesionRecord) -> list | None:
        try:
            return [_stamp(record.image_path), _stamp(record.mask_path), self.max_pixels]
        except OSError:
            return None

    def get(self, record: LesionRecord) -> _Checked | None:
        entry = self.entries.get(self.key(record))
        stamp = self._stamp(record)
        if entry is None or stamp is None or len(entry) != 6 or entry[:3] != stamp:
            return None  # 5-entry records predate orientation-aware sizes: check again
        return (entry[3], entry[4]), entry[5]

    def put(self, record: LesionRecord, checked: _Checked) -> None:
        if (stamp := self._stamp(record)) is not None:
            self.entries[self.key(record)] = [*stamp, *checked[0], checked[1]]
            self.dirty = True

    def save(self) -> None:
        if not self.dirty:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.path, json.dumps(self.entries))  # concurrent ranks never read half a file
        except (OSError, WriteFailedError):  # a read-only home costs speed on the next run, nothing else
            pass


def validate_records(
    records: Sequence[LesionRecord],
    *,
    level: str = "header",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    require_masks: bool = True,
    workers: int = 4,
) -> ValidationReport:
    """Check every record's files; collect all problems instead of stopping at the first.

    Args:
        records: the records to check.
        level: ``"header"`` reads only headers (fast: sizes, formats, pixel limit, missing or
            mis-sized masks); ``"full"`` also decodes every image and mask (truncation,
            non-binary masks).
        max_pixels: images above this many pixels are refused before decoding.
        require_masks: a record without a mask is an error (training and evaluation).
        workers: threads (PIL releases the GIL while decoding).

    Returns:
        The report; call :meth:`ValidationReport.raise_if_failed` to turn problems into an error.

    Raises:
        ValueError: unknown ``level``.
    """
    if level not in LEVELS:
        raise ValueError(f"unknown validation level {level!r}; expected one of {', '.join(LEVELS)}")
    report = ValidationReport(level)
    for image_id, count in Counter(r.image_id for r in records).items():
        if count > 1:
            first = next(r for r in records if r.image_id == image_id)
            report.errors.append(DataError(f"image id {image_id!r} appears {count} times", first.image_path))

    cache = _ValidatedCache(records, max_pixels) if level == "full" and records else None

    def check(record: LesionRecord) -> tuple[LesionRecord, _Checked | DataError, bool]:
        if cache is not None and (record.mask_path is not None or not require_masks):
            if (checked := cache.get(record)) is not None:
                return record, checked, True
        try:
            return record, _check_record(record, level, max_pixels, require_masks), False
        except DataError as error:
            return record, error, False

    with ThreadPoolExecutor(max(1, workers)) as pool:
        for record, result, cached in pool.map(check, records):
            if isinstance(result, DataError):
                report.errors.append(result)
            else:
                report.sizes[record.image_id] = result[0]
                if result[1]:
                    report.converted[record.image_id] = result[1]
                if cache is not None and not cached:
                    cache.put(record, result)
    if cache is not None:
        cache.save()
    return report


def orphan_masks(records: Sequence[LesionRecord]) -> list[DataError]:
    """Mask files in the dataset's mask folders that no image claims (one error per file).

    A renamed or deleted image leaves its mask behind: ``cmgnet data check`` and the checks
    before training and evaluation report it alike, so a smaller dataset is never silent.

    Args:
        records: the dataset's records (their ``mask_path`` folders are the ones searched).

    Returns:
        One :class:`DataError` per orphaned mask, sorted by path.
    """
    claimed = {r.mask_path.resolve() for r in records if r.mask_path is not None}
    folders = {r.mask_path.parent for r in records if r.mask_path is not None}
    images = {r.image_path.resolve() for r in records}
    found = []
    for folder in sorted(folders):
        for path in sorted(folder.iterdir()):
            resolved = path.resolve()
            if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and resolved not in claimed \
                    and resolved not in images:
                found.append(DataError("mask without an image (no image with this id in the dataset)", path))
    return found
