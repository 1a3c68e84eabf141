"""Segmentation loss: ``0.5 * Dice + 0.5 * BCE`` on one-channel logits (paper section 4.2).

MONAI's :class:`~monai.losses.DiceCELoss` does the work: with one output channel it applies
a sigmoid for the soft Dice term and ``BCEWithLogitsLoss`` for the cross-entropy term.
"""

from __future__ import annotations

from monai.losses import DiceCELoss
from torch import nn

from .config import LossConfig


def build_loss(cfg: LossConfig) -> nn.Module:
    """The weighted Dice + BCE loss.

    Args:
        cfg: weights and whether Dice is pooled over the batch.

    Returns:
        A module ``loss(logits: B x 1 x H x W, target: B x 1 x H x W in {0, 1}) -> scalar``.
    """
    if cfg.dice_weight < 0 or cfg.bce_weight < 0 or cfg.dice_weight + cfg.bce_weight == 0:
        raise ValueError(f"loss weights must be >= 0 and not both 0, got {cfg}")
    return DiceCELoss(sigmoid=True, lambda_dice=cfg.dice_weight, lambda_ce=cfg.bce_weight, batch=cfg.batch_dice)
