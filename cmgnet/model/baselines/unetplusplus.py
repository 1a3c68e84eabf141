"""U-Net++ baseline: MONAI's ``BasicUNetPlusPlus`` in 2D behind the project's model contract.

Zhou, Rahman Siddiquee, Tajbakhsh & Liang, "UNet++: A Nested U-Net Architecture for Medical
Image Segmentation", DLMIA 2018 (and IEEE TMI 2020). The network is MONAI's implementation,
not re-typed; this file only adapts it (1-logit head, dataclass config, CMG-Net's forward
signature, safetensors save/load).

Where it differs from the original:

* widths follow the project's U-Net (``base_width * [1, 2, 4, 8, 16]``, the nested decoder
  nodes at the width of their level, the last up-sampling at ``base_width``); the paper uses
  32..512 (``base_width=32``);
* batch norm by default (the paper's U-Net++ uses BN; MONAI's default is instance norm) and
  MONAI's LeakyReLU(0.1) activations;
* no deep supervision: one output from the last nested node (the engine trains one logit
  map; the paper's pruned / deeply supervised variants are not offered).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor, nn

from ..base import SegmentationModel, register_model


@dataclass
class UNetPlusPlusConfig:
    """U-Net++ hyper-parameters.

    Args:
        in_channels: image channels.
        base_width: level ``i`` has ``base_width * 2**i`` channels (paper: 32).
        norm: MONAI norm name (``batch``, ``instance``, ``group``, ...).
        dropout: dropout probability in the conv blocks.
        upsample: MONAI up-sampling mode (``deconv``, ``pixelshuffle``, ``nontrainable``).
    """

    in_channels: int = 3
    base_width: int = 32
    norm: str = "batch"
    dropout: float = 0.0
    upsample: str = "deconv"

    @property
    def features(self) -> tuple[int, ...]:
        """MONAI's ``features``: the five levels, then the last up-sampling's width."""
        return (*(self.base_width * 2**i for i in range(5)), self.base_width)

    @property
    def stride(self) -> int:
        """Input sides must be multiples of this (four 2x poolings)."""
        return 16


@register_model("unetplusplus")
class UNetPlusPlus(SegmentationModel):
    """U-Net++ (MONAI ``BasicUNetPlusPlus``, 2D, one logit); image-only: text inputs are ignored.

    Args:
        config: a :class:`UNetPlusPlusConfig`.

    Returns (forward):
        ``B x 1 x H x W`` lesion logits.

    Example:
        >>> net = UNetPlusPlus(UNetPlusPlusConfig(base_width=4)).eval()
        >>> net(torch.randn(1, 3, 32, 48)).shape
        torch.Size([1, 1, 32, 48])
    """

    config_class = UNetPlusPlusConfig

    def __init__(self, config: UNetPlusPlusConfig | None = None) -> None:
        from monai.networks.nets import BasicUNetPlusPlus

        config = config or UNetPlusPlusConfig()
        super().__init__(config)
        self.net = BasicUNetPlusPlus(
            spatial_dims=2, in_channels=config.in_channels, out_channels=1, features=config.features,
            deep_supervision=False, norm=config.norm,
            dropout=config.dropout, upsample=config.upsample,
        )
        # MONAI builds a head on every nested node but returns only the last without deep
        # supervision: drop the unused ones so they neither count as parameters nor get saved.
        for i in (1, 2, 3):
            setattr(self.net, f"final_conv_0_{i}", nn.Identity())

    def forward(self, image: Tensor, text_features: Tensor | None = None, text_mask: Tensor | None = None,
                text: Sequence[str] | None = None) -> Tensor:
        """Segment ``image`` (``B x C x H x W``); the text arguments exist for a uniform call and are ignored."""
        self.check_input(image)
        return self.net(image)[0]  # MONAI returns a list (one map without deep supervision)
