"""Dataset validation: every file readable, masks present, same size and binary, sizes bounded."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from .errors import DataError
from .imageio import DEFAULT_MAX_PIXELS, decode_image, decode_mask, probe, read_encoded
from .records import LesionRecord

LEVELS: tuple[str, ...] = ("header", "full")


@dataclass
class ValidationReport:
    """Result of :func:`validate_records`.

    Attributes:
        level: ``"header"`` (file headers only) or ``"full"`` (every pixel decoded).
        sizes: image id -> ``(width, height)`` of every image whose header could be read.
        errors: one :class:`DataError` per bad file, in record order.
    """

    level: str
    sizes: dict[str, tuple[int, int]] = field(default_factory=dict)
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


def _check_record(record: LesionRecord, level: str, max_pixels: int, require_masks: bool) -> tuple[int, int]:
    image = probe(record.image_path, max_pixels)
    if record.mask_path is None:
        if require_masks:
            raise DataError(f"no mask for image {record.image_id!r}", record.image_path)
    else:
        mask = probe(record.mask_path, max_pixels)
        if (mask.width, mask.height) != (image.width, image.height):
            raise DataError(
                f"mask is {mask.width}x{mask.height} but its image {record.image_path.name} "
                f"is {image.width}x{image.height}",
                record.mask_path,
            )
    if level == "full":
        decode_image(read_encoded(record.image_path), record.image_path, max_pixels)
        if record.mask_path is not None:
            decode_mask(read_encoded(record.mask_path), record.mask_path, max_pixels)
    return image.width, image.height


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

    def check(record: LesionRecord) -> tuple[str, tuple[int, int] | DataError]:
        try:
            return record.image_id, _check_record(record, level, max_pixels, require_masks)
        except DataError as error:
            return record.image_id, error

    with ThreadPoolExecutor(max(1, workers)) as pool:
        for image_id, result in pool.map(check, records):
            if isinstance(result, DataError):
                report.errors.append(result)
            else:
                report.sizes[image_id] = result
    return report
