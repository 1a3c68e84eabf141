"""Pieces the baselines share: the text-guided config, scale checks, resizable positions.

Field names match :class:`cmgnet.model.CMGNetConfig` wherever the meaning is the same
(``encoder``, ``base_width``, ``depth``, ``text_model``, ``fusion_dim``, ...), so
:func:`cmgnet.model.convert_config` hands every model the fields it shares with CMG-Net's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cmgnet.text.encoder import DEFAULT_TEXT_MODEL

from ..config import UNetConfig
from ..text_branch import TextBranch


def check_scales(name: str, scales: Sequence[int], valid: set[int]) -> tuple[int, ...]:
    """Scales as ints, each one of ``valid`` (down-sampling factors of the network's maps)."""
    scales = tuple(int(s) for s in scales)
    if bad := [s for s in scales if s not in valid]:
        raise ValueError(f"{name} {bad} are not among the network's scales {sorted(valid)}")
    return scales


@dataclass
class TextGuidedConfig(UNetConfig):
    """The U-Net image branch (any encoder) plus the project's frozen text branch (fields as in CMG-Net's config).

    Args:
        text_model: text encoder id (see ``cmgnet.text.encoder``).
        text_max_length: tokens kept per sentence.
        freeze_text: keep the encoder frozen (features cached; not saved with the weights).
        text_cache_dir: on-disk text feature cache (``None``: memory only).
        modality_dropout: training-time probability of replacing a sentence by the neutral one.
        fusion_dim: width of the projected text tokens and of the attention.
        fusion_heads: attention heads.
    """

    text_model: str = DEFAULT_TEXT_MODEL
    text_max_length: int = 32
    freeze_text: bool = True
    text_cache_dir: str | None = None
    modality_dropout: float = 0.0
    fusion_dim: int = 256
    fusion_heads: int = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.modality_dropout <= 1.0:
            raise ValueError(f"modality_dropout must be in [0, 1], got {self.modality_dropout}")
        if self.fusion_dim % self.fusion_heads:
            raise ValueError(f"fusion_dim {self.fusion_dim} is not divisible by fusion_heads {self.fusion_heads}")


def build_text_branch(config: TextGuidedConfig) -> TextBranch:
    """The project's text branch (frozen BERT-family encoder + cache + projection to ``fusion_dim``)."""
    return TextBranch(config.text_model, config.text_max_length, config.freeze_text, config.fusion_dim,
                      config.modality_dropout, config.text_cache_dir)


class LearnedPositions(nn.Module):
    """A learned ``dim x grid x grid`` positional embedding, resized to any token grid.

    ViTs fix their token count; interpolating the table (as DeiT/DINO do for other input
    sizes) lets the segmentation models take any multiple of their stride.
    """

    def __init__(self, dim: int, grid: int) -> None:
        super().__init__()
        self.table = nn.Parameter(nn.init.trunc_normal_(torch.empty(1, dim, grid, grid), std=0.02))

    def forward(self, height: int, width: int) -> Tensor:
        """``1 x (height*width) x dim`` positions (bilinear; identity at the table's own size)."""
        table = F.interpolate(self.table, size=(height, width), mode="bilinear", align_corners=False)
        return table.flatten(2).transpose(1, 2)

