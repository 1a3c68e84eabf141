"""Cross-Modal Feature Fusion Module (CMFM), CMG-Net paper section 3.4, eqs. (4)-(6).

At one scale, image tokens ``F_I`` (``B x N x C``, ``N = h*w``) and projected text tokens
``F_T`` (``B x L x D``) pass through stacked pre-norm layers. Each layer runs

1. intra-modal self-attention (text always; image tokens only where ``N`` is small),
2. dual-stream cross-attention: text -> image ``T' = softmax(Q_T K_I^T / sqrt d) V_I`` and
   image -> text ``A_cross = softmax(Q_I K_T^T / sqrt d) V_T`` (text padding masked),
3. the learned gate ``alpha = sigmoid(f_alpha([A_cross; F_I; pool(T')]))`` per pixel and the
   blend ``F_fusion = alpha * F_I + (1 - alpha) * A_cross``,
4. a feed-forward network on each stream.

The image -> text attention of step 2 and the gate and blend of step 3 are one op,
``cmgnet.kernels.gated_cross_attention``, so a fused kernel can run them where it is faster.

``TextAdditionFusion`` is the ``cmfm=False`` ablation: pooled text added to the map.
"""

from __future__ import annotations

from torch import Tensor, nn

from cmgnet import kernels

from .attention import FeedForward, MultiHeadAttention


def masked_mean(tokens: Tensor, mask: Tensor) -> Tensor:
    """Mean over real tokens: ``B x L x D`` with ``B x L`` mask -> ``B x D``."""
    weights = mask.to(tokens.dtype).unsqueeze(-1)
    return (tokens * weights).sum(1) / weights.sum(1).clamp_min(1.0)


class CrossModalLayer(nn.Module):
    """One CMFM layer (steps 1-4 of the module docstring).

    Args:
        channels: image width ``C``.
        text_dim: text width ``D``.
        inner_dim: attention width (split over ``heads``).
        heads: attention heads.
        image_self_attention: add image self-attention (quadratic in ``N``: bottleneck only).
        learned_gate: learn ``alpha``; ``False`` fixes it at 0.5 (the ``alpha`` ablation).
        update_text: refine the text stream for a following layer (the last layer's would be unused).
    """

    def __init__(
        self,
        channels: int,
        text_dim: int,
        inner_dim: int,
        heads: int,
        image_self_attention: bool,
        learned_gate: bool,
        update_text: bool = True,
    ) -> None:
        super().__init__()
        self.text_norm = nn.LayerNorm(text_dim)
        self.text_self = MultiHeadAttention(text_dim, None, inner_dim, heads)
        if image_self_attention:
            self.image_self_norm = nn.LayerNorm(channels)
            self.image_self = MultiHeadAttention(channels, None, inner_dim, heads)
        self.image_cross_norm = nn.LayerNorm(channels)
        self.text_cross_norm = nn.LayerNorm(text_dim)
        self.image_to_text = MultiHeadAttention(channels, text_dim, inner_dim, heads, out_dim=channels)
        # T' feeds the gate and the next layer's text; a last layer with a fixed gate needs neither.
        needs_t_prime = learned_gate or update_text
        self.text_to_image = MultiHeadAttention(text_dim, channels, inner_dim, heads, text_dim) if needs_t_prime else None
        self.gate = nn.Linear(2 * channels + text_dim, 1) if learned_gate else None
        self.image_ffn = FeedForward(channels)
        self.text_ffn = FeedForward(text_dim) if update_text else None

    def forward(self, image: Tensor, text: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        text = text + self.text_self(self.text_norm(text), key_padding_mask=mask)
        if hasattr(self, "image_self"):
            image = image + self.image_self(self.image_self_norm(image))
        img, txt = self.image_cross_norm(image), self.text_cross_norm(text)
        attn = self.image_to_text
        k, v = attn.kv(txt).chunk(2, dim=-1)
        q, k, v = attn.split_heads(attn.q(img)), attn.split_heads(k), attn.split_heads(v)
        t_prime = self.text_to_image(txt, img) if self.text_to_image is not None else None
        # Image -> text attention, gate and blend as one op, so a kernel can fuse them.
        gate = (self.gate.weight, self.gate.bias, masked_mean(t_prime, mask)) if self.gate is not None else (None,) * 3
        image = kernels.gated_cross_attention(image, img, q, k, v, mask, attn.out.weight, attn.out.bias, *gate)
        if self.text_ffn is not None:
            text = text + t_prime
            text = text + self.text_ffn(text)
        return image + self.image_ffn(image), text


class CrossModalFusion(nn.Module):
    """CMFM at one scale: ``layers`` stacked :class:`CrossModalLayer` on a feature map.

    Returns (forward):
        the fused ``B x C x h x w`` map.

    Example:
        >>> cmfm = CrossModalFusion(32, text_dim=16, inner_dim=16, heads=2, layers=1)
        >>> cmfm(torch.randn(2, 32, 8, 8), torch.randn(2, 5, 16), torch.ones(2, 5, dtype=torch.bool)).shape
        torch.Size([2, 32, 8, 8])
    """

    def __init__(
        self,
        channels: int,
        text_dim: int,
        inner_dim: int,
        heads: int,
        layers: int,
        image_self_attention: bool = False,
        learned_gate: bool = True,
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            CrossModalLayer(channels, text_dim, inner_dim, heads, image_self_attention, learned_gate, i < layers - 1)
            for i in range(layers)
        )

    def forward(self, feature_map: Tensor, text: Tensor, mask: Tensor) -> Tensor:
        b, c, h, w = feature_map.shape
        image = feature_map.flatten(2).transpose(1, 2)
        for layer in self.layers:
            image, text = layer(image, text, mask)
        return image.transpose(1, 2).reshape(b, c, h, w)


class TextAdditionFusion(nn.Module):
    """Ablation ``cmfm=False``: add the projected, pooled text vector to every pixel."""

    def __init__(self, channels: int, text_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(text_dim, channels)

    def forward(self, feature_map: Tensor, text: Tensor, mask: Tensor) -> Tensor:
        return feature_map + self.proj(masked_mean(text, mask))[:, :, None, None]
