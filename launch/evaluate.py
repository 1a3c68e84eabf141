"""Evaluate: `accelerate launch launch/evaluate.py --checkpoint runs/<run>/best [--split test] [--text-regime none metadata predicted oracle]`.

A thin wrapper over ``cmgnet.train.cli.evaluate_main`` (also ``cmgnet evaluate ...``); see
``python launch/evaluate.py --help``.
"""

import sys

from cmgnet.train.cli import evaluate_main

if __name__ == "__main__":
    sys.exit(evaluate_main())
