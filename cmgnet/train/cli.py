"""Command lines of ``cmgnet train|evaluate|ablate`` and ``launch/{train,evaluate,ablate}.py``.

Run under ``accelerate launch`` for several processes, GPUs, nodes or DeepSpeed::

    accelerate launch launch/train.py --config configs/isic2017.yaml train.epochs=50 optim.lr=3e-4
    accelerate launch --config_file launch/accelerate/multi_gpu.yaml launch/evaluate.py \\
        --checkpoint runs/isic2017/best --split test --text-regime none metadata predicted oracle
    python launch/ablate.py --config configs/demo.yaml train.epochs=5
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from cmgnet.errors import CmgnetError, cli_entry, one_line
from cmgnet.inference import POSTPROCESS_MODES
from cmgnet.text.pseudo_text import TEXT_REGIMES


def setup_logging() -> None:
    """INFO lines without decoration on stdout; third-party chatter at WARNING."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout, force=True)
    for noisy in ("mlflow", "alembic", "urllib3", "transformers", "DeepSpeed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _finish() -> None:
    """Tear down the process group so multi-process runs exit cleanly."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _config_parser(prog: str, description: str, examples: Sequence[str]) -> argparse.ArgumentParser:
    from cmgnet.cliargs import make_parser

    parser = make_parser(prog, description, examples)
    parser.add_argument("--config", metavar="NAME_OR_YAML",
                        help="experiment config: a shipped name (demo, cpu-real, paper, isic2017, isic2018; "
                             "see `cmgnet configs`) or a YAML file")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. optim.lr=3e-4 model.masa=false")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return parser


@contextlib.contextmanager
def _usage_errors(parser: argparse.ArgumentParser) -> Iterator[None]:
    """A bad config, override or path is a usage error: one line and exit 2, no traceback."""
    try:
        yield
    except (OSError, KeyError, ValueError, TypeError) as err:  # TypeError: a mistyped config value
        parser.error(one_line(err))


def _print_config(cfg) -> int:
    import yaml

    from .config import to_dict

    print(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return 0


def run_command(cfg, print_config: bool, work) -> int:
    """``--print-config``, or ``work(cfg)`` with logging set up and the process group torn down after."""
    if print_config:
        return _print_config(cfg)
    setup_logging()
    try:
        work(cfg)
    finally:
        _finish()
    return 0


@cli_entry
def train_main(argv: Sequence[str] | None = None, prog: str = "cmgnet train") -> int:
    """``cmgnet train --config <name or YAML> [key=value ...]``."""
    parser = _config_parser(prog, "Train CMG-Net (or a baseline) from a YAML config. Under `accelerate launch` "
                            "the same command runs on several processes, GPUs, nodes or DeepSpeed.", [
        f"{prog} --config demo train.epochs=4",
        f"{prog} --config configs/isic2017.yaml data.root=/data/ISIC2017 optim.lr=3e-4",
        f"{prog} --config paper --print-config",
        "accelerate launch --config_file launch/accelerate/multi_gpu.yaml launch/train.py --config isic2017",
    ])
    args = parser.parse_args(argv)
    from .config import load_config

    with _usage_errors(parser):
        cfg = load_config(args.config, args.overrides)
    return run_command(cfg, args.print_config, _train)


def _train(cfg) -> None:
    from .engine import Trainer

    trainer = Trainer(cfg)
    result = trainer.fit()
    if result.best_dir is not None:
        trainer.log(f"best weights: {result.best_dir}")


def _find_config(checkpoint: Path) -> Path | None:
    for candidate in (checkpoint / "experiment.yaml", checkpoint / "config.yaml", checkpoint.parent / "config.yaml",
                      checkpoint / "best" / "experiment.yaml"):
        if candidate.exists():
            return candidate
    return None


def _as_served(cfg, weights: Path, args: argparse.Namespace, overridden: set[str]):
    """``cfg`` scoring the weights as they are served: size, normalisation, crop, threshold, TTA and
    post-processing from their inference record (a shipped model may have been given TTA or
    post-processing after training), unless a flag or an override sets them."""
    from cmgnet.inference import EXPERIMENT_KEYS, InferenceRecord, experiment_as_served

    record = InferenceRecord.load(weights)
    if record is not None:
        cfg = experiment_as_served(cfg, record, keep=[k for k in EXPERIMENT_KEYS.values() if k in overridden])
    flags = {key: flag for key, flag in (("tta", args.tta), ("postprocess", args.postprocess)) if flag is not None}
    return dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, **flags)) if flags else cfg


def model_section(weights: Path) -> dict:
    """``arch`` and ``model`` of an experiment, from a ``save_pretrained`` folder's ``config.json``."""
    from cmgnet.model.base import read_model_config

    arch, config = read_model_config(weights)
    return {"arch": arch, "model": config}


def _find_weights(checkpoint: Path) -> Path:
    from cmgnet.model.base import WEIGHTS_NAME

    for candidate in (checkpoint, checkpoint / "best", checkpoint / "model"):
        if (candidate / WEIGHTS_NAME).exists():
            return candidate
    raise FileNotFoundError(f"no {WEIGHTS_NAME} in {checkpoint}, {checkpoint}/best or {checkpoint}/model")


@cli_entry
def evaluate_main(argv: Sequence[str] | None = None, prog: str = "cmgnet evaluate") -> int:
    """``cmgnet evaluate --checkpoint runs/<run>/best [--split test] [--text-regime ...]``."""
    parser = _config_parser(prog, "Evaluate saved weights on any split and text regime: per-image and pooled "
                            "metrics, per-image CSV and overlays.", [
        f"{prog} --checkpoint runs/demo/best --split val test --text-regime none metadata oracle",
        f"{prog} --checkpoint runs/demo/best data.root=/data/my_isic2017 --track",
        f"{prog} --checkpoint runs/demo/best --out eval-demo/ --no-hd95",
    ])
    parser.add_argument("--checkpoint", required=True,
                        help="a save_pretrained directory (e.g. runs/<run>/best), a run directory or a checkpoint")
    parser.add_argument("--split", nargs="+", default=None, help="splits (default: the config's eval.splits)")
    parser.add_argument("--text-regime", nargs="+", choices=TEXT_REGIMES, default=None, metavar="REGIME",
                        help=f"text regimes, of {', '.join(TEXT_REGIMES)} (default: the config's eval.text_regimes)")
    from cmgnet.cliargs import add_out_argument

    add_out_argument(parser, "output folder (default: <checkpoint>/eval-<timestamp>)")
    parser.add_argument("--overwrite", action="store_true", help="replace an evaluation already in --out")
    parser.add_argument("--overlays", type=int, default=None,
                        help="overlay PNGs per split and regime (default: the config's eval.overlays)")
    parser.add_argument("--no-hd95", action="store_true", help="skip HD95 (faster)")
    parser.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                        help="flip test-time augmentation on or off (default: as the checkpoint is served, "
                             "from its inference.json like the image size, normalisation and threshold; "
                             "else the config's eval.tta)")
    parser.add_argument("--postprocess", choices=POSTPROCESS_MODES, default=None,
                        help="mask post-processing: largest connected component and/or filled holes "
                             "(default: as the checkpoint is served, from its inference.json; else the "
                             "config's eval.postprocess)")
    parser.add_argument("--track", action="store_true", help="log the results as a new MLflow run")
    args = parser.parse_args(argv)
    from .config import load_config

    from cmgnet.shipped import resolve_pretrained

    checkpoint = resolve_pretrained(args.checkpoint)
    with _usage_errors(parser):
        weights = _find_weights(checkpoint)
        config_path = args.config or _find_config(weights) or _find_config(checkpoint)
        overridden = {item.split("=", 1)[0] for item in args.overrides}
        if config_path is None and not {"data.root", "data.sources"} & overridden:
            parser.error(f"no experiment.yaml/config.yaml next to {args.checkpoint}: pass --config, or name the "
                         "data (data.root=FOLDER, with data.format= and data.protocol= where not isic2017/official)")
        # Without an experiment file the network comes from the weights' own record, the data from the command line.
        base = None if config_path else model_section(weights)
        cfg = load_config(config_path, [*args.overrides, "train.resume="], base=base)
    eval_cfg = cfg.eval
    if args.overlays is not None:
        eval_cfg = dataclasses.replace(eval_cfg, overlays=args.overlays)
    if args.no_hd95:
        eval_cfg = dataclasses.replace(eval_cfg, hd95=False)
    if "train.mixed_precision" not in overridden:
        # Serving (Segmenter, predict, the pyfunc model) computes in fp32: score the masks it gives,
        # not the training autocast's (bf16 moved a third of the ISIC test masks by a few pixels).
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, mixed_precision="no"))
    cfg = dataclasses.replace(cfg, eval=eval_cfg)
    cfg = _as_served(cfg, weights, args, overridden)
    if args.print_config:
        return _print_config(cfg)
    setup_logging()
    try:
        run_evaluation(cfg, weights, args.split or cfg.eval.splits, args.text_regime or cfg.eval.text_regimes,
                       Path(args.out) if args.out else None, track=args.track, overwrite=args.overwrite)
    finally:
        _finish()
    return 0


def run_evaluation(cfg, weights: Path, splits: Sequence[str], regimes: Sequence[str], output: Path | None,
                   track: bool = False, overwrite: bool = False) -> list:
    """Evaluate a ``save_pretrained`` directory; print the tables; write JSON/CSV/overlays.

    Args:
        cfg: the experiment config (data section and eval settings are used).
        weights: the ``save_pretrained`` directory (a ``diagnosis/`` sub-folder enables ``predicted``).
        splits: splits to evaluate.
        regimes: text regimes to evaluate.
        output: output folder (default: ``<weights>/eval-<timestamp>``).
        track: also log a new MLflow run with the metrics and files.
        overwrite: replace an evaluation already in ``output`` (else it is refused).

    Returns:
        The :class:`~cmgnet.train.evaluate.EvalResult` list.

    Raises:
        CmgnetError: ``output`` is being written by another process, or holds an evaluation
            and ``overwrite`` is false.
    """
    import time

    from cmgnet.model import SegmentationModel
    from cmgnet.outputs import lock_on_main, refuse_existing

    from .data import DataModule
    from .diagnosis import DiagnosisClassifier
    from .auxiliary import CLASSIFIER_DIR
    from .engine import apply_attention_backend, build_accelerator
    from .evaluate import Evaluator, existing_evaluation, format_table
    from .tracking import Tracker, eval_metrics, git_info, ui_command

    log = logging.getLogger("cmgnet.evaluate")
    accelerator = build_accelerator(cfg)
    if output is None:
        name = [f"eval-{time.strftime('%Y%m%d-%H%M%S')}"]
        if accelerator.num_processes > 1:  # one folder, whatever second each rank's clock reads
            from accelerate.utils import broadcast_object_list

            broadcast_object_list(name)
        output = weights / name[0]

    def replace_earlier() -> None:  # replaced, not merged: the folder then describes this evaluation only
        found = existing_evaluation(output)
        refuse_existing(output, found, overwrite, "an evaluation")
        for stale in found:
            stale.unlink()

    # Held while the results are written (not while MLflow copies them: the lock file is no result).
    with lock_on_main(accelerator, output, prepare=replace_earlier) or contextlib.nullcontext():
        apply_attention_backend(cfg)
        model = accelerator.prepare_model(SegmentationModel.from_pretrained(weights), evaluation_mode=True)
        classifier = None
        if (weights / CLASSIFIER_DIR).exists():
            classifier = accelerator.prepare_model(DiagnosisClassifier.load(weights / CLASSIFIER_DIR),
                                                   evaluation_mode=True)
        data = DataModule(cfg.data, accelerator.process_index, accelerator.num_processes, cfg.train.seed)
        data.validate(splits)  # a bad file is an error, not a silently skipped split
        evaluator = Evaluator(cfg, model, data, accelerator, classifier)
        main = accelerator.is_main_process
        results = evaluator.run(splits, regimes, output, log=log.info if main else (lambda _m: None),
                                checkpoint=str(weights))
    if main and results:
        print(format_table(results))
        print(format_table(results, "pooled"))
        print(f"\nwritten to {output}/ (summary.json; <split>-<regime>/metrics.json, per_image.csv, overlays/)")
        if track:
            from .config import flatten, to_dict

            tracker = Tracker(cfg.logging)
            tags = {**git_info(), "checkpoint": str(weights)}
            tracker.start(f"eval-{weights.parent.name}", flatten(to_dict(cfg)), tags)
            for r in results:
                tracker.log_metrics(eval_metrics(r.split, r.text_regime, r.summary), step=0)
            tracker.log_artifact(output, "eval")
            tracker.end()
            if tracker.active:
                print(f"MLflow: {ui_command(tracker.uri)}  (run {tracker.run_id})")
    return results


@cli_entry
def ablate_main(argv: Sequence[str] | None = None, prog: str = "cmgnet ablate") -> int:
    """``cmgnet ablate --config <name or YAML> [--variants full no_masa ...] [key=value ...]``."""
    from .ablate import VARIANTS, run_ablation

    parser = _config_parser(prog, "Train and evaluate the paper's ablation variants (table 3) under one recipe; "
                            "print the table and write <output_dir>/<run>-ablation/ablation.{json,md}.", [
        f"{prog} --config demo",
        f"{prog} --config isic2017 --variants full no_masa --text-regime metadata",
    ])
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=None,
                        help="variants to run (default: all, in the paper's order)")
    parser.add_argument("--split", default=None, help="split of the table (default: first of eval.splits)")
    parser.add_argument("--text-regime", choices=TEXT_REGIMES, default=None, metavar="REGIME",
                        help="text regime of the table (default: data.text_regime_eval)")
    args = parser.parse_args(argv)
    from .config import load_config

    with _usage_errors(parser):
        cfg = load_config(args.config, args.overrides)
    return run_command(cfg, args.print_config, lambda c: run_ablation(c, args.variants, args.split, args.text_regime))


@cli_entry
def compare_evals_main(argv: Sequence[str] | None = None, prog: str = "cmgnet compare-evals") -> int:
    """``cmgnet compare-evals A B [--metric dice ...] [--json FILE]``: paired difference A - B."""
    import json

    from cmgnet.cliargs import make_parser

    parser = make_parser(prog, "Paired comparison of two evaluations of the same images: the mean per-image "
                         "difference A - B of each metric and its 95% percentile-bootstrap interval (images "
                         "resampled together, 2000 resamples, seed 0).", [
        f"{prog} runs/x/eval/test-metadata runs/x/eval/test-shuffled",
        f"{prog} eval-a/test-none/per_image.csv eval-b/test-none/per_image.csv --metric dice thresholded_jaccard",
    ])
    parser.add_argument("a", help="evaluation A: a <split>-<regime>/ folder of `cmgnet evaluate` or its per_image.csv")
    parser.add_argument("b", help="evaluation B, of the same images")
    parser.add_argument("--metric", nargs="+", default=None, metavar="NAME",
                        help="metrics to compare (default: every per-image metric both files have)")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the comparison to this JSON file")
    args = parser.parse_args(argv)
    from cmgnet.metrics import METRICS
    from cmgnet.stats import BOOTSTRAP, format_paired, paired_differences

    from cmgnet.outputs import atomic_write_text
    from .evaluate import read_per_image

    path_a, rows_a = read_per_image(args.a)
    path_b, rows_b = read_per_image(args.b)
    metrics = args.metric or [m for m in METRICS if m in rows_a[0] and m in rows_b[0]]
    if missing := [m for m in metrics if m not in rows_a[0] or m not in rows_b[0]]:
        raise CmgnetError(f"no column {missing[0]!r} in both files", path_a if missing[0] not in rows_a[0] else path_b)
    try:
        result = paired_differences(rows_a, rows_b, metrics)
    except ValueError as err:
        raise CmgnetError(f"{err}; compare evaluations of the same split", path_b) from err
    label = "A - B"
    print(f"A: {path_a}\nB: {path_b}")
    print(format_paired({label: result}, percent=[m for m in metrics if m != "hd95"]))
    if args.json:
        report = {"a": str(path_a), "b": str(path_b), "bootstrap": BOOTSTRAP, "paired": result}
        atomic_write_text(Path(args.json), json.dumps(report, indent=2, allow_nan=True) + "\n")
        print(f"written to {args.json}")
    return 0
