"""``cmgnet`` command line: one entry point, a sub-command per job.

    cmgnet data check <dir>      validate a dataset and print a summary
    cmgnet train --config ...    train (prefer ``accelerate launch launch/train.py`` for multi-GPU)
    cmgnet evaluate ...          metrics on any split and text regime
    cmgnet ablate ...            the paper's ablation table
    cmgnet export ...            checkpoint -> ONNX (-> TensorRT engine)
    cmgnet predict ...           images -> mask PNGs, overlays and a statistics CSV
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "data": ("cmgnet.data.check", "main"),
    "train": ("cmgnet.train.cli", "train_main"),
    "evaluate": ("cmgnet.train.cli", "evaluate_main"),
    "ablate": ("cmgnet.train.cli", "ablate_main"),
    "export": ("cmgnet.deploy.export", "main"),
    "predict": ("cmgnet.deploy.predict", "main"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__)
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    module, func = COMMANDS[argv[0]]
    if argv[0] == "data":  # `cmgnet data check <dir>`: the only data sub-command so far
        if argv[1:2] != ["check"]:
            print("usage: cmgnet data check <dir> [options]")
            return 2
        argv = argv[1:]
    return getattr(importlib.import_module(module), func)(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
