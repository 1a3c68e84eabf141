"""The paper's ablation study (table 3) with one command.

The rows are :class:`~cmgnet.train.variants.Variant` s of CMG-Net (switches off) and the
U-Net, run by the same runner as the baseline comparison
(:func:`cmgnet.train.variants.run_variants`): same config, seed, data and budget, changing
only the model; the table is printed in the paper's shape (IoU, Dice, Precision, Recall, F1,
ACC in %, plus cost) and written to ``<output_dir>/<run>-ablation/ablation.{json,md}``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .cost import CostSpec
from .variants import Variant

if TYPE_CHECKING:  # annotations only: `cmgnet ablate --help` lists VARIANTS without importing torch
    from .config import ExperimentConfig

VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "unet": ("Baseline (U-Net)", {"arch": "unet", "masa": False, "text": False, "cmfm": False, "alpha": False}),
    "full": ("CMG-Net", {}),
    "no_masa": ("CMG-Net w/o MASA", {"masa": False}),
    "no_text": ("CMG-Net w/o Text", {"text": False}),
    "no_cmfm": ("CMG-Net w/o CMFM", {"cmfm": False}),
    "no_alpha": ("CMG-Net w/o α", {"alpha": False}),
}
"""Variant key -> (row label as in the paper, the CMG-Net switches it turns off; ``arch`` picks the class)."""


def ablation_variant(key: str) -> Variant:
    """Table 3's row ``key`` as a variant.

    A row of another class (``arch: unet``) is that class with the fields it shares with the
    CMG-Net config; its switches only describe what the row leaves out of CMG-Net.
    """
    label, switches = VARIANTS[key]
    switches = dict(switches)
    arch = switches.pop("arch", "cmgnet")
    notes = {"unet": "CMG-Net with MASA, text, CMFM and the gate removed (same encoder and widths)"}
    return Variant(key, label, arch, switches if arch == "cmgnet" else {}, notes.get(key, ""))


def run_ablation(cfg: ExperimentConfig, variants: Sequence[str] | None = None, split: str | None = None,
                 text_regime: str | None = None, cost: CostSpec | None = CostSpec(),
                 budget_minutes: float | None = None) -> dict[str, Any]:
    """Train and evaluate every variant; print and write the table.

    Args:
        cfg: the base experiment (the ``full`` CMG-Net config).
        variants: keys of :data:`VARIANTS` (default: all, in the paper's order).
        split: split of the table (default: the first of ``eval.splits``).
        text_regime: regime of the table (default: ``data.text_regime_eval``); every variant
            is evaluated in it alone (image-only variants ignore the sentence).
        cost: how to measure parameters, GFLOPs and latency (``None``: no cost columns).
        budget_minutes: equal wall time per variant instead of equal epochs.

    Returns:
        The report of :func:`~cmgnet.train.variants.run_variants` (``rows``, ``json``, ``markdown``, ...).
    """
    from .variants import run_variants

    keys = list(variants or VARIANTS)
    if unknown := [k for k in keys if k not in VARIANTS]:
        raise ValueError(f"unknown ablation variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    return run_variants(cfg, [ablation_variant(k) for k in keys], kind="ablation", title="Ablation", split=split,
                        text_regimes=[text_regime or cfg.data.text_regime_eval], budget_minutes=budget_minutes,
                        cost=cost)
