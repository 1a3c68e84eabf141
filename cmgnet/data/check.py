"""``cmgnet data check <dir>``: validate a dataset and print what it holds."""

from __future__ import annotations

import argparse
import os
from collections import Counter
from collections.abc import Sequence

from .errors import DataError
from .imageio import DEFAULT_MAX_PIXELS
from .readers import FORMATS, detect_format, read_dataset
from .records import LesionRecord
from .validate import LEVELS, ValidationReport, validate_records

_NONE = "(none)"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cmgnet data check", description=__doc__)
    parser.add_argument("root", help="dataset folder")
    parser.add_argument("--format", default="auto", choices=("auto", *FORMATS), help="layout (default: detect)")
    parser.add_argument(
        "--metadata", action="append", default=None, metavar="PATH", help="extra metadata CSV or folder (repeatable)"
    )
    parser.add_argument("--level", default="full", choices=LEVELS, help="header: sizes only; full: decode every file")
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="largest image accepted")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="decoding threads")
    return parser


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=True)))
        for row in rows
    )


def summarize(records: Sequence[LesionRecord], report: ValidationReport) -> str:
    """The printed summary: counts per split and diagnosis, image sizes, missing metadata.

    Args:
        records: the dataset's records.
        report: their validation report (for sizes).

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
        _table(rows),
        "",
        f"image sizes: {shown or 'n/a'}",
        f"masks: {len(records) - missing.pop('mask_path')} of {len(records)}",
        "missing metadata: " + ", ".join(f"{name} {count}" for name, count in missing.items()),
        f"free-text descriptions: {sum(r.description is not None for r in records)}",
    ]
    return "\n".join(lines)


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
    print(f"dataset: {args.root} (format {layout}, {len(records)} images, {args.level} check)\n")
    print(summarize(records, report))
    if report.errors:
        print(f"\n{len(report.errors)} problem(s):")
        for error in report.errors:
            print(f"  {error}")
        return 1
    print("\nOK")
    return 0
