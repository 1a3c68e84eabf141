"""GuideDecoder-style text-guided U-Net (a re-implementation on this project's parts).

After Zhong, Xu, Yu, Zhang, Zhang, Zheng & Zhou, "Ariadne's Thread: Using Text Prompts to
Improve Segmentation of Infected Areas from Chest X-ray Images", MICCAI 2023. The idea kept:
a frozen text encoder, and text entering the network only in the decoder, where each guided
stage runs image self-attention and then image -> text cross-attention (image tokens query
the text tokens) before the next up-sampling. This is **not** the authors' code: it is built
from the project's encoders and U-Net decoder, text branch (:class:`~cmgnet.model.text_branch.TextBranch`)
and attention op (:class:`~cmgnet.model.attention.MultiHeadAttention`, i.e. ``cmgnet.kernels``).

Where it differs from the original:

* image encoder: the project's from-scratch U-Net encoder (or an ImageNet EfficientNet-Lite),
  not an ImageNet ConvNeXt-Tiny; text encoder: the project's BERT-family encoder (default
  MiniLM), not CXR-BERT;
* guided stages sit at the decoder-stage outputs given by ``guide_scales`` (default 1/8, 1/4,
  1/2: three stages, as in the paper, on the U-Net decoder);
  self-attention runs only at ``self_attention_scales`` (default 1/8: it is quadratic in the
  tokens), the paper runs it in every guided stage;
* positions come from a depthwise 3x3 conv (as CMG-Net's MASA) rather than sine encodings,
  and the cross-attention residual has no learned scale.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor, nn

from ..attention import FeedForward, MultiHeadAttention
from ..base import SegmentationModel, freeze_batchnorm, register_model
from ..unet import UNetDecoder, build_encoder
from ._common import TextGuidedConfig, build_text_branch, check_scales


@dataclass
class GuideDecoderConfig(TextGuidedConfig):
    """GuideDecoder-style hyper-parameters (U-Net and text fields as in CMG-Net's config).

    Args:
        guide_scales: decoder-stage outputs (down-sampling factors below the bottleneck's) that
            are guided by text.
        self_attention_scales: the subset of ``guide_scales`` that also runs image self-attention.
    """

    guide_scales: tuple[int, ...] = (8, 4, 2)
    self_attention_scales: tuple[int, ...] = (8,)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.guide_scales = check_scales("guide_scales", self.guide_scales, self.scales - {self.stride})
        self.self_attention_scales = check_scales("self_attention_scales", self.self_attention_scales,
                                                  set(self.guide_scales))


class GuideLayer(nn.Module):
    """One guided decoder stage on a ``B x C x h x w`` map: [self-attention], image -> text attention, MLP.

    Args:
        channels: map width ``C``.
        text_dim: width of the projected text tokens.
        inner_dim: attention width (split over ``heads``).
        heads: attention heads.
        self_attention: also run image self-attention (quadratic in ``h * w``).

    Example:
        >>> layer = GuideLayer(8, text_dim=16, inner_dim=16, heads=2, self_attention=True)
        >>> layer(torch.randn(2, 8, 4, 4), torch.randn(2, 5, 16), torch.ones(2, 5, dtype=torch.bool)).shape
        torch.Size([2, 8, 4, 4])
    """

    def __init__(self, channels: int, text_dim: int, inner_dim: int, heads: int, self_attention: bool) -> None:
        super().__init__()
        self.pos = nn.Conv2d(channels, channels, 3, padding=1, groups=channels)
        if self_attention:
            self.self_norm = nn.LayerNorm(channels)
            self.self_attn = MultiHeadAttention(channels, None, inner_dim, heads)
        self.cross_norm = nn.LayerNorm(channels)
        self.cross_attn = MultiHeadAttention(channels, text_dim, inner_dim, heads, out_dim=channels)
        self.ffn = FeedForward(channels)

    def forward(self, feature_map: Tensor, text: Tensor, mask: Tensor) -> Tensor:
        b, c, h, w = feature_map.shape
        x = (feature_map + self.pos(feature_map)).flatten(2).transpose(1, 2)
        if hasattr(self, "self_attn"):
            x = x + self.self_attn(self.self_norm(x))
        x = x + self.cross_attn(self.cross_norm(x), text, key_padding_mask=mask)
        x = x + self.ffn(x)
        return x.transpose(1, 2).reshape(b, c, h, w)


@register_model("guidedecoder")
class GuideDecoderNet(SegmentationModel):
    """U-Net whose decoder stages are guided by frozen-encoder text (re-implementation, see module docstring).

    Args:
        config: a :class:`GuideDecoderConfig`.

    Returns (forward):
        ``B x 1 x H x W`` lesion logits.

    Example:
        >>> cfg = GuideDecoderConfig(base_width=4, text_model="tiny-random-bert", fusion_dim=16, fusion_heads=2)
        >>> GuideDecoderNet(cfg).eval()(torch.randn(1, 3, 32, 32), text=["Skin lesion."]).shape
        torch.Size([1, 1, 32, 32])
    """

    config_class = GuideDecoderConfig

    def __init__(self, config: GuideDecoderConfig | None = None) -> None:
        config = config or GuideDecoderConfig()
        super().__init__(config)
        self.encoder = build_encoder(config)
        self.decoder = UNetDecoder(self.encoder.out_channels, self.encoder.strides, config.decoder_channels,
                                   config.bilinear)
        self.text_branch = build_text_branch(config)
        self.guides = nn.ModuleDict({
            str(scale): GuideLayer(self.decoder.channels[scale], config.fusion_dim, config.fusion_dim,
                                   config.fusion_heads, scale in config.self_attention_scales)
            for scale in config.guide_scales
        })
        self.head = nn.Conv2d(self.decoder.out_channels, 1, 1)
        if config.freeze_encoder_bn:
            freeze_batchnorm(self.encoder)

    def external_state_prefixes(self) -> tuple[str, ...]:
        return ("text_branch.encoder.",) if self.config.freeze_text else ()

    def forward(self, image: Tensor, text_features: Tensor | None = None, text_mask: Tensor | None = None,
                text: Sequence[str] | None = None) -> Tensor:
        """Segment ``image`` guided by text: sentences, precomputed encoder features + mask, or neither (neutral)."""
        self.check_input(image)
        tokens, mask = self.text_branch(image.shape[0], text, text_features, text_mask)

        def guide(x: Tensor, stride: int) -> Tensor:  # the decoder calls this after every stage
            key = str(stride)
            return self.guides[key](x, tokens, mask) if key in self.guides else x

        return self.head(self.decoder(self.encoder(image), self.encoder.strides, guide))
