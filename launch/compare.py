"""Comparison table: `accelerate launch launch/compare.py --config configs/<name>.yaml [--models ...] [--budget-minutes M] [key=value ...]`.

A thin wrapper over ``cmgnet.train.compare.compare_main`` (also ``cmgnet compare ...``); see
``python launch/compare.py --help``.
"""

import sys

from cmgnet.train.compare import compare_main

if __name__ == "__main__":
    sys.exit(compare_main(prog="launch/compare.py"))
