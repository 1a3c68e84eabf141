"""The one exception type for bad input data."""

from __future__ import annotations

from pathlib import Path


class DataError(ValueError):
    """Bad or inconsistent input data; the message names the file (and CSV row).

    Args:
        message: what is wrong and, where useful, how to fix it.
        path: the offending file or folder.
        row: 1-based line number in a CSV file (the header is line 1).
    """

    def __init__(self, message: str, path: str | Path | None = None, row: int | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self.row = row
        where = ""
        if path is not None:
            where = f"{path}" + (f", row {row}" if row is not None else "") + ": "
        super().__init__(where + message)
