"""Small experiments for tests, smoke runs and benchmarks (seconds on a CPU).

    root = synthetic_dataset(tmp_path / "data")
    cfg = tiny_experiment(root, tmp_path / "runs", "train.epochs=2")
    Trainer(cfg).fit()
"""

from __future__ import annotations

from pathlib import Path

from .config import ExperimentConfig, load_config

TINY_MODEL: dict[str, object] = dict(
    base_width=8, depth=4, masa_heads=2, text_model="tiny-random-bert", text_max_length=24,
    fusion_dim=16, fusion_heads=2, fusion_scales=[16, 8, 4], fusion_layers=[1, 1, 1],
)
"""A CMG-Net with every part switched on and ~0.2 M parameters."""


def synthetic_dataset(root: str | Path, n_train: int = 16, n_val: int = 6, n_test: int = 5, size: int = 32,
                      seed: int = 0) -> Path:
    """Write (once) a procedural ISIC-2017-layout data set; reused when already there."""
    from cmgnet.data.synthetic import generate_dataset

    root = Path(root)
    marker = root / f".complete-{n_train}-{n_val}-{n_test}-{size}-{seed}"
    if not marker.exists():
        generate_dataset(root, n_train, n_val, n_test, size=size, seed=seed)
        marker.touch()
    return root


def tiny_experiment(data_root: str | Path, output_dir: str | Path, *overrides: str,
                    image_size: int = 32) -> ExperimentConfig:
    """A fast, deterministic experiment over a :func:`synthetic_dataset`.

    Args:
        data_root: the data set folder.
        output_dir: ``logging.output_dir`` (runs and the MLflow store go there).
        overrides: dotted ``key=value`` overrides applied last.
        image_size: training/evaluation side.

    Returns:
        The config: tiny CMG-Net, AdamW, 2 epochs of batch 4, PyTorch loader in-process,
        MLflow off, no progress bars.
    """
    base = [
        *(f"model.{k}={v}" for k, v in TINY_MODEL.items()),
        f"data.root={data_root}", "data.format=isic2017", f"data.image_size={image_size}", "data.loader=torch",
        "data.num_workers=0", "data.augment=paper", "data.validate=header",
        "optim.lr=3e-3", "optim.warmup_epochs=0", "optim.schedule=constant",
        "train.epochs=2", "train.batch_size=4", "train.log_every=1", "train.seed=0",
        "eval.splits=[test]", "eval.text_regimes=[none]", "eval.overlays=2",
        f"logging.output_dir={output_dir}", "logging.mlflow=false", "logging.progress_bar=false",
        "logging.run_name=tiny",
    ]
    return load_config(None, [*base, *overrides])

