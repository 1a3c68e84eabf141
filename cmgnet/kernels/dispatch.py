"""Choose an implementation for each attention op (the one switch, like timm's ``fused_attn``).

Backends:

* ``"auto"`` (default): PyTorch everywhere (SDPA for the softmax attentions), except a Triton
  kernel for CUDA tensors whose (GPU, shape class) the benchmark-derived table in
  ``dispatch_table.py`` lists as faster. That table ships empty (no GPU numbers yet).
* ``"sdpa"``: always PyTorch, with ``torch.nn.functional.scaled_dot_product_attention``.
* ``"reference"``: the written-out math (used for export debugging and as test oracle).
* ``"triton"``: force the Triton kernels wherever one supports the shape (tests,
  benchmarks). CPU tensors then need Triton's interpreter (``TRITON_INTERPRET=1`` set before
  Triton is imported).

Select with :func:`set_backend`, the :func:`use_backend` context manager, or the
``CMGNET_ATTENTION`` environment variable. Triton is optional: without it every backend but
``"triton"`` works, and ``"triton"`` says what to install.

Kernels run eagerly only: under ``torch.compile``, tracing or export the PyTorch path is taken
(the compiler fuses that itself, and exported graphs stay portable).

Shape classes (:func:`shape_key`) round every dimension up to a power of two, so a training
batch of 24 uses the row measured at 32, and an unmeasured shape stays on PyTorch.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import os
from collections.abc import Callable, Iterator, Sequence
from types import ModuleType

import torch
from torch import Tensor

from . import dispatch_table, reference

BACKENDS = ("auto", "sdpa", "reference", "triton")
HAS_TRITON = importlib.util.find_spec("triton") is not None
MAX_TILE = 128  # the kernels keep a whole axis line / head / query set of up to this many in one tile


def _require_triton() -> None:
    if not HAS_TRITON:
        raise RuntimeError("attention backend 'triton' needs the triton package: pip install 'cmgnet[kernels]'")


def _checked(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {BACKENDS}")
    return name


def set_backend(name: str) -> None:
    """Set the attention backend process-wide (``"triton"`` needs Triton installed)."""
    global _backend
    if _checked(name) == "triton":
        _require_triton()
    _backend = name


def get_backend() -> str:
    """Return the active attention backend name."""
    return _backend


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Temporarily switch the attention backend."""
    global _backend
    previous = _backend
    set_backend(name)
    try:
        yield
    finally:
        _backend = previous


# From the environment without the Triton check: importing must work without Triton; a forced
# "triton" backend then fails at the first kernel call, with the install hint.
_backend = _checked(os.environ.get("CMGNET_ATTENTION", "auto"))


def _fused() -> bool:
    return _backend != "reference"


def _bucket(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def shape_key(op: str, dtype: torch.dtype, **dims: int) -> str:
    """Shape class of one op call, e.g. ``"axial_hv/bfloat16/b32/c1024/heads8/h16/w16"``.

    Every dimension is rounded up to a power of two. The benchmark writes these keys into the
    dispatch table and the dispatcher looks them up, so both use this one function.
    """
    return "/".join([op, str(dtype).removeprefix("torch."), *(f"{k}{_bucket(v)}" for k, v in dims.items())])


def axial_key(packed_shape: Sequence[int], dtype: torch.dtype, heads: int, axes: str) -> str:
    """Shape class of axial attention on ``B x 3C x h x w`` maps; ``axes``: ``"hv"`` (both), ``"h"`` or ``"v"``."""
    b, c3, h, w = packed_shape
    return shape_key(f"axial_{axes}", dtype, b=b, c=c3 // 3, heads=heads, h=h, w=w)


def gated_cross_key(image: Tensor, q: Tensor, k: Tensor) -> str:
    """Shape class of :func:`gated_cross_attention`."""
    b, heads, n, d = q.shape
    return shape_key("gated_cross", q.dtype, b=b, n=n, c=image.shape[-1], heads=heads, d=d, l=k.shape[2])


def decode_key(q: Tensor, k: Tensor) -> str:
    """Shape class of :func:`attention` with few queries (the split-key kernel)."""
    b, heads, m, d = q.shape
    return shape_key("decode", q.dtype, b=b, heads=heads, m=m, n=k.shape[2], d=d)


@functools.cache
def _listed(device_index: int) -> frozenset[str]:
    return frozenset(dispatch_table.TABLE.get(torch.cuda.get_device_name(device_index), {}))


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _use_kernel(key: Callable[[], str], supported: bool, device: torch.device) -> bool:
    """Whether this call runs a Triton kernel (``key`` is evaluated only when it matters)."""
    if not supported or torch.jit.is_tracing() or torch.compiler.is_compiling():
        return False
    if _backend == "triton":
        _require_triton()
        if device.type != "cuda" and not _interpreting():
            raise RuntimeError(f"attention backend 'triton' on {device.type} tensors needs Triton's interpreter: "
                               "set TRITON_INTERPRET=1 before triton is imported")
        return True
    if _backend != "auto" or device.type != "cuda" or not HAS_TRITON:
        return False
    return key() in _listed(device.index if device.index is not None else torch.cuda.current_device())


def _triton(module: str) -> ModuleType:
    """Import a kernel module on first use (Triton is optional)."""
    _require_triton()
    return importlib.import_module(f".{module}", __package__)


def attention(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
    """Multi-head attention, ``B x H x N x d`` in and out; ``key_padding_mask`` True = keep.

    Few queries over many keys (CMFM's text -> image attention, text self-attention) can run
    the split-key Triton kernel; every other shape uses PyTorch.
    """
    supported = q.shape[2] <= MAX_TILE and q.shape[3] <= MAX_TILE
    if _use_kernel(lambda: decode_key(q, k), supported, q.device):
        return _triton("triton_decode").attention(q, k, v, key_padding_mask)
    if _fused():
        return reference.attention_sdpa(q, k, v, key_padding_mask)
    return reference.attention_math(q, k, v, key_padding_mask)


def multi_axis_attention(rows: Tensor | None, cols: Tensor | None, heads: int) -> tuple[Tensor | None, Tensor | None]:
    """MASA's row and column attention on packed ``B x 3C x h x w`` q/k/v maps, one launch for both.

    ``rows`` attends along rows (``w`` tokens), ``cols`` along columns (``h`` tokens); q, k, v
    are stacked on channels as a 1x1 convolution to ``3C`` produces them; either may be
    ``None`` to skip that axis. Returns the ``B x C x h x w`` outputs.
    """
    ref = rows if rows is not None else cols
    _, c3, h, w = ref.shape
    supported = max(h, w) <= MAX_TILE and c3 // 3 // heads <= MAX_TILE
    axes = ("h" if rows is not None else "") + ("v" if cols is not None else "")
    if _use_kernel(lambda: axial_key(ref.shape, ref.dtype, heads, axes), supported, ref.device):
        return _triton("triton_axial").axial_attention(rows, cols, heads)
    return reference.multi_axis_attention(rows, cols, heads, fused=_fused())


def axial_attention(q: Tensor, k: Tensor, v: Tensor, heads: int, axis: str) -> Tensor:
    """Row (``"horizontal"``) or column (``"vertical"``) attention on ``B x C x h x w`` maps.

    Separate q/k/v maps; :func:`multi_axis_attention` takes them packed, which the kernel
    reads without any copy.
    """
    if axis not in ("horizontal", "vertical"):
        raise ValueError(f"axis must be 'horizontal' or 'vertical', got {axis!r}")
    b, c, h, w = q.shape
    supported = max(h, w) <= MAX_TILE and c // heads <= MAX_TILE
    if _use_kernel(lambda: axial_key((b, 3 * c, h, w), q.dtype, heads, axis[0]), supported, q.device):
        qkv = torch.cat((q, k, v), dim=1)
        horizontal = axis == "horizontal"
        rows, cols = _triton("triton_axial").axial_attention(qkv if horizontal else None, None if horizontal else qkv,
                                                             heads)
        return rows if horizontal else cols
    return reference.axial_attention(q, k, v, heads, axis, fused=_fused())


def gated_cross_attention(
    image: Tensor,
    image_normed: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_padding_mask: Tensor | None,
    out_weight: Tensor,
    out_bias: Tensor,
    gate_weight: Tensor | None = None,
    gate_bias: Tensor | None = None,
    text_pooled: Tensor | None = None,
) -> Tensor:
    """CMFM image -> text attention with its gate and blend (CMG-Net eqs. 4-6).

    Args:
        image: ``B x N x C`` image tokens, the stream that is blended (any strides).
        image_normed: the normalised tokens the queries and the gate read.
        q: ``B x H x N x d`` image queries; ``k``, ``v``: ``B x H x L x d`` text keys/values.
        key_padding_mask: ``B x L``, True for real text tokens.
        out_weight, out_bias: the attention's output projection (``C x H*d``, ``C``).
        gate_weight, gate_bias: the gate ``Linear(2C + D, 1)`` over ``[A; image_normed;
            text_pooled]``; ``None`` fixes ``alpha = 0.5``.
        text_pooled: ``B x D`` pooled text the gate reads.

    Returns:
        ``alpha * image + (1 - alpha) * A``, ``B x N x C``.
    """
    supported = k.shape[2] <= MAX_TILE and q.shape[3] <= MAX_TILE
    if _use_kernel(lambda: gated_cross_key(image, q, k), supported, q.device):
        op = _triton("triton_gated_cross").gated_cross_attention
    else:
        op = functools.partial(reference.gated_cross_attention, fused=_fused())
    return op(image, image_normed, q, k, v, key_padding_mask, out_weight, out_bias, gate_weight, gate_bias, text_pooled)


def channel_attention(q: Tensor, k: Tensor, v: Tensor, heads: int, temperature: Tensor) -> Tensor:
    """Transposed channel attention on ``B x C x h x w`` maps (PyTorch: its logits are only ``C x C``)."""
    return reference.channel_attention(q, k, v, heads, temperature)
