"""TransUNet-like baseline: a CNN encoder, a ViT over the H/16 tokens, a U-Net decoder.

Chen, Lu, Yu, Luo, Adeli, Wang, Lu, Yuille & Zhou, "TransUNet: Transformers Make Strong
Encoders for Medical Image Segmentation", arXiv:2102.04306 (2021). The transformer layers are
MONAI's ``TransformerBlock`` (pre-norm multi-head self-attention + MLP, ViT-B's layout); the
CNN encoder is any of the project's encoders (:mod:`cmgnet.model.encoders`) and the decoder
the project's U-Net decoder (:mod:`cmgnet.model.unet`).

Where it differs from the original:

* the CNN encoder is the project's from-scratch U-Net encoder by default (``encoder: unet``)
  or an ImageNet EfficientNet-Lite (``encoder: efficientnet-lite0``, bottleneck at 1/32), not
  an ImageNet ResNet-50; the ViT layers are never pretrained (no ViT-B/16 weights here);
* the decoder is the U-Net decoder with a skip at every encoder scale (full resolution
  included for the U-Net encoder); TransUNet's cascaded upsampler has skips at 1/2, 1/4 and
  1/8 and none at full resolution;
* the learned positional embedding is laid out for ``pos_grid x pos_grid`` tokens and
  resized bilinearly to the input's token grid, so any multiple of the stride works.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor, nn

from ..base import SegmentationModel, freeze_batchnorm, register_model
from ..config import UNetConfig
from ..unet import UNetDecoder, build_encoder
from ._common import LearnedPositions


@dataclass
class TransUNetConfig(UNetConfig):
    """TransUNet-like hyper-parameters (encoder/decoder fields as in CMG-Net's config).

    Args:
        vit_dim: transformer width (ViT-B: 768).
        vit_layers: transformer layers (ViT-B: 12).
        vit_heads: attention heads (ViT-B: 12).
        vit_mlp_ratio: MLP width / ``vit_dim`` (ViT-B: 4).
        vit_dropout: dropout in the transformer layers.
        pos_grid: side of the positional-embedding table (``image_size / 2**depth`` at the
            training size: 16 for 256 px).
    """

    vit_dim: int = 768
    vit_layers: int = 12
    vit_heads: int = 12
    vit_mlp_ratio: float = 4.0
    vit_dropout: float = 0.0
    pos_grid: int = 16

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.vit_dim % self.vit_heads:
            raise ValueError(f"vit_dim {self.vit_dim} is not divisible by vit_heads {self.vit_heads}")


@register_model("transunet")
class TransUNet(SegmentationModel):
    """CNN encoder -> ViT bottleneck (one token per bottleneck pixel, H/16) -> U-Net decoder; image-only.

    Args:
        config: a :class:`TransUNetConfig`.

    Returns (forward):
        ``B x 1 x H x W`` lesion logits.

    Example:
        >>> net = TransUNet(TransUNetConfig(base_width=4, vit_dim=16, vit_layers=1, vit_heads=2)).eval()
        >>> net(torch.randn(1, 3, 64, 32)).shape
        torch.Size([1, 1, 64, 32])
    """

    config_class = TransUNetConfig

    def __init__(self, config: TransUNetConfig | None = None) -> None:
        from monai.networks.blocks import TransformerBlock

        config = config or TransUNetConfig()
        super().__init__(config)
        self.encoder = build_encoder(config)
        channels = self.encoder.out_channels[-1]
        # Patch size 1 on the bottleneck map, as TransUNet's hybrid R50-ViT embeds its 1/16 features.
        self.embed = nn.Conv2d(channels, config.vit_dim, 1)
        self.positions = LearnedPositions(config.vit_dim, config.pos_grid)
        self.dropout = nn.Dropout(config.vit_dropout)
        self.blocks = nn.ModuleList(
            TransformerBlock(config.vit_dim, int(config.vit_dim * config.vit_mlp_ratio), config.vit_heads,
                             config.vit_dropout, qkv_bias=True)
            for _ in range(config.vit_layers)
        )
        for block in self.blocks:  # MONAI builds this norm even without cross-attention; it is never used
            block.norm_cross_attn = nn.Identity()
        self.norm = nn.LayerNorm(config.vit_dim)
        # Back to the encoder's width before the decoder (TransUNet: a 3x3 conv to 512 channels).
        self.unembed = nn.Sequential(nn.Conv2d(config.vit_dim, channels, 3, padding=1, bias=False),
                                     nn.BatchNorm2d(channels), nn.ReLU(inplace=True))
        self.decoder = UNetDecoder(self.encoder.out_channels, self.encoder.strides, config.decoder_channels,
                                   config.bilinear)
        self.head = nn.Conv2d(self.decoder.out_channels, 1, 1)
        if config.freeze_encoder_bn:
            freeze_batchnorm(self.encoder)

    def forward(self, image: Tensor, text_features: Tensor | None = None, text_mask: Tensor | None = None,
                text: Sequence[str] | None = None) -> Tensor:
        """Segment ``image`` (``B x C x H x W``); the text arguments exist for a uniform call and are ignored."""
        self.check_input(image)
        feats = self.encoder(image)
        b, _, h, w = feats[-1].shape
        tokens = self.dropout(self.embed(feats[-1]).flatten(2).transpose(1, 2) + self.positions(h, w))
        for block in self.blocks:
            tokens = block(tokens)
        x = self.unembed(self.norm(tokens).transpose(1, 2).reshape(b, -1, h, w))
        return self.head(self.decoder([*feats[:-1], x], self.encoder.strides))
