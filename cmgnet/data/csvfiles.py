"""CSV files: reading with row numbers and header checks (errors name file and row), and
writing cells a spreadsheet will not run as formulas."""

from __future__ import annotations

import csv
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from .errors import DataError

FORMULA_PREFIXES: tuple[str, ...] = ("=", "+", "-", "@", "\t", "\r")
"""First characters that make a spreadsheet read a cell as a formula (OWASP, CSV injection)."""


def spreadsheet_safe(row: Mapping[str, Any], text_columns: Iterable[str]) -> dict[str, Any]:
    """A row to write to a CSV that people open in spreadsheets, its user-supplied text made inert.

    OWASP's rule: a string cell that begins with ``=``, ``+``, ``-``, ``@``, tab or carriage
    return gets a leading single quote, so ``=HYPERLINK(...)`` in a file name, image id or
    metadata sentence is shown as text, not run. Only ``text_columns`` are touched (ids,
    paths, sentences, error messages): numbers the program computed, a negative one
    included, stay numbers. Programs reading the CSV back see the quote.

    Args:
        row: column -> value.
        text_columns: the columns that hold user-controlled strings.

    Returns:
        A copy of ``row`` with those string cells escaped.
    """
    safe = dict(row)
    for column in text_columns:
        value = safe.get(column)
        if isinstance(value, str) and value.startswith(FORMULA_PREFIXES):
            safe[column] = "'" + value
    return safe


def read_csv(path: Path) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """Read a CSV file whose first line is a header.

    Header names are stripped and lower-cased; a UTF-8 byte-order mark is ignored.

    Args:
        path: the CSV file.

    Returns:
        ``(columns, rows)``: the normalised header and ``(line_number, {column: cell})``
        pairs, line numbers 1-based with the header on line 1. Missing trailing cells are ``""``.

    Raises:
        DataError: unreadable or empty file, duplicate column names, a row with more cells
            than the header.
    """
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            if header is None:
                raise DataError("empty CSV file (no header line)", path)
            columns = [name.strip().lower() for name in header]
            if len(set(columns)) != len(columns):
                raise DataError(f"duplicate column names in header {columns}", path, 1)
            rows = []
            for cells in reader:
                if not any(cell.strip() for cell in cells):
                    continue  # blank line
                if len(cells) > len(columns):
                    raise DataError(
                        f"{len(cells)} cells but the header has {len(columns)} columns", path, reader.line_num
                    )
                rows.append(
                    (reader.line_num, dict(zip(columns, cells + [""] * (len(columns) - len(cells)), strict=True)))
                )
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise DataError(f"cannot read CSV: {error}", path) from error
    return columns, rows


def find_column(columns: list[str], candidates: tuple[str, ...]) -> str | None:
    """The first of ``candidates`` present in ``columns`` (already lower-case), or ``None``."""
    return next((name for name in candidates if name in columns), None)
