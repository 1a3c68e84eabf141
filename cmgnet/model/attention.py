"""Multi-head (cross-)attention layer whose math runs through ``cmgnet.kernels``."""

from __future__ import annotations

from torch import Tensor, nn

from cmgnet import kernels


class MultiHeadAttention(nn.Module):
    """Multi-head attention with separate query and key/value widths.

    Args:
        query_dim: width of the query tokens.
        kv_dim: width of the key/value tokens (``None``: same as ``query_dim``).
        inner_dim: attention width, split over ``heads``.
        heads: number of heads.
        out_dim: output width (``None``: ``query_dim``).

    Returns (forward):
        ``B x Nq x out_dim``.
    """

    def __init__(self, query_dim: int, kv_dim: int | None, inner_dim: int, heads: int, out_dim: int | None = None):
        super().__init__()
        if inner_dim % heads:
            raise ValueError(f"inner_dim {inner_dim} is not divisible by heads {heads}")
        kv_dim = kv_dim or query_dim
        self.heads = heads
        self.q = nn.Linear(query_dim, inner_dim)
        self.kv = nn.Linear(kv_dim, 2 * inner_dim)
        self.out = nn.Linear(inner_dim, out_dim or query_dim)

    def split_heads(self, x: Tensor) -> Tensor:
        """``B x N x inner`` -> ``B x heads x N x d``."""
        b, n, d = x.shape
        return x.reshape(b, n, self.heads, d // self.heads).transpose(1, 2)

    def forward(self, x: Tensor, context: Tensor | None = None, key_padding_mask: Tensor | None = None) -> Tensor:
        context = x if context is None else context
        k, v = self.kv(context).chunk(2, dim=-1)
        y = kernels.attention(self.split_heads(self.q(x)), self.split_heads(k), self.split_heads(v), key_padding_mask)
        b, _, n, _ = y.shape
        return self.out(y.transpose(1, 2).reshape(b, n, -1))


class FeedForward(nn.Sequential):
    """Pre-norm transformer MLP: LayerNorm -> Linear -> GELU -> Linear."""

    def __init__(self, dim: int, ratio: float = 2.0) -> None:
        hidden = int(dim * ratio)
        super().__init__(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
