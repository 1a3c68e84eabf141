"""Integrity of saved weights: the SHA-256 recorded beside them, and finite values only.

Damaged weight bytes (not the header) still parse as safetensors and load as NaN or arbitrary
numbers; a network with NaN weights predicts empty masks, which read as "no lesion". So:

* ``save_pretrained`` records the SHA-256 of ``model.safetensors`` in ``config.json``, and the
  diagnosis classifier that of ``classifier.safetensors`` in ``classifier.json``, under
  ``weights_sha256`` (the shipped models too); loading verifies it. A record written before
  hashes existed has no such key and still loads.
* every safetensors file the project reads (:func:`load_safetensors`) must hold
  finite floating-point values only.

Either failure is a :class:`~cmgnet.errors.CheckpointError` naming the file (and the tensor).
Imports nothing heavy (torch only inside functions), so torch-free modules can use it.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import CheckpointError, one_line

SHA256_KEY = "weights_sha256"
_HEX64 = re.compile(r"[0-9a-f]{64}")


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def recorded_sha256(record: str | Path) -> str | None:
    """The weights hash a JSON record (``config.json``, ``classifier.json``) holds, if any.

    Returns:
        The hex digest, or ``None`` when the record is absent, unreadable (its own loader names
        that) or records no hash.

    Raises:
        CheckpointError: the key is there but is not 64 lower-case hex digits.
    """
    try:
        data = json.loads(Path(record).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or SHA256_KEY not in data:
        return None
    value = data[SHA256_KEY]
    if not isinstance(value, str) or not _HEX64.fullmatch(value):
        raise CheckpointError(f"{SHA256_KEY}: expected 64 lower-case hex digits, got {str(value)[:80]!r}", record)
    return value


def record_sha256(record: str | Path, weights: str | Path) -> str:
    """Write the SHA-256 of ``weights`` into its JSON record (e.g. after converting the weights to fp16).

    Returns:
        The hex digest.
    """
    record = Path(record)
    data = json.loads(record.read_text())
    data[SHA256_KEY] = file_sha256(weights)
    record.write_text(json.dumps(data, indent=2) + "\n")
    return data[SHA256_KEY]


def check_sha256(path: str | Path, expected: str, record: str | Path) -> None:
    """Raise unless the file's SHA-256 is ``expected`` (recorded in ``record``).

    Raises:
        CheckpointError: the hashes differ (names the file and the record).
    """
    actual = file_sha256(path)
    if actual != expected:
        raise CheckpointError(f"weights do not match the SHA-256 recorded in {record} (file {actual[:12]}..., "
                              f"recorded {expected[:12]}...): the file changed after it was saved; "
                              "re-save or re-download it", path)


def nonfinite_tensors(tensors: Mapping[str, Any]) -> list[str]:
    """Names of the floating-point tensors holding NaN or inf, in order."""
    import torch

    return [name for name, value in tensors.items()
            if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all())]


def check_finite(tensors: Mapping[str, Any], path: str | Path, what: str = "weights") -> None:
    """Raise when a floating-point tensor read from ``path`` holds NaN or inf.

    Raises:
        CheckpointError: names the file, the first bad tensor and how many values are bad.
    """
    import torch

    bad = nonfinite_tensors(tensors)
    if not bad:
        return
    first = tensors[bad[0]]
    count = int((~torch.isfinite(first)).sum())
    more = f" (and {len(bad) - 1} more tensor{'s' if len(bad) > 2 else ''})" if len(bad) > 1 else ""
    raise CheckpointError(f"non-finite {what}: tensor {bad[0]!r} has {count} NaN/inf of {first.numel()} values{more}; "
                          "the file is damaged or was saved from a diverged run: re-save or re-download it", path)


def load_safetensors(path: str | Path, what: str = "weights", sha256: str | None = None,
                     record: str | Path | None = None) -> dict[str, Any]:
    """Read a safetensors file, naming it when it is missing, empty, truncated or not safetensors,
    differs from its recorded SHA-256 or holds NaN/inf (:mod:`cmgnet.integrity`).

    Args:
        path: the file.
        what: what the file holds, for the message (``weights``, ``text cache``, ...).
        sha256: the hash recorded for the file (``None``: none recorded, not checked).
        record: the file ``sha256`` was recorded in (named in the message).

    Returns:
        Tensor name -> tensor (CPU).

    Raises:
        CheckpointError: the file cannot be read as safetensors, does not match ``sha256`` or
            holds a non-finite floating-point value.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} file not found", path)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        size = path.stat().st_size
        detail = "empty file" if size == 0 else f"{size} bytes, {one_line(err)}"
        raise CheckpointError(f"corrupt or truncated {what} ({detail}); re-save or re-download it", path) from err
    if sha256 is not None:
        check_sha256(path, sha256, record or "its record")
    check_finite(tensors, path, what)
    return tensors
