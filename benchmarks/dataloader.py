"""Data loading throughput: the DALI pipeline vs the PyTorch path at equal thread counts.

Reads ISIC images with the full training augmentation (a random paper variant plus flips and
colour jitter by default) at 256 px and reports images per second after a warm-up::

    python benchmarks/dataloader.py [--threads 2] [--batches 20] [--repeats 3]
                                    [--out benchmarks/results/dataloader.json]
    python benchmarks/dataloader.py --synthetic 512          # without ../shared/data

DALI runs ``--threads`` pipeline threads; PyTorch runs ``--threads`` DataLoader worker
processes. The backends' timing windows alternate (``--repeats``) and the median is
reported, so a busy machine biases neither. CPU ms per image (all threads and worker
processes) is the cost that does not depend on what else the machine runs. On a CUDA machine
``--dali-device gpu`` measures nvJPEG decoding + GPU operators.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil

from cmgnet.benchmarking import hardware, print_table, write_json
from cmgnet.data import DataConfig, build_loader, dali_available, generate_dataset
from cmgnet.errors import cli_entry

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def cpu_seconds() -> float:
    """CPU time of this process (all threads) and its live children (DataLoader workers)."""
    process = psutil.Process()
    return sum(t.user + t.system for t in (p.cpu_times() for p in [process, *process.children(recursive=True)]))


def window(stream: Iterator[dict], batches: int) -> tuple[float, float, int]:
    """Read ``batches`` batches; return wall seconds, CPU seconds and images read."""
    images, start, cpu_start = 0, time.perf_counter(), cpu_seconds()
    for _ in range(batches):
        images += next(stream)["image"].shape[0]
    return time.perf_counter() - start, cpu_seconds() - cpu_start, images


@cli_entry
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=SHARED_DATA / "isic2018-256", help="dataset folder")
    parser.add_argument("--format", default="isic2018", help="layout of --root")
    parser.add_argument("--metadata", nargs="*", default=[str(SHARED_DATA / "isic2017-metadata")], help="metadata CSVs/folders joined by image id")
    parser.add_argument("--synthetic", type=int, default=0, metavar="N", help="use N generated images instead")
    parser.add_argument("--threads", type=int, default=2, help="DALI threads = PyTorch worker processes")
    parser.add_argument("--batches", type=int, default=20, help="timed batches per window")
    parser.add_argument("--repeats", type=int, default=3, help="timed windows per backend (median reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed batches first")
    parser.add_argument("--batch-size", type=int, default=32, help="images per batch")
    parser.add_argument("--size", type=int, default=256, help="output image size")
    parser.add_argument("--augment", default="paper+strong", choices=("paper", "paper+strong", "none"), help="training augmentation")
    parser.add_argument("--backends", nargs="+", default=["dali", "torch"], choices=("dali", "torch"), help="loaders to compare")
    parser.add_argument("--dali-device", default="cpu", choices=("cpu", "gpu"), help="where DALI runs its operators")
    parser.add_argument("--out", default="benchmarks/results/dataloader.json", help="JSON results file")
    args = parser.parse_args(argv)

    backends = [b for b in args.backends if b == "torch" or dali_available()]
    with tempfile.TemporaryDirectory() as scratch:
        root, layout, metadata = args.root, args.format, [m for m in args.metadata if Path(m).is_dir()] or None
        if args.synthetic:
            root, layout, metadata = generate_dataset(scratch, args.synthetic, 0, 0, size=args.size), "isic2017", None
        elif not root.is_dir():
            print(f"no dataset at {root}: pass --root DIR (and --format) or --synthetic N")
            return 2
        streams, build_s = {}, {}
        for backend in backends:
            cfg = DataConfig(
                format=layout,
                root=str(root),
                metadata=metadata,
                image_size=args.size,
                augment=args.augment,
                loader=backend,
                num_workers=args.threads,
                dali_device=args.dali_device,
            )
            start = time.perf_counter()
            loader = build_loader(cfg, "train", args.batch_size, train=True)
            build_s[backend] = time.perf_counter() - start
            streams[backend] = itertools.chain.from_iterable(itertools.repeat(loader))  # one pass per epoch
            window(streams[backend], args.warmup)
        samples: dict[str, list[tuple[float, float, int]]] = {b: [] for b in backends}
        for _ in range(args.repeats):  # alternate, so load changes hit both backends alike
            for backend in backends:
                samples[backend].append(window(streams[backend], args.batches))

    rows = []
    for backend, runs in samples.items():
        rows.append(
            {
                "backend": f"dali-{args.dali_device}" if backend == "dali" else "torch",
                "threads": args.threads,
                "images_per_s": round(statistics.median(n / wall for wall, _, n in runs), 1),
                "cpu_ms_per_image": round(statistics.median(1000 * cpu / n for _, cpu, n in runs), 2),
                "build_s": round(build_s[backend], 2),
            }
        )
    print(f"data loading: {args.size} px, augment={args.augment}, batch {args.batch_size}, {hardware()}")
    print_table(rows, list(rows[0]))
    if "dali" in args.backends and "dali" not in backends:
        print("(nvidia-dali is not installed: only the PyTorch path was measured)")
    settings = {k: os.path.relpath(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    settings["metadata"] = [os.path.relpath(m) for m in args.metadata]
    write_json(args.out, rows, benchmark="dataloader", settings=settings, load_average=psutil.getloadavg())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
