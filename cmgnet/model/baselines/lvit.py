"""LViT-style network: a CNN U-Net with a text-carrying ViT branch beside it (a re-implementation).

After Li, Li, Zhu, Zhou, Li, Li, Gao, Zhou & Zheng, "LViT: Language meets Vision Transformer in
Medical Image Segmentation", IEEE TMI 43(1), 2024 (online 2023). The idea kept: text is
embedded into a ViT branch that runs beside the CNN encoder: each encoder map is patch-embedded
onto one token grid (patch side = bottleneck stride / map stride, so every level has the same
tokens, as LViT's 14 x 14) and added to the ViT stream, whose output at that level is
reconstructed to the map's resolution and added to the skip the U-Net decoder reads. This is
**not** the authors' code: it is built from the project's encoders and U-Net decoder, text branch
(:class:`~cmgnet.model.text_branch.TextBranch`) and attention op
(:class:`~cmgnet.model.attention.MultiHeadAttention`, i.e. ``cmgnet.kernels``).

Where it differs from the original:

* text tokens (frozen BERT-family features, projected) join the ViT sequence as extra tokens
  with a padding mask, so image tokens attend to them (LViT adds a conv-processed text
  embedding to the first level's patch embedding instead);
* one ViT width (``fusion_dim``) at every level, where LViT widens it with the CNN's channels;
  no Up-ViT pass before the reconstruction and no pixel-level attention (PLAM) on the skips;
* encoder: the project's from-scratch U-Net encoder (or an ImageNet EfficientNet-Lite);
  text encoder: the project's BERT-family encoder (default MiniLM), not BERT-base;
* supervised training only: LViT's exponential pseudo-labels and LV (language-vision) loss for
  semi-supervised training are not implemented; no pretrained weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..attention import FeedForward, MultiHeadAttention
from ..base import SegmentationModel, freeze_batchnorm, register_model
from ..unet import UNetDecoder, build_encoder
from ._common import LearnedPositions, TextGuidedConfig, build_text_branch, check_scales


@dataclass
class LViTConfig(TextGuidedConfig):
    """LViT-style hyper-parameters (U-Net and text fields as in CMG-Net's config).

    Args:
        vit_scales: strides of the encoder maps that feed the ViT branch and receive its
            reconstruction (empty: every map but the bottleneck, LViT's four levels).
        vit_layers: transformer layers of the ViT branch per exchanged scale.
        pos_grid: side of the positional-embedding table (``image_size / 2**depth`` at the
            training size: 16 for 256 px), resized to the input's token grid.
    """

    vit_scales: tuple[int, ...] = ()
    vit_layers: int = 1
    pos_grid: int = 16

    def __post_init__(self) -> None:
        super().__post_init__()
        self.vit_scales = check_scales("vit_scales", self.vit_scales, self.scales)
        if self.vit_layers < 1:
            raise ValueError(f"vit_layers must be at least 1, got {self.vit_layers}")


class JointLayer(nn.Module):
    """Pre-norm transformer layer over ``[image tokens; text tokens]`` with text padding masked."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = MultiHeadAttention(dim, None, dim, heads)
        self.ffn = FeedForward(dim)

    def forward(self, tokens: Tensor, mask: Tensor) -> Tensor:
        tokens = tokens + self.attn(self.norm(tokens), key_padding_mask=mask)
        return tokens + self.ffn(tokens)


@register_model("lvit")
class LViTNet(SegmentationModel):
    """CNN U-Net + a ViT branch carrying the text tokens, feeding every skip (re-implementation).

    Args:
        config: an :class:`LViTConfig`.

    Returns (forward):
        ``B x 1 x H x W`` lesion logits.

    Example:
        >>> cfg = LViTConfig(base_width=4, text_model="tiny-random-bert", fusion_dim=16, fusion_heads=2)
        >>> LViTNet(cfg).eval()(torch.randn(1, 3, 32, 48), text=["Skin lesion."]).shape
        torch.Size([1, 1, 32, 48])
    """

    config_class = LViTConfig

    def __init__(self, config: LViTConfig | None = None) -> None:
        config = config or LViTConfig()
        super().__init__(config)
        dim = config.fusion_dim
        self.encoder = build_encoder(config)
        self.decoder = UNetDecoder(self.encoder.out_channels, self.encoder.strides, config.decoder_channels,
                                   config.bilinear)
        self.text_branch = build_text_branch(config)
        self.text_type = nn.Parameter(torch.zeros(1, 1, dim))  # tells text tokens from image tokens
        self.positions = LearnedPositions(dim, config.pos_grid)
        channels = dict(zip(self.encoder.strides, self.encoder.out_channels))
        bottleneck = self.encoder.strides[-1]
        scales = config.vit_scales or self.encoder.strides[:-1]
        if bad := [s for s in scales if s not in channels]:
            raise ValueError(f"vit_scales {bad} are not strides of the {config.encoder!r} encoder {list(channels)}")
        self.vit_strides = tuple(sorted(scales))
        keys = [str(s) for s in self.vit_strides]
        # A patch of (bottleneck / s) pixels puts every level on the same token grid.
        self.embed = nn.ModuleDict({k: nn.Conv2d(channels[int(k)], dim, bottleneck // int(k), bottleneck // int(k))
                                    for k in keys})
        self.vit = nn.ModuleDict({
            k: nn.ModuleList(JointLayer(dim, config.fusion_heads) for _ in range(config.vit_layers)) for k in keys
        })
        self.reconstruct = nn.ModuleDict({k: nn.Conv2d(dim, channels[int(k)], 1) for k in keys})
        self.head = nn.Conv2d(self.decoder.out_channels, 1, 1)
        if config.freeze_encoder_bn:
            freeze_batchnorm(self.encoder)

    def external_state_prefixes(self) -> tuple[str, ...]:
        return ("text_branch.encoder.",) if self.config.freeze_text else ()

    def forward(self, image: Tensor, text_features: Tensor | None = None, text_mask: Tensor | None = None,
                text: Sequence[str] | None = None) -> Tensor:
        """Segment ``image`` guided by text: sentences, precomputed encoder features + mask, or neither (neutral)."""
        self.check_input(image)
        text_tokens, mask = self.text_branch(image.shape[0], text, text_features, text_mask)
        text_tokens = text_tokens + self.text_type
        feats = self.encoder(image)
        strides = self.encoder.strides
        vit = None
        for stride in self.vit_strides:  # shallow to deep, as LViT's Down-ViT levels
            key, i = str(stride), strides.index(stride)
            patches = self.embed[key](feats[i])
            b, d, gh, gw = patches.shape
            patches = patches.flatten(2).transpose(1, 2)
            vit = patches + self.positions(gh, gw) if vit is None else vit + patches
            n = vit.shape[1]
            tokens = torch.cat([vit, text_tokens], dim=1)
            full_mask = torch.cat([torch.ones(b, n, dtype=torch.bool, device=mask.device), mask], dim=1)
            for layer in self.vit[key]:
                tokens = layer(tokens, full_mask)
            vit, text_tokens = tokens[:, :n], tokens[:, n:]
            grid = self.reconstruct[key](vit.transpose(1, 2).reshape(b, d, gh, gw))
            feats[i] = feats[i] + F.interpolate(grid, size=feats[i].shape[-2:], mode="bilinear", align_corners=False)
        return self.head(self.decoder(feats, strides))
