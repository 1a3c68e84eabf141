"""Axial (row / column) multi-head attention read and written in place on ``B x C x h x w`` maps.

MASA's horizontal and vertical branches attend along rows (``w`` tokens) and columns (``h``
tokens) of the bottleneck map. The PyTorch path permutes each of q, k, v into
``(B * lines) x heads x length x d`` sequences and the result back (eight copies per axis)
around an attention whose sequences (16-64 tokens) are far too short for a generic flash
kernel to shine. Here one program owns one line of one head: it gathers that line's q, k, v
straight from the packed ``B x 3C x h x w`` output of the 1x1 q/k/v convolution with strided
loads, keeps the whole ``length x length`` score tile on chip (no online softmax needed) and
writes its output line into a ``B x C x h x w`` map. Both axes run in one launch: programs
``[0, h)`` take rows, programs ``[h, h + w)`` take columns.

The backward recomputes the probabilities from q and k (FlashAttention-2, Dao 2023) and
writes dq, dk, dv into one packed ``B x 3C x h x w`` gradient, so the q/k/v convolution's
backward sees a single tensor and no ``cat``.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from .triton_common import LOG2E, autotune, block, dot_precision, softmax_grad, softmax_rows

_CONFIGS = [triton.Config({}, num_warps=w, num_stages=s) for w in (2, 4, 8) for s in (1, 2)]
_INTERPRET_CONFIG = triton.Config({}, num_warps=4)


@triton.jit
def _line_offsets(line_off, tok_stride, chan_stride, length, D, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.arange(0, BLOCK_T)
    d = tl.arange(0, BLOCK_D)
    offs = line_off + t[:, None] * tok_stride + d[None, :] * chan_stride
    return offs, (t[:, None] < length) & (d[None, :] < D), t < length


@triton.jit
def _line_fwd(qkv, out, in_off, in_tok, out_off, out_tok, length, D, s_c, kv_shift, out_chan, qk_scale,
              BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    src, mask, tok_ok = _line_offsets(in_off, in_tok, s_c, length, D, BLOCK_T, BLOCK_D)
    q = tl.load(qkv + src, mask=mask, other=0.0)
    k = tl.load(qkv + kv_shift + src, mask=mask, other=0.0)
    v = tl.load(qkv + 2 * kv_shift + src, mask=mask, other=0.0)
    p = softmax_rows(tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale, tok_ok)
    o = tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    dst, _, _ = _line_offsets(out_off, out_tok, out_chan, length, D, BLOCK_T, BLOCK_D)
    tl.store(out + dst, o.to(out.dtype.element_ty), mask=mask)


@triton.jit
def _line_bwd(qkv, dout, dqkv, in_off, in_tok, g_off, dq_off, g_tok, length, D, s_c, kv_shift, g_chan, dkv_shift,
              qk_scale, scale, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    src, mask, tok_ok = _line_offsets(in_off, in_tok, s_c, length, D, BLOCK_T, BLOCK_D)
    q = tl.load(qkv + src, mask=mask, other=0.0)
    k = tl.load(qkv + kv_shift + src, mask=mask, other=0.0)
    v = tl.load(qkv + 2 * kv_shift + src, mask=mask, other=0.0)
    g, _, _ = _line_offsets(g_off, g_tok, g_chan, length, D, BLOCK_T, BLOCK_D)
    do = tl.load(dout + g, mask=mask, other=0.0)
    p = softmax_rows(tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale, tok_ok)
    # Padded query rows have do = 0, hence dp = ds = 0: they add nothing to dk and dv.
    ds = softmax_grad(p, tl.dot(do, tl.trans(v), input_precision=PRECISION))
    dv = tl.dot(tl.trans(p).to(do.dtype), do, input_precision=PRECISION)
    dq = tl.dot(ds.to(k.dtype), k, input_precision=PRECISION) * scale
    dk = tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=PRECISION) * scale
    dst, _, _ = _line_offsets(dq_off, g_tok, g_chan, length, D, BLOCK_T, BLOCK_D)
    dtype = dqkv.dtype.element_ty
    tl.store(dqkv + dst, dq.to(dtype), mask=mask)
    tl.store(dqkv + dkv_shift + dst, dk.to(dtype), mask=mask)
    tl.store(dqkv + 2 * dkv_shift + dst, dv.to(dtype), mask=mask)


@autotune(_CONFIGS, _INTERPRET_CONFIG, key=["H", "W", "C"])
@triton.jit
def _axial_fwd_kernel(
    rows, cols, out_rows, out_cols, n_rows, heads, H, W, C, s_b, s_c, s_h, s_w, qk_scale,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    line = tl.program_id(0)
    b = tl.program_id(1) // heads
    D = C // heads
    c0 = (tl.program_id(1) % heads) * D
    in_off = b * s_b + c0 * s_c
    out_off = b * C * H * W + c0 * H * W  # outputs are contiguous B x C x h x w
    if line < n_rows:  # a row: w tokens
        _line_fwd(rows, out_rows, in_off + line * s_h, s_w, out_off + line * W, 1, W, D, s_c, C * s_c, H * W,
                  qk_scale, BLOCK_T, BLOCK_D, PRECISION)
    else:  # a column: h tokens
        col = line - n_rows
        _line_fwd(cols, out_cols, in_off + col * s_w, s_h, out_off + col, W, H, D, s_c, C * s_c, H * W,
                  qk_scale, BLOCK_T, BLOCK_D, PRECISION)


@autotune(_CONFIGS, _INTERPRET_CONFIG, key=["H", "W", "C"])
@triton.jit
def _axial_bwd_kernel(
    rows, cols, drows_out, dcols_out, drows, dcols, n_rows, heads, H, W, C, s_b, s_c, s_h, s_w, qk_scale, scale,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    line = tl.program_id(0)
    b = tl.program_id(1) // heads
    D = C // heads
    c0 = (tl.program_id(1) % heads) * D
    in_off = b * s_b + c0 * s_c
    g_off = b * C * H * W + c0 * H * W  # incoming gradients: contiguous B x C x h x w
    dq_off = b * 3 * C * H * W + c0 * H * W  # packed gradients: contiguous B x 3C x h x w
    if line < n_rows:
        _line_bwd(rows, drows_out, drows, in_off + line * s_h, s_w, g_off + line * W, dq_off + line * W, 1, W, D,
                  s_c, C * s_c, H * W, C * H * W, qk_scale, scale, BLOCK_T, BLOCK_D, PRECISION)
    else:
        col = line - n_rows
        _line_bwd(cols, dcols_out, dcols, in_off + col * s_w, s_h, g_off + col, dq_off + col, W, H, D,
                  s_c, C * s_c, H * W, C * H * W, qk_scale, scale, BLOCK_T, BLOCK_D, PRECISION)


def _launch_meta(qkv: Tensor, heads: int) -> tuple[dict, int]:
    """Compile-time block sizes (a whole line and a whole head per program) and the head dim."""
    _, c3, h, w = qkv.shape
    d = c3 // 3 // heads
    return dict(BLOCK_T=block(max(h, w)), BLOCK_D=block(d), PRECISION=dot_precision(qkv.dtype)), d


class _AxialAttention(torch.autograd.Function):
    """Rows and/or columns attention of packed ``B x 3C x h x w`` q/k/v maps (either may be None)."""

    @staticmethod
    def forward(ctx, rows: Tensor | None, cols: Tensor | None, heads: int) -> tuple[Tensor | None, Tensor | None]:
        if rows is not None and cols is not None:
            if rows.shape != cols.shape or rows.dtype != cols.dtype:
                raise ValueError(f"rows and cols maps differ: {tuple(rows.shape)} {rows.dtype} vs "
                                 f"{tuple(cols.shape)} {cols.dtype}")
            if rows.stride() != cols.stride():
                rows, cols = rows.contiguous(), cols.contiguous()  # the kernel shares one set of strides
        ref = rows if rows is not None else cols
        b, c3, h, w = ref.shape
        c = c3 // 3
        meta, d = _launch_meta(ref, heads)
        out_rows = ref.new_empty(b, c, h, w) if rows is not None else None
        out_cols = ref.new_empty(b, c, h, w) if cols is not None else None
        n_rows = h if rows is not None else 0
        lines = n_rows + (w if cols is not None else 0)
        _axial_fwd_kernel[(lines, b * heads)](
            _or(rows, ref), _or(cols, ref), _or(out_rows, out_cols), _or(out_cols, out_rows), n_rows, heads,
            h, w, c, *ref.stride(), LOG2E / math.sqrt(d), **meta,
        )
        ctx.save_for_backward(rows, cols)
        ctx.heads = heads
        return out_rows, out_cols

    @staticmethod
    def backward(ctx, grad_rows: Tensor | None, grad_cols: Tensor | None):
        rows, cols = ctx.saved_tensors
        ref = rows if rows is not None else cols
        b, c3, h, w = ref.shape
        meta, d = _launch_meta(ref, ctx.heads)
        # An output that did not reach the loss gets a None (or no) gradient: treat it as zeros.
        grads = [None if t is None else (g if g is not None else torch.zeros_like(t[:, : c3 // 3])).contiguous()
                 for t, g in ((rows, grad_rows), (cols, grad_cols))]
        d_rows = torch.empty(b, c3, h, w, dtype=ref.dtype, device=ref.device) if rows is not None else None
        d_cols = torch.empty(b, c3, h, w, dtype=ref.dtype, device=ref.device) if cols is not None else None
        n_rows = h if rows is not None else 0
        lines = n_rows + (w if cols is not None else 0)
        _axial_bwd_kernel[(lines, b * ctx.heads)](
            _or(rows, ref), _or(cols, ref), _or(grads[0], grads[1]), _or(grads[1], grads[0]),
            _or(d_rows, d_cols), _or(d_cols, d_rows), n_rows, ctx.heads, h, w, c3 // 3, *ref.stride(),
            LOG2E / math.sqrt(d), 1.0 / math.sqrt(d), **meta,
        )
        return d_rows, d_cols, None


def _or(tensor: Tensor | None, fallback: Tensor) -> Tensor:
    """A placeholder pointer for the absent axis (its programs are never launched)."""
    return fallback if tensor is None else tensor


def axial_attention(rows: Tensor | None, cols: Tensor | None, heads: int) -> tuple[Tensor | None, Tensor | None]:
    """Multi-head attention along rows of ``rows`` and columns of ``cols`` in one launch.

    Args:
        rows, cols: packed ``B x 3C x h x w`` maps (q, k, v stacked on channels, as a 1x1
            convolution to ``3C`` produces them; any strides), or ``None`` to skip that axis.
        heads: heads splitting ``C``.

    Returns:
        the ``B x C x h x w`` outputs (``None`` for a skipped axis).
    """
    return _AxialAttention.apply(rows, cols, heads)
