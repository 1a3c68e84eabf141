"""Small on-disk datasets in every supported layout, for the data tests.

Images come from the project's procedural generator, so every fixture is a few kilobytes
and is written in milliseconds.
"""

from __future__ import annotations

import csv
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cmgnet.data.loaders import dali_available
from cmgnet.data.synthetic import render_case

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
ISIC2018_256 = SHARED_DATA / "isic2018-256"
ISIC2017_METADATA = SHARED_DATA / "isic2017-metadata"
HAM10000 = SHARED_DATA / "ham10000"

requires_shared_data = pytest.mark.skipif(
    not ISIC2018_256.is_dir(), reason=f"real data not found at {SHARED_DATA} (only the project workspace ships it)"
)
requires_dali = pytest.mark.skipif(
    not dali_available(), reason="nvidia-dali is not installed (pip install cmgnet[train])"
)

DIAGNOSES = ("nevus", "melanoma", "seborrheic_keratosis")


def case(index: int, size: int = 48, diagnosis: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic image/mask pair, the diagnosis cycling through :data:`DIAGNOSES`."""
    diagnosis = diagnosis or DIAGNOSES[index % len(DIAGNOSES)]
    return render_case(np.random.default_rng([7, index]), size, diagnosis)


def save(array: np.ndarray, path: Path) -> Path:
    """Write an array as an image file (format from the suffix), creating folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[object]]) -> Path:
    """Write a CSV file with a header line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def make_isic2018(root: Path, counts: dict[str, int], size: int = 48) -> Path:
    """ISIC 2018 Task 1 layout; ``counts`` maps challenge split names (Training, ...) to sizes."""
    index = 0
    for name, count in counts.items():
        for _ in range(count):
            image, mask = case(index, size)
            image_id = f"ISIC_{index:07d}"
            save(image, root / f"ISIC2018_Task1-2_{name}_Input" / f"{image_id}.jpg")
            save(mask, root / f"ISIC2018_Task1_{name}_GroundTruth" / f"{image_id}_segmentation.png")
            index += 1
    (root / "ISIC2018_Task1-2_Training_Input" / "LICENSE.txt").write_text("not an image")
    return root


def make_ham10000(root: Path, n: int = 4, size: tuple[int, int] = (40, 30)) -> Path:
    """HAM10000 layout with non-square images; the metadata also lists images not on disk."""
    rows = []
    for index in range(n):
        image, mask = case(index, max(size))
        image_id = f"ISIC_{24306 + index:07d}"
        save(image[: size[1], : size[0]], root / "images" / f"{image_id}.jpg")
        save(mask[: size[1], : size[0]], root / "masks" / f"{image_id}.png")
        rows.append(
            (f"HAM_{index // 2:07d}", image_id, ["nv", "mel", "bkl", "df"][index % 4], "histo", 45, "male", "back")
        )
    rows.append(("HAM_9999999", "ISIC_0099999", "vasc", "histo", "", "unknown", "unknown"))  # not on disk
    write_csv(
        root / "HAM10000_metadata.csv", ("lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization"), rows
    )
    return root


def make_ph2(root: Path, n: int = 3, table: str = "txt", size: int = 40) -> Path:
    """PH2 layout (BMP files) with its diagnosis table as ``PH2_dataset.txt`` or ``.xlsx``."""
    images = root / "PH2Dataset" / "PH2 Dataset images"
    codes = []
    for index in range(n):
        case_id = f"IMD{index + 2:03d}"
        image, mask = case(index, size)
        save(image, images / case_id / f"{case_id}_Dermoscopic_Image" / f"{case_id}.bmp")
        save(mask, images / case_id / f"{case_id}_lesion" / f"{case_id}_lesion.bmp")
        codes.append((case_id, index % 3))
    if table == "txt":
        lines = ["|| Name || Histological Diagnosis || Clinical Diagnosis || Asymmetry || Colors ||"]
        lines += [f"||  {case_id}  ||   ||  {code}  ||  0  ||  {{1}}  ||" for case_id, code in codes]
        lines += ["", "Legend:", "Clinical Diagnosis:", "0 - Common Nevus;", "1 - Atypical Nevus;", "2 - Melanoma."]
        (root / "PH2Dataset" / "PH2_dataset.txt").write_text("\n".join(lines) + "\n")
    else:
        import openpyxl

        book = openpyxl.Workbook()
        sheet = book.active
        sheet.append(["PH2 Database"])
        sheet.append([])
        sheet.append(["Image Name", "Histological Diagnosis", "Clinical Diagnosis", None, None, "Asymmetry"])
        sheet.append([None, None, "Common Nevus", "Atypical Nevus", "Melanoma", None])
        for case_id, code in codes:
            sheet.append([case_id, None, *("X" if code == k else None for k in range(3)), 0])
        book.save(root / "PH2Dataset" / "PH2_dataset.xlsx")
    return root


def make_folder(
    root: Path,
    n: int = 6,
    size: int = 48,
    *,
    metadata: bool = True,
    splits: Sequence[str] | None = ("train", "train", "train", "train", "val", "test"),
    mask_suffix: str = "",
) -> Path:
    """Generic folder layout: ``images/``, ``masks/`` and optionally ``metadata.csv``."""
    rows = []
    for index in range(n):
        image, mask = case(index, size)
        image_id = f"case{index:03d}"
        save(image, root / "images" / f"{image_id}.png")
        save(mask, root / "masks" / f"{image_id}{mask_suffix}.png")
        split = splits[index % len(splits)] if splits else ""
        description = "Raised pink papule noted by the clinician." if index == 0 else ""
        rows.append((image_id, DIAGNOSES[index % 3], 30 + index, "female", "back", description, split))
    if metadata:
        write_csv(root / "metadata.csv", ("image_id", "diagnosis", "age", "sex", "site", "description", "split"), rows)
    return root


def make_mask_images(root: Path, n: int = 6, size: int = 64) -> Path:
    """Folder dataset whose images are their own masks (white lesion on black), for alignment tests."""
    rows = []
    for index in range(n):
        _, mask = case(index, size)
        mask[: size // 8, : size // 8] = 255  # an off-centre corner blob makes flips and rotations visible
        save(np.repeat(mask[..., None], 3, axis=-1), root / "images" / f"m{index:02d}.png")
        save(mask, root / "masks" / f"m{index:02d}.png")
        rows.append((f"m{index:02d}", "train" if index < n - 2 else "val"))
    write_csv(root / "metadata.csv", ("image_id", "split"), rows)
    return root


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims ``width x height`` pixels but holds almost no data (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )
    return path
