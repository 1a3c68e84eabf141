"""``cmgnet predict`` wall time per image, ONNX Runtime (the CPU default) against PyTorch, side by side.

    python benchmarks/predict_speed.py [--model isic-cmgnet-lite0] [--images DIR] [--count 64]
                                       [--repeats 3] [--out benchmarks/results/predict_speed.json]

Runs the real command, ``cmgnet predict MODEL LIST --backend onnxruntime|torch`` (overlays
included unless ``--no-overlays``), as fresh
processes on the same ``--count`` images (default: the first 64 of ``../shared/data/isic2018-256``),
alternating the two backends (and their order) on every repeat, so that load from other
processes on a shared machine falls on both. Per backend and repeat it times the whole command
on all images and on one image: the per-image wall time is ``total / count`` and the marginal
per-image time ``(total - one) / (count - 1)`` (without start-up and model load). Medians over
the repeats are reported, with the ratio ONNX Runtime / PyTorch of each and the median of the
per-repeat ratios of the two adjacent whole-command runs, the load average
around every run, and the per-image Dice of the two backends' masks (the ONNX export is cached
before timing starts: :mod:`cmgnet.deploy.cache`).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from cmgnet.benchmarking import print_table, write_json

REPO = Path(__file__).resolve().parents[1]
DEFAULT_IMAGES = REPO.parent / "shared" / "data" / "isic2018-256" / "ISIC2018_Task1-2_Training_Input"
BACKENDS = ("onnxruntime", "torch")


def run_predict(model: str, listing: Path, out: Path, backend: str, threads: int | None, overlays: bool) -> dict:
    """One ``cmgnet predict`` process; its wall time and the load average around it."""
    argv = [sys.executable, "-m", "cmgnet.cli", "predict", model, str(listing), "--out", str(out), "--backend",
            backend, "--overwrite", "--no-progress"]
    if threads:
        argv += ["--threads", str(threads)]
    if not overlays:
        argv.append("--no-overlays")
    load = os.getloadavg()[0]
    start = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"error: {' '.join(argv[2:])} failed (exit {done.returncode}): {done.stderr.strip()[-400:]}")
    return {"seconds": seconds, "load_before": load, "load_after": os.getloadavg()[0]}


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum() + b.sum())
    return 1.0 if total == 0 else 2 * int((a & b).sum()) / total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="isic-cmgnet-lite0", help="shipped model name or checkpoint folder")
    parser.add_argument("--images", default=str(DEFAULT_IMAGES), help="folder of images")
    parser.add_argument("--count", type=int, default=64, help="images per run")
    parser.add_argument("--repeats", type=int, default=3, help="alternating repeats per backend (medians reported)")
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads (default: one per physical core)")
    parser.add_argument("--no-overlays", action="store_true", help="masks and CSV only (default: the full command)")
    parser.add_argument("--out", default="benchmarks/results/predict_speed.json", help="JSON results file")
    args = parser.parse_args(argv)

    folder = Path(args.images)
    if not folder.is_dir():
        raise SystemExit(f"error: {folder}: no such folder of images (pass --images)")
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[: args.count]
    if len(images) < 2:
        raise SystemExit(f"error: {folder}: needs at least 2 images, found {len(images)}")
    runs: dict[str, dict[str, list[dict]]] = {b: {"all": [], "one": []} for b in BACKENDS}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        listing, single = tmp / "images.txt", tmp / "one.txt"
        listing.write_text("".join(f"{p}\n" for p in images))
        single.write_text(f"{images[0]}\n")
        overlays = not args.no_overlays
        warm = run_predict(args.model, single, tmp / "warm", "onnxruntime", args.threads, overlays)  # exports if cold
        print(f"ONNX Runtime cache ready ({warm['seconds']:.1f} s, export included if it was cold)", flush=True)
        for repeat in range(args.repeats):
            order = BACKENDS if repeat % 2 == 0 else tuple(reversed(BACKENDS))
            for backend in order:
                for kind, names in (("all", listing), ("one", single)):
                    run = run_predict(args.model, names, tmp / f"{backend}-{kind}", backend, args.threads, overlays)
                    runs[backend][kind].append(run)
                    print(f"repeat {repeat} {backend} {kind}: {run['seconds']:.2f} s "
                          f"(load {run['load_before']:.2f} -> {run['load_after']:.2f})", flush=True)
        scores = []
        for path in images:
            masks = [np.array(Image.open(tmp / f"{b}-all" / "masks" / f"{path.stem}.png")) > 0 for b in BACKENDS]
            scores.append(dice(*masks))

    count = len(images)
    rows = []
    for backend in BACKENDS:
        total = statistics.median(r["seconds"] for r in runs[backend]["all"])
        one = statistics.median(r["seconds"] for r in runs[backend]["one"])
        rows.append({"backend": backend, "images": count, "command_s": round(total, 2), "one_image_s": round(one, 2),
                     "per_image_ms": round(1000 * total / count, 1),
                     "marginal_per_image_ms": round(1000 * (total - one) / (count - 1), 1)})
    ort, eager = rows
    for key in ("per_image_ms", "marginal_per_image_ms"):
        ort[f"{key}_vs_torch"] = round(ort[key] / eager[key], 3)
    # Each repeat's two runs were adjacent in time: their ratio sees (nearly) the same load.
    pairs = [round(o["seconds"] / t["seconds"], 3) for o, t in zip(runs["onnxruntime"]["all"], runs["torch"]["all"])]
    ort["paired_ratio_median"] = statistics.median(pairs)
    print()
    print_table(rows, ["backend", "images", "command_s", "one_image_s", "per_image_ms", "marginal_per_image_ms",
                       "per_image_ms_vs_torch", "marginal_per_image_ms_vs_torch", "paired_ratio_median"])
    print(f"ONNX Runtime / PyTorch, whole command, per repeat: {pairs}")
    agreement = {"min_dice": round(min(scores), 5), "mean_dice": round(float(np.mean(scores)), 5),
                 "identical_masks": sum(s == 1.0 for s in scores), "images": count}
    print(f"masks, ONNX Runtime vs PyTorch: {agreement}")
    loads = [r["load_before"] for b in runs.values() for k in b.values() for r in k]
    # The project's data folder is recorded as the repository sees it, not as this machine's path.
    shown = os.path.relpath(folder, REPO) if folder.resolve().is_relative_to(REPO.parent.resolve()) else str(folder)
    write_json(args.out, rows, model=args.model, images=shown, repeats=args.repeats, threads=args.threads,
               overlays=overlays, paired_ratios=pairs,
               agreement=agreement, load_avg_range=[min(loads), max(loads)], runs=runs, cpu_count=os.cpu_count(),
               onnxruntime=_version("onnxruntime"))
    return 0


def _version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


if __name__ == "__main__":
    sys.exit(main())
