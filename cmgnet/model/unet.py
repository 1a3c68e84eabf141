"""U-Net (Ronneberger et al., "U-Net: Convolutional Networks for Biomedical Image Segmentation",
MICCAI 2015): the image branch of CMG-Net (section 3.2) and the baseline of its tables.

The decoder runs over any :mod:`~cmgnet.model.encoders` encoder: from the bottleneck up, each
stage up-samples 2x, concatenates the encoder map of that stride and applies a DoubleConv;
encoders whose first map is at stride 2 (EfficientNet) get a final stage without a skip.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from .base import SegmentationModel, freeze_batchnorm, register_model
from .config import UNetConfig
from .encoders import Encoder, create_encoder
from .encoders.unet import DoubleConv

Fuse = Callable[[Tensor, int], Tensor]


class UpBlock(nn.Module):
    """2x up-sampling (transposed conv or bilinear + 1x1 conv), skip concat, DoubleConv."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int, bilinear: bool = False) -> None:
        super().__init__()
        half = max(in_channels // 2, 1)
        self.up = (
            nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False), nn.Conv2d(in_channels, half, 1))
            if bilinear
            else nn.ConvTranspose2d(in_channels, half, 2, stride=2)
        )
        self.conv = DoubleConv(half + skip_channels, out_channels)

    def forward(self, x: Tensor, skip: Tensor | None = None) -> Tensor:
        x = self.up(x)
        return self.conv(x if skip is None else torch.cat([x, skip], dim=1))


class UNetDecoder(nn.Module):
    """The U-Net up-sampling path over an encoder's maps, back to full resolution.

    Args:
        encoder_channels: channels of the encoder maps, shallowest first.
        encoder_strides: their strides (``1, 2, ...`` or ``2, 4, ...``).
        decoder_channels: output channels of each stage, deepest first (one per stride below
            the bottleneck down to 1); empty: the encoder's channels at the same stride.
        bilinear: bilinear up-sampling instead of transposed convs.

    Returns (forward):
        the full-resolution map with ``channels[1]`` channels.
    """

    def __init__(self, encoder_channels: Sequence[int], encoder_strides: Sequence[int],
                 decoder_channels: Sequence[int] = (), bilinear: bool = False) -> None:
        super().__init__()
        skips = dict(zip(encoder_strides, encoder_channels))
        bottleneck = encoder_strides[-1]
        out_strides = [bottleneck >> i for i in range(1, bottleneck.bit_length())]  # ..., 2, 1
        if not decoder_channels:
            decoder_channels = [skips.get(s, encoder_channels[0]) for s in out_strides]
        if len(decoder_channels) != len(out_strides):
            raise ValueError(f"decoder_channels needs {len(out_strides)} values (strides {out_strides}), "
                             f"got {list(decoder_channels)}")
        self.channels = {bottleneck: encoder_channels[-1], **dict(zip(out_strides, decoder_channels))}
        ins = [encoder_channels[-1], *decoder_channels[:-1]]
        self.skip_strides = [s if s in skips else None for s in out_strides]
        self.blocks = nn.ModuleList(
            UpBlock(cin, skips.get(s, 0), cout, bilinear) for cin, s, cout in zip(ins, out_strides, decoder_channels)
        )

    @property
    def out_channels(self) -> int:
        return self.channels[1]

    def forward(self, feats: Sequence[Tensor], strides: Sequence[int], fuse: Fuse | None = None) -> Tensor:
        """Decode; ``fuse(map, stride)`` (e.g. CMFM) runs on the bottleneck and after every stage."""
        by_stride = dict(zip(strides, feats))
        stride = strides[-1]
        x = feats[-1] if fuse is None else fuse(feats[-1], stride)
        for block, skip in zip(self.blocks, self.skip_strides):
            stride //= 2
            x = block(x, by_stride[skip] if skip else None)
            if fuse is not None:
                x = fuse(x, stride)
        return x


def build_encoder(config: UNetConfig) -> Encoder:
    """The encoder a (CMG-Net or U-Net) config asks for."""
    options = {"widths": config.widths} if config.encoder == "unet" else {}
    return create_encoder(config.encoder, config.in_channels, config.encoder_weights, **options)


@register_model("unet")
class UNet(SegmentationModel):
    """The plain U-Net on any encoder: the baseline CMG-Net is compared with.

    Args:
        config: a :class:`UNetConfig` (encoder, widths, decoder channels).

    Returns (forward):
        ``B x 1 x H x W`` lesion logits (text arguments are accepted and ignored, so every
        model of the registry is called the same way).

    Example:
        >>> net = UNet(UNetConfig(base_width=8)).eval()
        >>> net(torch.randn(1, 3, 64, 48)).shape
        torch.Size([1, 1, 64, 48])
    """

    config_class = UNetConfig

    def __init__(self, config: UNetConfig | None = None) -> None:
        config = config or UNetConfig()
        super().__init__(config)
        self.encoder = build_encoder(config)
        self.decoder = UNetDecoder(self.encoder.out_channels, self.encoder.strides, config.decoder_channels,
                                   config.bilinear)
        self.head = nn.Conv2d(self.decoder.out_channels, 1, 1)
        if config.freeze_encoder_bn:
            freeze_batchnorm(self.encoder)

    def forward(self, image: Tensor, text_features: Tensor | None = None, text_mask: Tensor | None = None,
                text: Sequence[str] | None = None) -> Tensor:
        self.check_input(image)
        return self.head(self.decoder(self.encoder(image), self.encoder.strides))
