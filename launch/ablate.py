"""Ablation table: `accelerate launch launch/ablate.py --config configs/<name>.yaml [--variants ...] [key=value ...]`.

A thin wrapper over ``cmgnet.train.cli.ablate_main`` (also ``cmgnet ablate ...``); see
``python launch/ablate.py --help``.
"""

import sys

from cmgnet.train.cli import ablate_main

if __name__ == "__main__":
    sys.exit(ablate_main())
