"""The from-scratch U-Net encoder (Ronneberger et al., MICCAI 2015), CMG-Net section 3.2."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from .base import Encoder, register_encoder


class DoubleConv(nn.Sequential):
    """(conv3x3 -> BN -> ReLU) x 2, the U-Net stage."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class UNetEncoder(Encoder):
    """``len(widths) - 1`` stages of DoubleConv + 2x2 max-pool, then the bottleneck DoubleConv.

    Args:
        in_channels: image channels.
        widths: channels per stage, full resolution first (paper: ``64 * [1, 2, 4, 8, 16]``).

    Returns (forward):
        ``len(widths)`` maps at strides ``1, 2, ..., 2**depth``.
    """

    def __init__(self, in_channels: int, widths: Sequence[int]) -> None:
        super().__init__()
        chans = [in_channels, *widths]
        self.stages = nn.ModuleList(DoubleConv(a, b) for a, b in zip(chans[:-1], chans[1:]))
        self.pool = nn.MaxPool2d(2)
        self.out_channels = tuple(widths)
        self.strides = tuple(2**i for i in range(len(widths)))

    def forward(self, x: Tensor) -> list[Tensor]:
        feats = [self.stages[0](x)]
        for stage in self.stages[1:]:
            feats.append(stage(self.pool(feats[-1])))
        return feats


@register_encoder("unet")
def unet_encoder(in_channels: int = 3, weights: str | None = None, widths: Sequence[int] = (64, 128, 256, 512, 1024)):
    if weights is not None:
        raise ValueError(f"the 'unet' encoder trains from scratch: encoder_weights must be 'none', got {weights!r}")
    return UNetEncoder(in_channels, widths)


unet_encoder.encoder_class = UNetEncoder
unet_encoder.output_stride = None  # 2**depth: set by the model config
