"""PH2 (Mendonca et al. 2013) in its official layout, diagnosis from its spreadsheet or text table."""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from ..errors import DataError
from ..metadata import MetadataEntry, MetadataTable
from ..records import LesionRecord
from .common import MetadataSources, finish, make_records, require_dir, wrong_layout

IMAGES_DIR = "PH2 Dataset images"
_ID = re.compile(r"IMD\d+")
_CLASSES = {"common nevus": "nevus", "atypical nevus": "atypical_nevus", "melanoma": "melanoma"}
_CODES = {"0": "nevus", "1": "atypical_nevus", "2": "melanoma"}  # PH2_dataset.txt legend

Rows = list[tuple[int, list[str]]]  # (1-based row/line number, cells)


def _xlsx_rows(path: Path) -> Rows:
    try:
        import openpyxl
    except ImportError:
        raise DataError(
            "reading PH2_dataset.xlsx needs openpyxl (pip install openpyxl), or keep PH2_dataset.txt beside it", path
        ) from None
    try:
        sheet = openpyxl.load_workbook(path, read_only=True, data_only=True).worksheets[0]
        return [
            (number, ["" if cell is None else str(cell).strip() for cell in row])
            for number, row in enumerate(sheet.iter_rows(values_only=True), start=1)
        ]
    except Exception as error:  # openpyxl raises many types for a damaged workbook
        raise DataError(f"cannot read spreadsheet: {error}", path) from None


def _txt_rows(path: Path) -> Rows:
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    # Table lines look like "||  IMD003  ||   ||  0  || ..."; the legend below is plain text.
    return [
        (number, [cell.strip() for cell in line.strip().strip("|").split("||")])
        for number, line in enumerate(lines, start=1)
        if line.lstrip().startswith("||")
    ]


def _find(rows: Rows, names: Iterable[str]) -> dict[str, int]:
    """Column index of each header name found in the rows before the first data row."""
    wanted, found = set(names), {}
    for _, cells in rows:
        if any(_ID.fullmatch(cell) for cell in cells[:2]):
            break  # header rows end where the cases start
        for index, cell in enumerate(cells):
            if cell.lower() in wanted:
                found.setdefault(cell.lower(), index)
    return found


def parse_ph2_table(rows: Rows, path: Path) -> MetadataTable:
    """Diagnoses from PH2's table: one ``X`` among the Common Nevus / Atypical Nevus / Melanoma
    columns (spreadsheet), or a Clinical Diagnosis code 0/1/2 (text table).

    Raises:
        DataError: no recognisable header, or a row without exactly one diagnosis.
    """
    header = _find(rows, ["image name", "name", "clinical diagnosis", *_CLASSES])
    name_column = header.get("image name", header.get("name"))
    x_columns = {label: header[name] for name, label in _CLASSES.items() if name in header}
    if name_column is None or (len(x_columns) < 3 and "clinical diagnosis" not in header):
        raise DataError(
            "no PH2 header (Image Name and Clinical Diagnosis / Common Nevus, Atypical Nevus, Melanoma)", path
        )
    table: MetadataTable = {}
    for number, cells in rows:
        cells = cells + [""] * (max(header.values()) + 1 - len(cells))
        if not _ID.fullmatch(cells[name_column]):
            continue
        if len(x_columns) == 3:
            marked = [label for label, column in x_columns.items() if cells[column]]
        else:
            code = cells[header["clinical diagnosis"]]
            marked = [_CODES[code]] if code in _CODES else []
        if len(marked) != 1:
            raise DataError(
                f"expected exactly one clinical diagnosis for {cells[name_column]}, got {marked or 'none'}",
                path,
                number,
            )
        table[cells[name_column]] = (MetadataEntry(diagnosis=marked[0]), path, number)
    return table


def read_ph2(root: str | Path, metadata: MetadataSources = None) -> list[LesionRecord]:
    """Read PH2 as distributed.

    Layout (``root`` is the ``PH2Dataset`` folder or its parent)::

        PH2 Dataset images/IMDxxx/IMDxxx_Dermoscopic_Image/IMDxxx.bmp
        PH2 Dataset images/IMDxxx/IMDxxx_lesion/IMDxxx_lesion.bmp
        PH2_dataset.xlsx  (clinical diagnosis; needs openpyxl)  or  PH2_dataset.txt

    Without either table the records have no diagnosis. PH2 has no official split.

    Args:
        root: the dataset folder.
        metadata: extra metadata CSV files/folders joined by image id.

    Returns:
        Records sorted by id, diagnoses nevus / atypical_nevus / melanoma.

    Raises:
        DataError: wrong layout, a case folder without its image or lesion mask, bad table rows.
    """
    root = require_dir(root)
    if not (root / IMAGES_DIR).is_dir() and (root / "PH2Dataset" / IMAGES_DIR).is_dir():
        root = root / "PH2Dataset"
    if not (root / IMAGES_DIR).is_dir():
        raise wrong_layout(root, [f"{IMAGES_DIR}/"])
    images, masks = {}, {}
    for case in sorted(p for p in (root / IMAGES_DIR).iterdir() if p.is_dir() and _ID.fullmatch(p.name)):
        image = case / f"{case.name}_Dermoscopic_Image" / f"{case.name}.bmp"
        mask = case / f"{case.name}_lesion" / f"{case.name}_lesion.bmp"
        for path, what in ((image, "dermoscopic image"), (mask, "lesion mask")):
            if not path.is_file():
                raise DataError(f"missing {what} of case {case.name} (expected {path.relative_to(case)})", case)
        images[case.name], masks[case.name] = image, mask
    if not images:
        raise DataError("no IMDxxx case folders", root / IMAGES_DIR)
    table = None
    txt, xlsx = root / "PH2_dataset.txt", root / "PH2_dataset.xlsx"
    if txt.is_file():  # same content as the spreadsheet, and needs no extra package
        table = parse_ph2_table(_txt_rows(txt), txt)
    elif xlsx.is_file():
        table = parse_ph2_table(_xlsx_rows(xlsx), xlsx)
    return finish(make_records(images, masks, source="ph2", table=table), metadata)
