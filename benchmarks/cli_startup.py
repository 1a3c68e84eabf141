"""How fast ``cmgnet <cmd> --help`` answers: wall time of fresh processes, per sub-command.

Every sub-command parses its arguments before importing torch, transformers, Accelerate or
MLflow, so ``--help`` should take a fraction of a second; ``import torch`` alone is timed
beside it for scale. A sub-command over ``--budget`` seconds (median) fails the run (exit 1).

    python benchmarks/cli_startup.py [--repeats 5] [--budget 1.0] [--out benchmarks/results/cli_startup.json]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

from cmgnet.benchmarking import print_table, write_json
from cmgnet.cli import COMMANDS  # light: no torch


def wall_times(argv: list[str], repeats: int) -> list[float]:
    """Seconds of ``repeats`` fresh ``python <argv>`` processes (each must exit 0)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, *argv], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="fresh processes per command (median reported)")
    parser.add_argument("--budget", type=float, default=1.0, help="seconds a --help may take (median)")
    parser.add_argument("--out", default="benchmarks/results/cli_startup.json", help="JSON results file")
    args = parser.parse_args(argv)

    commands = [["--help"], *([c, "--help"] if c != "data" else ["data", "check", "--help"] for c in COMMANDS)]
    rows = []
    for command in commands:
        times = wall_times(["-m", "cmgnet.cli", *command], args.repeats)
        rows.append({"command": " ".join(["cmgnet", *command]), "median_s": round(statistics.median(times), 3),
                     "max_s": round(max(times), 3)})
        print_table(rows[-1:], list(rows[-1]))
    torch_s = statistics.median(wall_times(["-c", "import torch"], args.repeats))
    rows.append({"command": "python -c 'import torch' (for scale)", "median_s": round(torch_s, 3), "max_s": ""})
    print()
    print_table(rows, ["command", "median_s", "max_s"])
    write_json(args.out, rows, repeats=args.repeats, budget_s=args.budget)
    slow = [r["command"] for r in rows[:-1] if r["median_s"] > args.budget]
    if slow:
        print(f"over the {args.budget} s budget: {', '.join(slow)}")
    return 1 if slow else 0


if __name__ == "__main__":
    sys.exit(main())
