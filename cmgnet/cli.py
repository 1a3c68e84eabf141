"""``cmgnet`` command line: one entry point, a sub-command per job.

Each sub-command parses its arguments before importing anything heavy (torch,
transformers, Accelerate, MLflow), so ``cmgnet <cmd> --help`` answers at once;
``benchmarks/cli_startup.py`` measures it.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

from . import __version__
from .cliargs import examples_epilog

# name -> (one-line summary, module, function); the function takes the arguments after the name.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "data": ("validate a dataset and print a summary (cmgnet data check DIR)", "cmgnet.cli", "data_main"),
    "train": ("train from a YAML config (accelerate launch launch/train.py for many GPUs)", "cmgnet.train.cli",
              "train_main"),
    "evaluate": ("metrics of saved weights on any split and text regime", "cmgnet.train.cli", "evaluate_main"),
    "ablate": ("train and evaluate the paper's ablation table", "cmgnet.train.cli", "ablate_main"),
    "compare": ("train and evaluate the baselines and CMG-Net under one recipe (paper tables 1-2)",
                "cmgnet.train.compare", "compare_main"),
    "compare-evals": ("paired difference of two evaluations of the same images, with its bootstrap 95% CI",
                      "cmgnet.train.cli", "compare_evals_main"),
    "export": ("checkpoint -> ONNX bundle (+ int8, TensorRT engine)", "cmgnet.deploy.cli", "export_main"),
    "predict": ("images -> mask PNGs, overlays and a statistics CSV", "cmgnet.deploy.cli", "predict_main"),
    "serve": ("serve a model with NVIDIA Triton Inference Server (HTTP, gRPC, dynamic batching)", "cmgnet.deploy.cli",
              "serve_main"),
    "infer-remote": ("images -> masks through a running server (tritonclient, HTTP or gRPC)", "cmgnet.deploy.cli",
                     "infer_remote_main"),
    "configs": ("list the shipped experiment and Accelerate configs (cmgnet configs NAME: its path)",
                "cmgnet.shipped", "configs_main"),
    "models": ("list the shipped trained models (cmgnet models NAME: its model card)", "cmgnet.shipped",
               "models_main"),
    "demo": ("generate a synthetic data set, train, evaluate and track, on a CPU", "cmgnet.demo", "main"),
}
DATA_COMMANDS: dict[str, tuple[str, str, str]] = {
    "check": ("validate every file of a dataset; exit 1 lists the problems", "cmgnet.data.check", "main"),
}
EXAMPLES = (
    "cmgnet demo",
    "cmgnet data check data/ISIC2017",
    "cmgnet train --config demo train.epochs=4",
    "cmgnet evaluate --checkpoint runs/demo/best --split val test",
    "cmgnet export runs/demo/best --out exported/",
    "cmgnet predict exported/ images/ --out predictions/",
    "cmgnet predict isic-cmgnet-lite0 images/ --out masks/",
    "cmgnet serve isic-cmgnet-lite0",
    "cmgnet <command> --help",
)


def _help(prog: str, commands: dict[str, tuple[str, str, str]], examples: Sequence[str]) -> str:
    width = max(map(len, commands))
    lines = [f"usage: {prog} <command> [options]", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {summary}" for name, (summary, _, _) in commands.items()]
    return "\n".join([*lines, "", examples_epilog(examples)])


def _dispatch(prog: str, commands: dict[str, tuple[str, str, str]], examples: Sequence[str],
              argv: Sequence[str]) -> int:
    """Run ``commands[argv[0]]`` with the rest of ``argv``; help on ``-h``, one line on a wrong name."""
    if argv and argv[0] in ("-h", "--help"):
        print(_help(prog, commands, examples))
        return 0
    if not argv:
        print(_help(prog, commands, examples), file=sys.stderr)
        return 2
    if argv[0] not in commands:
        print(f"{prog}: unknown command {argv[0]!r} (choose from {', '.join(commands)}; see {prog} --help)",
              file=sys.stderr)
        return 2
    _, module, function = commands[argv[0]]
    return getattr(importlib.import_module(module), function)(list(argv[1:])) or 0


def data_main(argv: Sequence[str] | None = None) -> int:
    """``cmgnet data <sub-command>`` (``check`` so far)."""
    argv = sys.argv[1:] if argv is None else argv
    return _dispatch("cmgnet data", DATA_COMMANDS, ("cmgnet data check data/ISIC2017 --level header",), argv)


def main(argv: Sequence[str] | None = None) -> int:
    """``cmgnet <command> ...``; returns the exit code (2: usage error)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--version"]:
        print(f"cmgnet {__version__}")
        return 0
    return _dispatch("cmgnet", COMMANDS, EXAMPLES, argv)


if __name__ == "__main__":
    sys.exit(main())
