"""Which samples form a split: the official split, a user split CSV, a grouped random split, or
the paper's protocols.

The paper (section 4.1) expands every image into 24 variants (8 rotations x {plain, blur,
RGB shift}) and splits the *variants* 8:1:1 at random, so rotated copies of a test image sit
in the training set. ``paper`` reproduces that leak; ``paper-grouped`` does the same
expansion but splits by source image (by lesion where ``lesion_id`` is known), so no source
crosses splits. Report both.

``grouped`` is a plain random split by lesion (by image where no ``lesion_id`` is known), in
given fractions and without the 24 variants: the split of a dataset with no official one, such
as HAM10000, whose 10015 images show 7470 lesions.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .augment.params import NUM_VARIANTS
from .csvfiles import find_column, read_csv
from .errors import DataError
from .fields import SPLITS, parse_split
from .metadata import ID_COLUMNS
from .records import LesionRecord, Sample

PROTOCOLS: tuple[str, ...] = ("official", "split-csv", "grouped", "paper", "paper-grouped")
PAPER_FRACTIONS = (0.8, 0.1, 0.1)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")


def _fraction_bounds(n: int, fractions: Sequence[float] = PAPER_FRACTIONS) -> list[int]:
    """Cut points of ``n`` items into train:val:test fractions (rounded; test takes the remainder)."""
    n_train = round(n * fractions[0])
    n_val = round(n * fractions[1])
    return [0, n_train, n_train + n_val, n]


def _chosen_groups(records: Sequence[LesionRecord], split: str, seed: int,
                   fractions: Sequence[float] = PAPER_FRACTIONS) -> set[str]:
    """The groups (lesions, else images) a seeded random split puts in ``split``."""
    groups = sorted({r.group for r in records})
    order = np.random.default_rng(seed).permutation(len(groups))
    bounds = _fraction_bounds(len(groups), fractions)
    part = SPLITS.index(split)
    return {groups[i] for i in order[bounds[part] : bounds[part + 1]]}


def grouped_split(records: Sequence[LesionRecord], split: str, seed: int,
                  fractions: Sequence[float] = PAPER_FRACTIONS) -> list[Sample]:
    """A random split by lesion: no lesion has images in two splits.

    Args:
        records: every image of the dataset.
        split: ``"train"``, ``"val"`` or ``"test"``.
        seed: seed of the split (the same seed and records give the same three splits).
        fractions: train, val and test shares of the lesions.

    Returns:
        The split's samples in dataset order.
    """
    _check_split(split)
    chosen = _chosen_groups(records, split, seed, fractions)
    return [Sample(r) for r in records if r.group in chosen]


def paper_split(records: Sequence[LesionRecord], split: str, seed: int, *, grouped: bool) -> list[Sample]:
    """The paper's protocol: 24 variants per image, then a random 8:1:1 split.

    Args:
        records: every image of the dataset (official splits are pooled, as in the paper).
        split: ``"train"``, ``"val"`` or ``"test"``.
        seed: seed of the random split (the same seed gives the same three splits).
        grouped: split by source (``record.group``) instead of by variant.

    Returns:
        The split's samples, each pinned to one variant, in a seed-determined order.
    """
    _check_split(split)
    if grouped:
        chosen = _chosen_groups(records, split, seed)
        return [Sample(r, v) for r in records if r.group in chosen for v in range(NUM_VARIANTS)]
    part = SPLITS.index(split)
    order = np.random.default_rng(seed).permutation(len(records) * NUM_VARIANTS)
    bounds = _fraction_bounds(order.size)
    picked = np.sort(order[bounds[part] : bounds[part + 1]])
    return [Sample(records[i // NUM_VARIANTS], int(i % NUM_VARIANTS)) for i in picked]


def read_split_csv(path: str | Path, records: Sequence[LesionRecord]) -> dict[str, str]:
    """Read a user split file: columns ``image_id`` and ``split`` (train/val/test).

    Images absent from the file belong to no split (a file may select a subset).

    Returns:
        ``{image_id: split}``.

    Raises:
        DataError: missing columns, a bad split value, a duplicate id, or an id that is not
            in the dataset.
    """
    path = Path(path)
    columns, rows = read_csv(path)
    id_column = find_column(columns, ID_COLUMNS)
    if id_column is None or "split" not in columns:
        raise DataError(f"split CSV needs columns image_id and split; found {columns}", path, 1)
    known = {r.image_id for r in records}
    splits: dict[str, str] = {}
    lines: dict[str, int] = {}
    for line, row in rows:
        image_id = row[id_column].strip()
        if image_id in lines:
            raise DataError(f"duplicate image id {image_id!r} (first on row {lines[image_id]})", path, line)
        if image_id not in known:
            raise DataError(f"image id {image_id!r} is not in the dataset", path, line)
        try:
            value = parse_split(row["split"])
        except ValueError as error:
            raise DataError(str(error), path, line) from None
        if value is None:
            raise DataError(f"empty split for {image_id!r}", path, line)
        splits[image_id], lines[image_id] = value, line
    return splits


def resolve_split(
    records: Sequence[LesionRecord],
    split: str,
    protocol: str = "official",
    *,
    seed: int = 0,
    split_csv: str | Path | None = None,
    fractions: Sequence[float] = PAPER_FRACTIONS,
    allow_empty: bool = False,
) -> list[Sample]:
    """The samples of one split under a protocol.

    Args:
        records: the dataset's records (from a reader).
        split: ``"train"``, ``"val"`` or ``"test"``.
        protocol: one of :data:`PROTOCOLS`.
        seed: seed of the ``grouped``/``paper``/``paper-grouped`` random split.
        split_csv: the split file of ``protocol="split-csv"``.
        fractions: train, val and test shares of ``protocol="grouped"``.
        allow_empty: return ``[]`` for an empty split (one source of several may lack it).

    Returns:
        The samples (``variant=None`` except under the paper protocols), in dataset order.

    Raises:
        ValueError: unknown protocol or split, or ``split-csv`` without a file.
        DataError: the split is empty, with a hint when the dataset has no such split.
    """
    _check_split(split)
    if protocol == "official":
        samples = [Sample(r) for r in records if r.split == split]
        present = sorted({r.split or "none" for r in records})
        hint = f"the dataset's splits are: {', '.join(present)}; use protocol split-csv or paper-grouped"
    elif protocol == "split-csv":
        if split_csv is None:
            raise ValueError("protocol 'split-csv' needs split_csv (a CSV with image_id, split)")
        assignment = read_split_csv(split_csv, records)
        samples = [Sample(r) for r in records if assignment.get(r.image_id) == split]
        hint = f"{split_csv} assigns no image to it"
    elif protocol == "grouped":
        samples = grouped_split(records, split, seed, fractions)
        hint = f"the dataset is too small for a {':'.join(f'{f:g}' for f in fractions)} split by lesion"
    elif protocol in ("paper", "paper-grouped"):
        samples = paper_split(records, split, seed, grouped=protocol == "paper-grouped")
        hint = "the dataset is too small for an 8:1:1 split"
    else:
        raise ValueError(f"unknown protocol {protocol!r}; expected one of {', '.join(PROTOCOLS)}")
    if not samples and not allow_empty:
        raise DataError(f"split {split!r} is empty under protocol {protocol!r}: {hint}")
    return samples
