"""PyTorch reference implementations of the attention ops (the ground truth for kernels).

Shapes follow the model's layout so a kernel can replace an op without any reshaping
around it:

* ``attention``: ``q`` is ``B x H x Nq x d``, ``k``/``v`` are ``B x H x Nk x d``;
  ``key_padding_mask`` is ``B x Nk`` with True for real tokens.
* ``axial_attention``: ``q``/``k``/``v`` are ``B x C x h x w`` feature maps, heads split C.
* ``channel_attention``: transposed (channel) attention of Restormer's MDTA
  (Zamir et al., CVPR 2022) on ``B x C x h x w`` maps.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def attention_math(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
    """Softmax attention written out (timm's non-fused path); exact and export friendly."""
    scores = (q * (1.0 / math.sqrt(q.shape[-1]))) @ k.transpose(-2, -1)
    if key_padding_mask is not None:
        scores = scores.masked_fill(~key_padding_mask[:, None, None, :], float("-inf"))
    return scores.softmax(dim=-1) @ v


def attention_sdpa(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
    """The same op through PyTorch's fused ``scaled_dot_product_attention``."""
    mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def to_axial_sequences(x: Tensor, heads: int, axis: str) -> Tensor:
    """``B x C x h x w`` -> ``(B*lines) x heads x length x d`` sequences along ``axis``.

    ``axis="horizontal"``: every row is a sequence of ``w`` tokens; ``"vertical"``: every column.
    """
    b, c, h, w = x.shape
    x = x.reshape(b, heads, c // heads, h, w)
    if axis == "horizontal":
        return x.permute(0, 3, 1, 4, 2).reshape(b * h, heads, w, c // heads)
    if axis == "vertical":
        return x.permute(0, 4, 1, 3, 2).reshape(b * w, heads, h, c // heads)
    raise ValueError(f"axis must be 'horizontal' or 'vertical', got {axis!r}")


def from_axial_sequences(y: Tensor, shape: torch.Size, heads: int, axis: str) -> Tensor:
    """Inverse of :func:`to_axial_sequences`."""
    b, c, h, w = shape
    if axis == "horizontal":
        return y.reshape(b, h, heads, w, c // heads).permute(0, 2, 4, 1, 3).reshape(b, c, h, w)
    return y.reshape(b, w, heads, h, c // heads).permute(0, 2, 4, 3, 1).reshape(b, c, h, w)


def axial_attention(q: Tensor, k: Tensor, v: Tensor, heads: int, axis: str, fused: bool = True) -> Tensor:
    """Multi-head attention along one spatial axis of ``B x C x h x w`` maps."""
    attn = attention_sdpa if fused else attention_math
    seqs = [to_axial_sequences(t, heads, axis) for t in (q, k, v)]
    return from_axial_sequences(attn(*seqs), q.shape, heads, axis)


def channel_attention(q: Tensor, k: Tensor, v: Tensor, heads: int, temperature: Tensor) -> Tensor:
    """Transposed attention: channels are tokens of dim ``h*w`` (Restormer MDTA).

    Q and K are L2-normalised over space so the logits are cosine similarities scaled by a
    learned per-head ``temperature`` (``heads x 1 x 1``); cost is linear in ``h*w``.
    """
    b, c, h, w = q.shape
    q, k, v = (t.reshape(b, heads, c // heads, h * w) for t in (q, k, v))
    q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    attn = ((q @ k.transpose(-2, -1)) * temperature).softmax(dim=-1)
    return (attn @ v).reshape(b, c, h, w)


def multi_axis_attention(rows: Tensor | None, cols: Tensor | None, heads: int,
                         fused: bool = True) -> tuple[Tensor | None, Tensor | None]:
    """MASA's horizontal and vertical branches on packed ``B x 3C x h x w`` q/k/v maps.

    ``rows`` attends along rows, ``cols`` along columns; either may be ``None`` (skipped).
    """
    return tuple(
        None if qkv is None else axial_attention(*qkv.chunk(3, dim=1), heads, axis, fused=fused)
        for qkv, axis in ((rows, "horizontal"), (cols, "vertical"))
    )


def gated_cross_attention(
    image: Tensor,
    image_normed: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_padding_mask: Tensor | None,
    out_weight: Tensor,
    out_bias: Tensor,
    gate_weight: Tensor | None,
    gate_bias: Tensor | None,
    text_pooled: Tensor | None,
    fused: bool = True,
) -> Tensor:
    """CMFM image -> text attention, gate and blend (CMG-Net eqs. 4-6).

    ``A = out_proj(softmax(q k^T / sqrt d) v)`` with ``q``: ``B x H x N x d`` image queries and
    ``k``/``v``: ``B x H x L x d`` text keys/values (``key_padding_mask``: ``B x L``, True = real),
    ``alpha = sigmoid(gate([A; image_normed; text_pooled]))`` per pixel (``gate_weight`` ``None``:
    fixed 0.5), and the result ``alpha * image + (1 - alpha) * A`` (``B x N x C``).
    """
    attn = attention_sdpa if fused else attention_math
    y = attn(q, k, v, key_padding_mask)
    b, _, n, _ = y.shape
    a_cross = F.linear(y.transpose(1, 2).reshape(b, n, -1), out_weight, out_bias)
    if gate_weight is None:
        alpha = image.new_full((), 0.5)
    else:
        pooled = text_pooled.unsqueeze(1).expand(-1, n, -1)
        alpha = torch.sigmoid(F.linear(torch.cat([a_cross, image_normed, pooled], dim=-1), gate_weight, gate_bias))
    return alpha * image + (1 - alpha) * a_cross
