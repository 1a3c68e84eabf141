"""U-Net building blocks (Ronneberger et al., MICCAI 2015), as used by CMG-Net section 3.2."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class DoubleConv(nn.Sequential):
    """(conv3x3 -> BN -> ReLU) x 2."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class Encoder(nn.Module):
    """``depth`` stages of DoubleConv + 2x2 max-pool, then the bottleneck DoubleConv.

    Returns the skip features (full resolution first) and the bottleneck map at ``H / 2**depth``.
    """

    def __init__(self, in_channels: int, widths: list[int]) -> None:
        super().__init__()
        chans = [in_channels, *widths]
        self.stages = nn.ModuleList(DoubleConv(a, b) for a, b in zip(chans[:-1], chans[1:]))
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: Tensor) -> tuple[list[Tensor], Tensor]:
        skips = []
        for stage in self.stages[:-1]:
            x = stage(x)
            skips.append(x)
            x = self.pool(x)
        return skips, self.stages[-1](x)


class UpBlock(nn.Module):
    """2x up-sampling (transposed conv or bilinear + 1x1 conv), skip concat, DoubleConv."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int, bilinear: bool = False) -> None:
        super().__init__()
        half = in_channels // 2
        self.up = (
            nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False), nn.Conv2d(in_channels, half, 1))
            if bilinear
            else nn.ConvTranspose2d(in_channels, half, 2, stride=2)
        )
        self.conv = DoubleConv(half + skip_channels, out_channels)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        return self.conv(torch.cat([self.up(x), skip], dim=1))
