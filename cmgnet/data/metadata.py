"""Metadata tables (diagnosis, age, sex, site, ...) read from CSV and joined to records by id.

One column-driven reader covers every layout the project meets, so callers pass files or
folders without naming a format:

- ISIC 2017 ``*_Part3_GroundTruth.csv``: ``image_id, melanoma, seborrheic_keratosis``
  (one-hot; both 0 means nevus);
- ISIC 2017 ``*_Data_metadata.csv``: ``image_id, age_approximate, sex``;
- HAM10000 ``HAM10000_metadata.csv``: ``lesion_id, image_id, dx, dx_type, age, sex, localization``;
- ISIC 2018 Task 3 ground truth: ``image, MEL, NV, BCC, AKIEC, BKL, DF, VASC`` (one-hot);
- the generic folder's ``metadata.csv``: ``image_id`` and any of
  ``diagnosis, age, sex, site, description, split, lesion_id``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

from .csvfiles import find_column, read_csv
from .errors import DataError
from .fields import parse_age, parse_diagnosis, parse_flag, parse_sex, parse_site, parse_split, parse_text
from .records import LesionRecord

ID_COLUMNS = ("image_id", "image", "isic_id")

# field -> (accepted column names, cell parser)
_COLUMNS: dict[str, tuple[tuple[str, ...], Callable[[str], object]]] = {
    "diagnosis": (("diagnosis", "dx"), parse_diagnosis),
    "age": (("age", "age_approximate", "age_approx"), parse_age),
    "sex": (("sex",), parse_sex),
    "site": (("site", "localization", "anatom_site_general", "anatom_site_general_challenge"), parse_site),
    "description": (("description",), parse_text),
    "split": (("split",), parse_split),
    "lesion_id": (("lesion_id",), parse_text),
}

_ISIC2017_ONE_HOT = ("melanoma", "seborrheic_keratosis")
_ISIC2018_ONE_HOT = ("mel", "nv", "bcc", "akiec", "bkl", "df", "vasc")


@dataclass
class MetadataEntry:
    """The metadata of one image id; ``None`` where a table says nothing."""

    diagnosis: str | None = None
    age: float | None = None
    sex: str | None = None
    site: str | None = None
    description: str | None = None
    split: str | None = None
    lesion_id: str | None = None


FIELDS: tuple[str, ...] = tuple(f.name for f in fields(MetadataEntry))

MetadataTable = dict[str, tuple[MetadataEntry, Path, int]]
"""image id -> (entry, file, row) so conflicts and orphans can be reported precisely."""


def _one_hot_diagnosis(row: dict[str, str], columns: tuple[str, ...]) -> str | None:
    hot = [name for name in columns if parse_flag(row[name])]
    if columns == _ISIC2017_ONE_HOT:
        if len(hot) == 2:
            raise ValueError("both melanoma and seborrheic_keratosis are 1")
        return parse_diagnosis(hot[0]) if hot else "nevus"
    if len(hot) != 1:
        raise ValueError(f"expected exactly one of {', '.join(columns)} to be 1, got {hot or 'none'}")
    return parse_diagnosis(hot[0])


def read_metadata_table(path: Path) -> MetadataTable:
    """Read one metadata CSV (layout detected from its columns).

    Args:
        path: the CSV file.

    Returns:
        The rows keyed by image id.

    Raises:
        DataError: no id column, no known metadata column, a bad cell (unknown diagnosis,
            non-numeric age, ...) or a duplicate id; the message names file and row.
    """
    path = Path(path)
    columns, rows = read_csv(path)
    id_column = find_column(columns, ID_COLUMNS)
    if id_column is None:
        raise DataError(f"no image id column (one of {', '.join(ID_COLUMNS)}) in columns {columns}", path, 1)
    mapping = {name: column for name, (names, _) in _COLUMNS.items() if (column := find_column(columns, names))}
    one_hot = next((group for group in (_ISIC2017_ONE_HOT, _ISIC2018_ONE_HOT) if set(group) <= set(columns)), None)
    if not mapping and one_hot is None:
        known = sorted(
            {n for names, _ in _COLUMNS.values() for n in names} | set(_ISIC2017_ONE_HOT) | set(_ISIC2018_ONE_HOT)
        )
        raise DataError(f"no metadata column in {columns}; expected some of {', '.join(known)}", path, 1)
    table: MetadataTable = {}
    for line, row in rows:
        image_id = row[id_column].strip()
        if not image_id:
            raise DataError(f"empty {id_column}", path, line)
        if image_id in table:
            raise DataError(f"duplicate image id {image_id!r} (first on row {table[image_id][2]})", path, line)
        entry = MetadataEntry()
        try:
            for name, column in mapping.items():
                setattr(entry, name, _COLUMNS[name][1](row[column]))
            if entry.diagnosis is None and one_hot is not None:
                entry.diagnosis = _one_hot_diagnosis(row, one_hot)
        except ValueError as error:
            raise DataError(str(error), path, line) from None
        table[image_id] = (entry, path, line)
    return table


TEXT_FIELDS: tuple[str, ...] = ("diagnosis", "age", "sex", "site", "description")
"""What a sentence is made from: the metadata a client may send with one image (``cmgnet serve``)."""


def entry_from_mapping(values: Mapping[str, object]) -> MetadataEntry:
    """One image's metadata from a JSON-like object with keys of :data:`TEXT_FIELDS`.

    Values are read by the CSV cells' parsers (``"age": 55`` and ``"age": "55"`` alike);
    ``null`` or a missing key means unknown.

    Raises:
        ValueError: an unknown key, a value that is not a string or number, or a value a
            parser refuses (an age outside 0..130, an unknown diagnosis, ...).
    """
    if unknown := sorted(set(values) - set(TEXT_FIELDS)):
        raise ValueError(f"unknown key(s) {', '.join(map(repr, unknown))}; expected some of {', '.join(TEXT_FIELDS)}")
    entry = MetadataEntry()
    for name, value in values.items():
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise ValueError(f"{name}: expected a string or a number, got {type(value).__name__}")
        setattr(entry, name, _COLUMNS[name][1](str(value)))
    return entry


def _csv_files(sources: Iterable[str | Path]) -> list[Path]:
    files: list[Path] = []
    for source in map(Path, sources):
        if source.is_dir():
            found = sorted(p for p in source.iterdir() if p.suffix.lower() == ".csv" and p.is_file())
            if not found:
                raise DataError("metadata folder holds no .csv file", source)
            files.extend(found)
        elif source.is_file():
            files.append(source)
        else:
            raise DataError("metadata file or folder not found", source)
    return files


def merge_tables(tables: Iterable[MetadataTable]) -> MetadataTable:
    """Join tables by image id, field by field.

    Raises:
        DataError: two tables give different values for one field of one id.
    """
    merged: MetadataTable = {}
    for table in tables:
        for image_id, (entry, path, line) in table.items():
            if image_id not in merged:
                merged[image_id] = (MetadataEntry(**vars(entry)), path, line)
                continue
            into, first_path, first_line = merged[image_id]
            for name in FIELDS:
                new, old = getattr(entry, name), getattr(into, name)
                if new is not None and old is not None and new != old:
                    raise DataError(
                        f"{name} of {image_id!r} is {new!r} here but {old!r} in {first_path}, row {first_line}",
                        path,
                        line,
                    )
                if old is None:
                    setattr(into, name, new)
    return merged


def read_metadata(sources: Sequence[str | Path]) -> MetadataTable:
    """Read and join metadata CSVs.

    Args:
        sources: CSV files and/or folders (every ``*.csv`` directly inside is read).

    Returns:
        The joined table keyed by image id.

    Raises:
        DataError: a missing path, an empty folder, or any error of
            :func:`read_metadata_table` / :func:`merge_tables`.
    """
    return merge_tables(read_metadata_table(path) for path in _csv_files(sources))


def apply_metadata(records: list[LesionRecord], table: MetadataTable) -> None:
    """Fill the records' empty fields from a table, in place; ids absent from it are left as they are.

    Raises:
        DataError: the table contradicts a value the reader already found.
    """
    for record in records:
        if record.image_id not in table:
            continue
        entry, path, line = table[record.image_id]
        for name in FIELDS:
            new, old = getattr(entry, name), getattr(record, name)
            if new is not None and old is not None and new != old:
                raise DataError(f"{name} of {record.image_id!r} is {new!r} here but {old!r} in the dataset", path, line)
            if old is None:
                setattr(record, name, new)
