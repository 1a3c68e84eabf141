"""Run a benchmark under this CPU's own kernels and under AVX2-only kernels, side by side.

ATen picks its CPU kernels once per process (``ATEN_CPU_CAPABILITY``) and oneDNN its ISA
(``ONEDNN_MAX_CPU_ISA``), so an AVX-512 machine imitates an AVX2-only CPU (most laptops,
AMD Zen 2/3) in a child process started with both set. The runs alternate (native, AVX2,
native, ...) so a busy machine slows both alike; each run writes its own JSON (the
benchmark's ``--out``) and the rows are merged into one file, each naming its capability.
What it cannot imitate: a real AVX2 CPU's caches, clocks and vector units; say so with the
numbers.

    python benchmarks/cpu_isa.py --repeats 2 --out benchmarks/results/train_step_isa.json -- \\
        benchmarks/train_throughput.py --config cpu-pretrained --precision auto --channels-last
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs per capability")
    parser.add_argument("--out", required=True, help="merged JSON results")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- BENCHMARK.py [its arguments, without --out]")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the benchmark after --")
    native_env = {k: v for k, v in os.environ.items() if k not in AVX2}
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for label, env in (("native", native_env), ("avx2", {**native_env, **AVX2})):
                out = Path(tmp) / f"{label}-{repeat}.json"
                print(f"== {label} (run {repeat + 1}/{args.repeats})", flush=True)
                subprocess.run([sys.executable, *command, "--out", str(out)], env=env, check=True)
                result = json.loads(out.read_text())
                runs.append({"kernels": label, "repeat": repeat, "hardware": result.get("hardware"),
                             "results": [{**row, "kernels": label, "repeat": repeat} for row in result["results"]]})
    rows = [row for run in runs for row in run["results"]]
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"command": command, "imitated": AVX2, "hardware": runs[0]["hardware"],
                                "results": rows}, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
