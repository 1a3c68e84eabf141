"""``cmgnet data check <dir>``: validate a dataset and print what it holds.

Besides every image and mask, it reports mask files that belong to no image (a renamed or
deleted image) and, with ``--split-csv``, ids in the split file that are not in the dataset.
"""

from __future__ import annotations

import argparse
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from cmgnet.errors import cli_entry
from cmgnet.tables import render

from .csvfiles import find_column, read_csv
from .errors import DataError
from .imageio import DEFAULT_MAX_PIXELS
from .metadata import ID_COLUMNS
from .readers import FORMATS, detect_format, read_dataset
from .records import LesionRecord
from .validate import LEVELS, ValidationReport, orphan_masks, validate_records

_NONE = "(none)"


def _parser() -> argparse.ArgumentParser:
    from cmgnet.cliargs import make_parser

    parser = make_parser("cmgnet data check", "Validate every image, mask and metadata row of a dataset and print "
                         "counts per split and diagnosis; exit code 1 lists every problem.", [
        "cmgnet data check data/ISIC2017",
        "cmgnet data check ../shared/data/isic2018-256 --metadata ../shared/data/isic2017-metadata",
        "cmgnet data check my_folder --format folder --level header",
    ])
    parser.add_argument("root", help="dataset folder")
    parser.add_argument("--format", default="auto", choices=("auto", *FORMATS), help="layout (default: detect)")
    parser.add_argument(
        "--metadata", action="append", default=None, metavar="PATH", help="extra metadata CSV or folder (repeatable)"
    )
    parser.add_argument("--level", default="full", choices=LEVELS, help="header: sizes only; full: decode every file")
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="largest image accepted")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="decoding threads")
    parser.add_argument("--split-csv", metavar="CSV", help="also check a split file (image_id, split) against the data")
    return parser


def unknown_split_ids(path: str | Path, records: Sequence[LesionRecord]) -> list[DataError]:
    """Rows of a split CSV whose image id is not in the dataset (one error per row).

    Raises:
        DataError: the file cannot be read or lacks an id column.
    """
    columns, rows = read_csv(Path(path))
    id_column = find_column(columns, ID_COLUMNS)
    if id_column is None:
        raise DataError(f"split CSV needs an image_id column; found {columns}", path, 1)
    known = {r.image_id for r in records}
    return [DataError(f"image id {row[id_column].strip()!r} is not in the dataset", path, line)
            for line, row in rows if row[id_column].strip() not in known]




def summarize(records: Sequence[LesionRecord], report: ValidationReport) -> str:
    """The printed summary: counts per split and diagnosis, image sizes, missing metadata.

    Args:
        records: the dataset's records.
        report: their validation report (for sizes and files decoded through a conversion).

    Returns:
        Multi-line text.
    """
    splits = sorted({r.split or _NONE for r in records}, key=lambda s: ("train", "val", "test", _NONE).index(s))
    diagnoses = sorted({r.diagnosis or _NONE for r in records}, key=lambda d: (d == _NONE, d))
    counts = Counter((r.split or _NONE, r.diagnosis or _NONE) for r in records)
    rows = [["split", "images", *diagnoses]]
    for split in splits:
        rows.append([split, str(sum(counts[split, d] for d in diagnoses)), *(str(counts[split, d]) for d in diagnoses)])
    rows.append(["all", str(len(records)), *(str(sum(counts[s, d] for s in splits)) for d in diagnoses)])
    sizes = Counter(report.sizes.values())
    shown = ", ".join(f"{w}x{h} ({n})" for (w, h), n in sizes.most_common(5))
    if len(sizes) > 5:
        shown += f", ... {len(sizes)} distinct sizes"
    missing = {
        name: sum(getattr(r, name) is None for r in records)
        for name in ("mask_path", "diagnosis", "age", "sex", "site")
    }
    lines = [
        render(rows[0], rows[1:]),
        "",
        f"image sizes: {shown or 'n/a'}",
        f"masks: {len(records) - missing.pop('mask_path')} of {len(records)}",
        "missing metadata: " + ", ".join(f"{name} {count}" for name, count in missing.items()),
        f"free-text descriptions: {sum(r.description is not None for r in records)}",
    ]
    if report.converted:  # decoded correctly, but worth knowing: e.g. a phone photo's EXIF rotation
        examples = "; ".join(f"{key} ({why})" for key, why in list(report.converted.items())[:3])
        more = f"; ... {len(report.converted) - 3} more" if len(report.converted) > 3 else ""
        lines.append(f"converted when decoded (EXIF orientation, 16-bit, palette, alpha, ...): "
                     f"{len(report.converted)}: {examples}{more}")
    return "\n".join(lines)


@cli_entry
def main(argv: Sequence[str] | None = None) -> int:
    """Run the check.

    Args:
        argv: command-line arguments after ``cmgnet data check`` (default ``sys.argv[1:]``).

    Returns:
        0 when the dataset is valid, 1 when it has problems (all are printed).
    """
    args = _parser().parse_args(argv)
    try:
        layout = detect_format(args.root) if args.format == "auto" else args.format
        records = read_dataset(layout, args.root, metadata=args.metadata)
    except DataError as error:
        print(f"error: {error}")
        return 1
    report = validate_records(
        records, level=args.level, max_pixels=args.max_pixels, require_masks=False, workers=args.workers
    )
    report.errors += orphan_masks(records)
    if args.split_csv:
        report.errors += unknown_split_ids(args.split_csv, records)
    print(f"dataset: {args.root} (format {layout}, {len(records)} images, {args.level} check)\n")
    print(summarize(records, report))
    if report.errors:
        print(f"\n{len(report.errors)} problem(s):")
        for error in report.errors:
            print(f"  {error}")
        return 1
    print("\nOK")
    return 0
