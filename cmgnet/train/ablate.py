"""The paper's ablation study (table 3) with one command.

Each variant trains with the same config, seed and data, changing only the model switches
(DESIGN section 2.4), then its best weights are evaluated; the table is printed in the
paper's shape (IoU, Dice, Precision, Recall, ACC in %) and written as JSON and Markdown.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .config import ExperimentConfig

VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "unet": ("Baseline (U-Net)", {"arch": "unet", "masa": False, "text": False, "cmfm": False, "alpha": False}),
    "full": ("CMG-Net", {}),
    "no_masa": ("CMG-Net w/o MASA", {"masa": False}),
    "no_text": ("CMG-Net w/o Text", {"text": False}),
    "no_cmfm": ("CMG-Net w/o CMFM", {"cmfm": False}),
    "no_alpha": ("CMG-Net w/o α", {"alpha": False}),
}
"""Variant key -> (row label as in the paper, model switches; ``arch`` picks the class)."""

PAPER_COLUMNS: tuple[tuple[str, str], ...] = (
    ("IoU", "iou"), ("Dice", "dice"), ("Precision", "precision"), ("Recall", "recall"), ("ACC", "accuracy"),
)


def variant_config(cfg: ExperimentConfig, key: str) -> ExperimentConfig:
    """The experiment of one ablation variant (own run name; MLflow run tagged by the name)."""
    label, switches = VARIANTS[key]
    switches = dict(switches)
    arch = switches.pop("arch", cfg.arch)
    model = dataclasses.replace(cfg.model, **switches)
    base = cfg.logging.run_name or cfg.name
    logging_cfg = dataclasses.replace(cfg.logging, run_name=f"{base}-ablate-{key}")
    return dataclasses.replace(cfg, arch=arch, model=model, logging=logging_cfg,
                               name=f"{cfg.name}-{key}")


def paper_table(rows: Sequence[dict[str, Any]], convention: str, text_regime: str, split: str) -> str:
    """Table 3's shape: ``Network | IoU | Dice | Precision | Recall | ACC`` in percent.

    Args:
        rows: ``{"label": ..., "per_image_mean": {...}, "pooled": {...}}`` per variant.
        convention: which aggregate to show.
        text_regime: the regime the numbers were measured in (named in the caption).
        split: the split (named in the caption).
    """
    head = ["Network", *(c for c, _ in PAPER_COLUMNS)]
    body = []
    for row in rows:
        values = row.get(convention) or {}
        body.append([row["label"], *(f"{100 * values[k]:.1f}" if k in values and not math.isnan(values[k]) else "n/a"
                                     for _, k in PAPER_COLUMNS)])
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    caption = (f"Ablation ({split} split, text regime '{text_regime}', {convention.replace('_', '-')} "
               f"metrics in %)")
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([caption, line(head), rule, *(line(b) for b in body)])


def run_ablation(cfg: ExperimentConfig, variants: Sequence[str] | None = None, split: str | None = None,
                 text_regime: str | None = None) -> dict[str, Any]:
    """Train and evaluate every variant; print and write the table.

    Args:
        cfg: the base experiment (the ``full`` CMG-Net config).
        variants: keys of :data:`VARIANTS` (default: all, in the paper's order).
        split: split of the table (default: the first of ``eval.splits``).
        text_regime: regime of the table (default: ``data.text_regime_eval``); every variant
            is evaluated in it alone (image-only variants ignore the sentence).

    Returns:
        ``{"rows": [...], "table": str, "json": path}``.
    """
    from .engine import Trainer, build_accelerator

    keys = list(variants or VARIANTS)
    if unknown := [k for k in keys if k not in VARIANTS]:
        raise ValueError(f"unknown ablation variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    split = split or (cfg.eval.splits[0] if cfg.eval.splits else cfg.eval.val_split)
    text_regime = text_regime or cfg.data.text_regime_eval
    accelerator = build_accelerator(cfg)  # one per process, shared by every variant
    rows = []
    for key in keys:
        vcfg = variant_config(cfg, key)
        eval_cfg = dataclasses.replace(vcfg.eval, splits=[split], text_regimes=[text_regime])
        vcfg = dataclasses.replace(vcfg, eval=eval_cfg)
        result = Trainer(vcfg, accelerator=accelerator).fit()
        match = [r for r in result.results if r.text_regime == text_regime and r.split == split]
        summary = match[0].summary if match else {}
        rows.append({"variant": key, "label": VARIANTS[key][0], "run_dir": str(result.run_dir),
                     "mlflow_run_id": result.mlflow_run_id, **summary})
    table = paper_table(rows, "per_image_mean", text_regime, split)
    pooled = paper_table(rows, "pooled", text_regime, split)
    out = Path(cfg.logging.output_dir) / f"{cfg.logging.run_name or cfg.name}-ablation"
    report = {"split": split, "text_regime": text_regime, "rows": rows}
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "ablation.json").write_text(json.dumps(report, indent=2, allow_nan=True) + "\n")
        (out / "ablation.md").write_text(table + "\n\n" + pooled + "\n")
        print("\n" + table + "\n\n" + pooled + f"\n\nwritten to {out}/ablation.json and ablation.md")
    return {"rows": rows, "table": table, "json": out / "ablation.json"}
