"""Versioned JSON records: ``{"format": <name>, "version": <n>, **fields}``, written and recognised in one place.

The inference record (``inference.json``) and the TensorRT engine metadata are such records; a
reader names the formats and versions it accepts and gets the fields without the tags.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any


def tagged(format: str, version: int, fields: Mapping[str, Any]) -> dict[str, Any]:
    """``fields`` as a record of ``format`` at ``version`` (the tags first)."""
    return {"format": format, "version": version, **fields}


def untagged(data: Any, accepted: Collection[tuple[str, int]]) -> tuple[tuple[str, int], dict[str, Any]]:
    """The ``(format, version)`` of a record and its fields without the tags.

    Args:
        data: the parsed JSON.
        accepted: the ``(format, version)`` pairs the reader understands.

    Raises:
        ValueError: not a JSON object, or a format/version not in ``accepted`` (the message
            gives what the record says).
    """
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object, got {type(data).__name__}")
    kind = (data.get("format"), data.get("version"))
    if kind not in accepted:
        raise ValueError(f"format={kind[0]!r}, version={kind[1]!r}")
    return kind, {k: v for k, v in data.items() if k not in ("format", "version")}
