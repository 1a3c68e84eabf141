"""Swin-UNet-like baseline: MONAI's ``SwinUNETR`` in 2D behind the project's model contract.

Stands in for Swin-UNet (Cao, Wang, Chen, Jiang, Zhang, Tian & Wang, "Swin-Unet: Unet-like Pure
Transformer for Medical Image Segmentation", ECCV Workshops 2022), the Swin model of the CMG-Net
paper's table 1. The network is MONAI's SwinUNETR (Hatamizadeh, Nath, Tang, Yang, Roth & Xu,
"Swin UNETR: Swin Transformers for Semantic Segmentation of Brain Tumors in MRI Images",
BrainLes 2021) with ``spatial_dims=2``, not re-typed.

Where it differs from Swin-Unet:

* the decoder is SwinUNETR's convolutional U-Net decoder (residual conv blocks and transposed
  convs fed by the Swin stages and a conv stem at full resolution), not Swin-Unet's symmetric
  Swin-transformer decoder with patch-expanding layers;
* patch size 2 (Swin-Unet: 4) and SwinUNETR's window/heads defaults; sides must be multiples
  of ``patch_size ** 5`` (32 for patch 2);
* trained from scratch: Swin-Unet starts from ImageNet Swin-T weights, which would need a
  network download this project does not make.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor

from ..base import SegmentationModel, register_model


@dataclass
class SwinUNetConfig:
    """SwinUNETR-2D hyper-parameters (MONAI's names).

    Args:
        in_channels: image channels.
        feature_size: embedding width of the first stage (a multiple of 12; MONAI's default 24,
            Swin-T's 96 at patch 4).
        depths: Swin blocks per stage (four stages).
        num_heads: attention heads per stage.
        window_size: attention window side.
        patch_size: patch-embedding side.
        mlp_ratio: MLP hidden width / embedding width.
        drop_rate, attn_drop_rate, dropout_path_rate: dropout, attention dropout, stochastic depth.
        norm_name: norm of the convolutional decoder.
        use_v2: SwinUNETR-V2 (a residual conv block before each Swin stage).
    """

    in_channels: int = 3
    feature_size: int = 24
    depths: tuple[int, ...] = (2, 2, 2, 2)
    num_heads: tuple[int, ...] = (3, 6, 12, 24)
    window_size: int = 7
    patch_size: int = 2
    mlp_ratio: float = 4.0
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    dropout_path_rate: float = 0.0
    norm_name: str = "instance"
    use_v2: bool = False

    def __post_init__(self) -> None:
        self.depths = tuple(int(d) for d in self.depths)
        self.num_heads = tuple(int(h) for h in self.num_heads)
        if len(self.depths) != 4 or len(self.num_heads) != 4:
            raise ValueError(f"SwinUNETR has four stages: got depths {self.depths}, num_heads {self.num_heads}")
        if bad := [(self.feature_size * 2**i, h) for i, h in enumerate(self.num_heads) if (self.feature_size * 2**i) % h]:
            raise ValueError(f"stage widths are not divisible by their heads: {bad}")

    @property
    def stride(self) -> int:
        """Input sides must be multiples of this (MONAI checks ``patch_size ** 5``)."""
        return self.patch_size**5


@register_model("swinunet")
class SwinUNet(SegmentationModel):
    """Swin-UNet-like network (MONAI ``SwinUNETR``, 2D, one logit); image-only: text inputs are ignored.

    Args:
        config: a :class:`SwinUNetConfig`.

    Returns (forward):
        ``B x 1 x H x W`` lesion logits.

    Example:
        >>> net = SwinUNet(SwinUNetConfig(feature_size=12, num_heads=(1, 2, 4, 8))).eval()
        >>> net(torch.randn(1, 3, 64, 32)).shape
        torch.Size([1, 1, 64, 32])
    """

    config_class = SwinUNetConfig

    def __init__(self, config: SwinUNetConfig | None = None) -> None:
        from monai.networks.nets import SwinUNETR

        config = config or SwinUNetConfig()
        super().__init__(config)
        self.net = SwinUNETR(
            in_channels=config.in_channels, out_channels=1, spatial_dims=2, patch_size=config.patch_size,
            depths=config.depths, num_heads=config.num_heads, window_size=config.window_size,
            mlp_ratio=config.mlp_ratio, feature_size=config.feature_size, norm_name=config.norm_name,
            drop_rate=config.drop_rate, attn_drop_rate=config.attn_drop_rate,
            dropout_path_rate=config.dropout_path_rate, use_v2=config.use_v2,
        )

    def forward(self, image: Tensor, text_features: Tensor | None = None, text_mask: Tensor | None = None,
                text: Sequence[str] | None = None) -> Tensor:
        """Segment ``image`` (``B x C x H x W``); the text arguments exist for a uniform call and are ignored."""
        self.check_input(image)
        return self.net(image)
