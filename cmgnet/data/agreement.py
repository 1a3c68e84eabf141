"""Keep the training masks a reference model agrees with: a split CSV for `protocol: split-csv`.

Masks made another way than the target's (HAM10000's were drawn by a network, corrected and
reduced to 200 x 150) can teach a different outline. This tool scores them against a model
trained on the target data and writes a split file that keeps a training image only where the
model's mask and the dataset's agree (per-image Dice >= ``--min-dice``); validation and test
images all stay, so scores remain comparable with the unfiltered split::

    cmgnet evaluate --checkpoint isic-cmgnet-lite0 data.format=ham10000 \\
        data.root=../shared/data/ham10000-200 data.protocol=grouped "data.split_fractions=[0.9, 0.05, 0.05]" \\
        --split train --text-regime none --no-tta --postprocess none --no-hd95 --overlays 0 --out agree/
    python launch/agreement_split.py --format ham10000 --root ../shared/data/ham10000-200 \\
        --fractions 0.9 0.05 0.05 --per-image agree/train-none/per_image.csv --min-dice 0.85 \\
        --out configs/splits/ham10000_200_agree85.csv
"""

from __future__ import annotations

import argparse
import csv
import io
from collections.abc import Mapping
from pathlib import Path

from cmgnet.errors import cli_entry
from cmgnet.outputs import atomic_write_text

from .config import DataConfig
from .sources import read_sources


def agreement_rows(data: DataConfig, scores: Mapping[str, float], min_dice: float) -> tuple[list[tuple[str, str]], int]:
    """``(image_id, split)`` rows: the training images scoring ``>= min_dice``, every validation and test image.

    Args:
        data: one dataset whose splits the rows follow (e.g. ``protocol="grouped"``).
        scores: per-image Dice of the reference model on the training split.
        min_dice: the agreement a training image needs.

    Returns:
        The rows and the number of training images before filtering.

    Raises:
        ValueError: a training image without a score (another split was evaluated).
    """
    (source,) = read_sources(data)
    train = [s.record.image_id for s in source.split("train", data.seed)]
    if missing := [i for i in train if i not in scores]:
        raise ValueError(f"no score for {len(missing)} training images (e.g. {missing[0]}); "
                         "evaluate the training split of the same split")
    rows = [(i, "train") for i in train if scores[i] >= min_dice]
    for split in ("val", "test"):
        rows += [(s.record.image_id, split) for s in source.split(split, data.seed, allow_empty=True)]
    return rows, len(train)


@cli_entry
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python launch/agreement_split.py", description=__doc__.splitlines()[0])
    parser.add_argument("--format", required=True, help="dataset format (as data.format)")
    parser.add_argument("--root", required=True, help="dataset folder")
    parser.add_argument("--fractions", type=float, nargs=3, default=(0.9, 0.05, 0.05),
                        help="train, val and test shares of the grouped split (as data.split_fractions)")
    parser.add_argument("--seed", type=int, default=0, help="split seed (data.seed)")
    parser.add_argument("--per-image", required=True, type=Path,
                        help="per_image.csv of `cmgnet evaluate` on the training split (columns image_id, dice)")
    parser.add_argument("--min-dice", type=float, required=True, help="keep training images scoring at least this")
    parser.add_argument("--out", required=True, type=Path, help="split CSV to write (image_id, split)")
    args = parser.parse_args(argv)

    data = DataConfig(format=args.format, root=args.root, protocol="grouped", split_fractions=tuple(args.fractions),
                      seed=args.seed)
    with args.per_image.open(newline="") as handle:
        scores = {row["image_id"]: float(row["dice"]) for row in csv.DictReader(handle)}
    try:
        rows, total = agreement_rows(data, scores, args.min_dice)
    except ValueError as err:
        raise SystemExit(f"{args.per_image}: {err}") from None
    args.out.parent.mkdir(parents=True, exist_ok=True)
    text = io.StringIO()
    csv.writer(text).writerows([("image_id", "split"), *rows])
    atomic_write_text(args.out, text.getvalue())
    kept = sum(split == "train" for _, split in rows)
    print(f"{args.out}: kept {kept} of {total} training images (Dice >= {args.min_dice}) "
          f"and every validation and test image ({len(rows) - kept})")
    return 0
