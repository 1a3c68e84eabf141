"""Parsers for metadata cell values; each raises ``ValueError`` with a readable message.

The CSV layer turns those into :class:`~cmgnet.data.errors.DataError` naming file and row.
"""

from __future__ import annotations

import math

from cmgnet.text.pseudo_text import normalize_diagnosis

# Cell values the ISIC and HAM10000 tables use for "not recorded".
MISSING = frozenset({"", "unknown", "nan", "na", "n/a", "none", "null", "?"})

_SEX = {"male": "male", "m": "male", "female": "female", "f": "female"}
_SPLITS = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
    "testing": "test",
}
SPLITS: tuple[str, ...] = ("train", "val", "test")


def is_missing(value: str | None) -> bool:
    """True when a cell means "not recorded"."""
    return value is None or value.strip().lower() in MISSING


def parse_age(value: str | None) -> float | None:
    """Age in years from a cell (``"55"``, ``"55.0"``), ``None`` when missing.

    Raises:
        ValueError: not a number, or outside 0..130.
    """
    if is_missing(value):
        return None
    try:
        age = float(value)
    except ValueError:
        raise ValueError(f"age {value!r} is not a number") from None
    if not math.isfinite(age) or not 0 <= age <= 130:
        raise ValueError(f"age {value!r} is outside 0..130")
    return age


def parse_sex(value: str | None) -> str | None:
    """``"male"``/``"female"`` from a cell (also ``m``/``f``), ``None`` when missing.

    Raises:
        ValueError: any other value.
    """
    if is_missing(value):
        return None
    key = value.strip().lower()
    if key not in _SEX:
        raise ValueError(f"sex {value!r} is not one of male, female, unknown")
    return _SEX[key]


def parse_site(value: str | None) -> str | None:
    """Body site in lower-case words (``"lower_extremity"`` -> ``"lower extremity"``)."""
    if is_missing(value):
        return None
    return " ".join(value.strip().lower().replace("_", " ").split())


def parse_diagnosis(value: str | None) -> str | None:
    """Diagnosis on the vocabulary, ``None`` when the cell is empty.

    ``"unknown"`` is a vocabulary value here (a diagnosis recorded as unknown), not a
    missing cell.

    Raises:
        ValueError: a value outside the vocabulary and its aliases.
    """
    if value is None or not value.strip():
        return None
    return normalize_diagnosis(value)


def parse_split(value: str | None) -> str | None:
    """``"train"``/``"val"``/``"test"`` (also ``training``, ``validation``, ...), ``None`` when empty.

    Raises:
        ValueError: any other value.
    """
    if value is None or not value.strip():
        return None
    key = value.strip().lower()
    if key not in _SPLITS:
        raise ValueError(f"split {value!r} is not one of train, val, test")
    return _SPLITS[key]


def parse_text(value: str | None) -> str | None:
    """Free text, stripped; ``None`` when empty."""
    if value is None or not value.strip():
        return None
    return value.strip()


def parse_flag(value: str | None) -> bool:
    """A one-hot label cell (``"1"``, ``"1.0"``, ``"0"``, ``"0.0"``).

    Raises:
        ValueError: anything but 0 or 1.
    """
    try:
        number = float(value) if value is not None else math.nan
    except ValueError:
        number = math.nan
    if number not in (0.0, 1.0):
        raise ValueError(f"label {value!r} is not 0 or 1")
    return number == 1.0
