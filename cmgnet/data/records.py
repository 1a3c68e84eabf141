"""What a reader returns: one record per image, and a sample (record + fixed variant)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class LesionRecord:
    """One dermoscopy image with its mask and metadata.

    Args:
        image_id: unique id within the dataset (e.g. ``ISIC_0000000``).
        image_path: the image file.
        mask_path: the binary lesion mask, or ``None`` for unlabelled images.
        diagnosis: a :data:`cmgnet.text.pseudo_text.DIAGNOSES` value, or ``None`` when unknown.
        age: age in years, or ``None``.
        sex: ``"male"``/``"female"``, or ``None``.
        site: body site in words (``"back"``, ``"lower extremity"``), or ``None``.
        description: free text used verbatim as the sentence, or ``None``.
        split: ``"train"``, ``"val"``, ``"test"``, or ``None`` when the source has no split.
        source: the reader that produced the record (``"isic2017"``, ``"folder"``, ...).
        lesion_id: id shared by several images of one lesion (HAM10000), or ``None``;
            grouped splits keep a lesion's images together.
    """

    image_id: str
    image_path: Path
    mask_path: Path | None
    diagnosis: str | None
    age: float | None
    sex: str | None
    site: str | None
    description: str | None
    split: str | None
    source: str
    lesion_id: str | None = None

    @property
    def group(self) -> str:
        """The unit a leak-free split must not cut: the lesion when known, else the image."""
        return self.lesion_id or self.image_id


@dataclass(frozen=True)
class Sample:
    """An entry of a split: a record, optionally pinned to one of the 24 paper variants.

    Args:
        record: the source image.
        variant: ``0..23`` under the paper protocols (the expanded data set), else ``None``.
    """

    record: LesionRecord
    variant: int | None = None

    @property
    def key(self) -> str:
        """Unique id of the sample: the image id, suffixed ``@vNN`` for a fixed variant."""
        return self.record.image_id if self.variant is None else f"{self.record.image_id}@v{self.variant:02d}"
