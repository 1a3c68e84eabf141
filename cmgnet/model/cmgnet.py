"""CMG-Net: Cross-Modal Guided Network for skin-lesion segmentation.

Su & Meng, "Skin Lesion Image Segmentation Enhancement Method Based on Cross-Modal
Attention", Modeling and Simulation 14(4), 2025 (CC BY 4.0). A U-Net whose bottleneck runs
multi-axis self-attention (MASA), a BERT text branch over pseudo-text built from lesion
metadata, and cross-modal fusion modules (CMFM) with a learned per-pixel gate at several
scales of the decoder. Design decisions the paper leaves open are in docs/design.md section 2.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from .base import SegmentationModel, register_model
from .cmfm import CrossModalFusion, TextAdditionFusion
from .config import CMGNetConfig
from .masa import MultiAxisSelfAttention
from .text_branch import TextBranch
from .unet import UNetDecoder, build_encoder, freeze_batchnorm


@register_model("cmgnet")
class CMGNet(SegmentationModel):
    """CMG-Net with ablation switches (``masa``, ``text``, ``cmfm``, ``alpha`` in the config).

    The encoder is pluggable (``encoder``: the paper's from-scratch U-Net encoder or an
    ImageNet-pretrained EfficientNet-Lite); MASA runs on its bottleneck and CMFM at the
    configured scales of the decoder, whichever encoder is chosen.

    Args:
        config: a :class:`CMGNetConfig`.

    Returns (forward):
        ``B x 1 x H x W`` lesion logits.

    Example:
        >>> cfg = CMGNetConfig(base_width=8, text_model="tiny-random-bert", fusion_dim=16, fusion_heads=2, masa_heads=2)
        >>> net = CMGNet(cfg).eval()
        >>> net(torch.randn(1, 3, 64, 48), text=["Skin lesion."]).shape
        torch.Size([1, 1, 64, 48])
    """

    config_class = CMGNetConfig

    def __init__(self, config: CMGNetConfig | None = None) -> None:
        config = config or CMGNetConfig()
        super().__init__(config)
        self.encoder = build_encoder(config)
        bottleneck = self.encoder.out_channels[-1]
        self.masa = MultiAxisSelfAttention(bottleneck, config.masa_heads) if config.masa else None
        self.decoder = UNetDecoder(self.encoder.out_channels, self.encoder.strides, config.decoder_channels,
                                   config.bilinear)
        self.head = nn.Conv2d(self.decoder.out_channels, 1, 1)
        self.text_branch = None
        self.fusion = nn.ModuleDict()
        if config.text:
            self.text_branch = TextBranch(
                config.text_model, config.text_max_length, config.freeze_text, config.fusion_dim,
                config.modality_dropout, config.text_cache_dir,
            )
            for scale, layers in zip(config.fusion_scales, config.fusion_layers):
                channels = self.decoder.channels[scale]
                self.fusion[str(scale)] = (
                    CrossModalFusion(
                        channels, config.fusion_dim, config.fusion_dim, config.fusion_heads, layers,
                        image_self_attention=scale == config.stride, learned_gate=config.alpha,
                    )
                    if config.cmfm
                    else TextAdditionFusion(channels, config.fusion_dim)
                )
        if config.freeze_encoder_bn:
            freeze_batchnorm(self.encoder)

    def external_state_prefixes(self) -> tuple[str, ...]:
        frozen = self.text_branch is not None and self.config.freeze_text
        return ("text_branch.encoder.",) if frozen else ()

    def forward(
        self,
        image: Tensor,
        text_features: Tensor | None = None,
        text_mask: Tensor | None = None,
        text: Sequence[str] | None = None,
    ) -> Tensor:
        """Segment ``image`` (``B x 3 x H x W``) guided by text.

        Text comes either as sentences (``text``) or as precomputed encoder features
        (``text_features``: ``B x L x D_t`` last hidden states, ``text_mask``: ``B x L``, True
        for real tokens: the form an exported engine takes). With neither, the neutral
        sentence is used; a model built with ``text=False`` ignores both.
        """
        self.check_input(image)
        feats = self.encoder(image)
        if self.masa is not None:
            feats[-1] = self.masa(feats[-1])
        tokens = mask = None
        if self.text_branch is not None:
            tokens, mask = self.text_branch(image.shape[0], text, text_features, text_mask)

        def fuse(x: Tensor, scale: int) -> Tensor:
            key = str(scale)
            return self.fusion[key](x, tokens, mask) if key in self.fusion else x

        return self.head(self.decoder(feats, self.encoder.strides, fuse))
