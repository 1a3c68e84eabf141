"""``make demo``: the whole stack in a few minutes on a CPU.

1. writes the procedural dermoscopy data set (ISIC 2017 layout) under ``runs/demo-data``;
2. trains a small CMG-Net (``configs/demo.yaml``) with checkpoints, best-by-validation-Dice
   weights and MLflow tracking (SQLite store ``runs/mlflow.db``);
3. evaluates the best weights on the test split in every text regime, beside trivial
   all-background and all-foreground predictors scored with the same metrics;
4. segments the real ISIC example images shipped with the package with the shipped trained
   model (``isic-cmgnet-lite0``: no training, no network) and scores the masks;
5. prints the tables and where everything is (including the ``mlflow ui`` command).

    cmgnet demo [key=value overrides, e.g. train.epochs=4]     (or python -m cmgnet.demo)
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

N_TRAIN, N_VAL, N_TEST, SOURCE_SIZE = 320, 48, 96, 128
CONFIG = "demo"  # the shipped configs/demo.yaml, found by name (also from an installed wheel)


def trivial_baselines(data, split: str, batch_size: int) -> list:
    """All-background and all-foreground predictions scored like the model (per image, pooled).

    Args:
        data: a :class:`~cmgnet.train.data.DataModule` (single process).
        split: split to score.
        batch_size: loader batch size.

    Returns:
        Two :class:`~cmgnet.train.evaluate.EvalResult` labelled ``all-background`` and ``all-foreground``.
    """
    import torch

    from cmgnet.metrics import per_image_rows
    from cmgnet.train.evaluate import build_result

    rows: dict[str, list] = {"all-background": [], "all-foreground": []}
    for batch in data.eval_loader(split, batch_size, "none"):
        target = batch["mask"] > 0.5
        ids = list(batch["image_id"])
        rows["all-background"] += per_image_rows(torch.zeros_like(target), target, ids)
        rows["all-foreground"] += per_image_rows(torch.ones_like(target), target, ids)
    return [build_result(r, split, name, with_hd95=True) for name, r in rows.items()]


SHIPPED_MODEL = "isic-cmgnet-lite0"


def segment_examples(out: Path, model: str = SHIPPED_MODEL) -> dict[str, float] | None:
    """Run ``cmgnet predict`` with a shipped model on the shipped example images.

    Args:
        out: output folder (replaced: ``masks/``, ``overlays/``, ``predictions.csv``).
        model: shipped model name.

    Returns:
        Image id -> Dice of the predicted mask against the example's ground truth, or ``None``
        when this build ships no such model.
    """
    from cmgnet.data.imageio import decode_mask, read_encoded
    from cmgnet.deploy.cli import predict_main
    from cmgnet.shipped import EXAMPLES_DIR, list_pretrained

    if model not in list_pretrained():
        return None
    code = predict_main([model, str(EXAMPLES_DIR / "images"), "--metadata", str(EXAMPLES_DIR / "metadata.csv"),
                         "--out", str(out), "--overwrite", "--no-progress"])
    if code:
        raise RuntimeError(f"cmgnet predict {model} failed on the shipped examples (exit {code})")
    dice = {}
    for truth in sorted((EXAMPLES_DIR / "masks").glob("*.png")):
        predicted = out / "masks" / truth.name
        t = decode_mask(read_encoded(truth), truth) > 127
        p = decode_mask(read_encoded(predicted), predicted) > 127
        dice[truth.stem] = float(2 * (t & p).sum() / max(t.sum() + p.sum(), 1))
    return dice


def main(argv: list[str] | None = None) -> int:
    from cmgnet.cliargs import make_parser

    parser = make_parser("cmgnet demo", "Generate a procedural dermoscopy data set, train a small CMG-Net, evaluate "
                         "it in every text regime beside trivial predictors and log it all to MLflow: a few minutes "
                         "on a CPU. Data and runs go under ./runs.", [
        "cmgnet demo", "cmgnet demo train.epochs=4", "cmgnet demo logging.mlflow=false data.image_size=64"])
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. train.epochs=4")
    parser.add_argument("--config", default=CONFIG, metavar="NAME_OR_YAML",
                        help="experiment config, a shipped name or a YAML file")
    args = parser.parse_args(argv)
    import torch

    from cmgnet.data.synthetic import generate_dataset
    from cmgnet.errors import one_line
    from cmgnet.train import Trainer, load_config
    from cmgnet.train.cli import setup_logging
    from cmgnet.train.evaluate import format_table
    from cmgnet.train.tracking import ui_command

    setup_logging()
    log = logging.getLogger("cmgnet.demo")
    start = time.perf_counter()
    # A fresh run every time: the demo shows a whole training, not a resume.
    try:
        cfg = load_config(args.config, ["train.resume=", *args.overrides])
    except (OSError, KeyError, ValueError, TypeError) as err:
        parser.error(one_line(err))

    root = Path(cfg.data.root)
    marker = root / f".complete-{N_TRAIN}-{N_VAL}-{N_TEST}-{SOURCE_SIZE}"
    if not marker.exists():
        log.info(f"writing the procedural data set ({N_TRAIN}/{N_VAL}/{N_TEST} images, ISIC 2017 layout) to {root}")
        generate_dataset(root, N_TRAIN, N_VAL, N_TEST, size=SOURCE_SIZE, seed=0)
        marker.touch()

    trainer = Trainer(cfg)
    result = trainer.fit()
    train_s = time.perf_counter() - start
    baselines = trivial_baselines(trainer.data, cfg.eval.splits[0], trainer.evaluator.batch_size)

    rows = result.results + baselines
    shipped_out = Path(cfg.logging.output_dir) / "demo-shipped-model"
    shipped = segment_examples(shipped_out)
    print("\n" + "=" * 100)
    print(f"CMG-Net demo: {len(result.state.history)} epochs on the procedural data set, "
          f"{cfg.data.image_size}x{cfg.data.image_size} px, {train_s / 60:.1f} min in total "
          f"(training, validation and evaluation) on {torch.get_num_threads()} CPU threads")
    print("text regimes: none = neutral sentence, metadata = age/sex only, predicted = diagnosis from the "
          "image classifier, oracle = ground-truth diagnosis (the paper's setting; not available at inference)")
    print(format_table(rows))
    print(format_table(rows, "pooled"))
    dice = {r.text_regime: r.summary["per_image_mean"]["dice"] for r in rows}
    model_dice = {k: v for k, v in dice.items() if not k.startswith("all-")}
    print(f"\nDice (per-image mean): model {min(model_dice.values()):.3f}-{max(model_dice.values()):.3f} vs "
          f"all-background {dice['all-background']:.3f} and all-foreground {dice['all-foreground']:.3f}")
    if shipped is not None:
        print(f"\nshipped model {SHIPPED_MODEL} on {len(shipped)} real ISIC 2017 validation images (never trained on): "
              f"Dice " + ", ".join(f"{k} {v:.3f}" for k, v in shipped.items()))
    print("\nwhere to look:")
    print(f"  run directory      {result.run_dir}/  (config.yaml, checkpoints/)")
    print(f"  best weights       {result.best_dir}/  (save_pretrained: config.json + model.safetensors)")
    print(f"  evaluation         {result.run_dir}/eval/<split>-<regime>/  (metrics.json, per_image.csv, overlays/)")
    print(f"  re-evaluate        cmgnet evaluate --checkpoint {result.best_dir} --split test val")
    if shipped is not None:
        print(f"  shipped model      {shipped_out}/  (masks/, overlays/, predictions.csv; cmgnet models)")
    if result.tracking_uri:
        print(f"  MLflow UI          {ui_command(result.tracking_uri)}   (run {result.mlflow_run_id})")
    print("=" * 100)
    return 0


if __name__ == "__main__":
    sys.exit(main())
