"""Train: `accelerate launch launch/train.py --config configs/<name>.yaml [key=value ...]`.

A thin wrapper over ``cmgnet.train.cli.train_main`` (also ``cmgnet train ...``); see
``python launch/train.py --help``.
"""

import sys

from cmgnet.train.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main())
