"""Multi-Axis Self-Attention (MASA), CMG-Net paper section 3.2, eqs. (1)-(2).

Three attention branches run on the bottleneck map ``X: B x C x h x w``, each with its own
Q/K/V projections: horizontal (each row a sequence of ``w`` tokens), vertical (each column
a sequence of ``h`` tokens) and channel (the ``C`` channels are tokens of dim ``h*w``, as in
Restormer's transposed attention). A gate computed from the input (global average pool ->
MLP -> softmax over the three axes) weights each branch per sample; the weighted outputs
are concatenated (3C), fused by a 1x1 conv and added back to the input before a norm.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from cmgnet import kernels

AXES = ("horizontal", "vertical", "channel")


class AxisGate(nn.Sequential):
    """Global average pool -> MLP -> softmax: per-sample weights of the three axes (``B x 3``)."""

    def __init__(self, channels: int, reduction: int = 4) -> None:
        hidden = max(channels // reduction, 8)
        super().__init__(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, len(AXES)), nn.Softmax(dim=-1),
        )


class MultiAxisSelfAttention(nn.Module):
    """MASA block.

    Args:
        channels: channels ``C`` of the input map (divisible by ``heads``).
        heads: attention heads per branch.

    Returns (forward):
        a map of the input's shape.

    Example:
        >>> masa = MultiAxisSelfAttention(64, heads=4)
        >>> masa(torch.randn(2, 64, 16, 12)).shape
        torch.Size([2, 64, 16, 12])
    """

    def __init__(self, channels: int, heads: int = 4) -> None:
        super().__init__()
        if channels % heads:
            raise ValueError(f"MASA channels {channels} not divisible by heads {heads}")
        self.heads = heads
        # Depthwise conv as positional encoding: attention alone is blind to token order.
        self.pos = nn.Conv2d(channels, channels, 3, padding=1, groups=channels)
        self.qkv = nn.ModuleDict({axis: nn.Conv2d(channels, 3 * channels, 1) for axis in AXES})
        self.temperature = nn.Parameter(torch.ones(heads, 1, 1))
        self.gate = AxisGate(channels)
        self.fuse = nn.Conv2d(3 * channels, channels, 1)
        self.norm = nn.BatchNorm2d(channels)

    def forward(self, x: Tensor) -> Tensor:
        y = x + self.pos(x)
        weights = self.gate(y)
        qkv = [self.qkv[axis](y) for axis in AXES]
        # Rows and columns in one op on the packed B x 3C x h x w projections (a kernel reads them in place).
        rows, cols = kernels.multi_axis_attention(qkv[0], qkv[1], self.heads)
        channels = kernels.channel_attention(*qkv[2].chunk(3, dim=1), self.heads, self.temperature)
        outs = [out * weights[:, i, None, None, None] for i, out in enumerate((rows, cols, channels))]
        return self.norm(x + self.fuse(torch.cat(outs, dim=1)))
