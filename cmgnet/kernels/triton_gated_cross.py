"""CMFM image -> text cross-attention with the gate and blend fused into the epilogue.

Every pixel is a query over the ``L <= 128`` text tokens (CMG-Net paper eqs. 4-6, docs/design.md section 2.3)::

    A     = sum_h softmax(q_h K_h^T / sqrt(d), text mask) V_h W_o[:, h]^T + b_o      (B x N x C)
    alpha = sigmoid(A w_a + norm(F_I) w_i + pool(T') w_p + b_g)                          (B x N)
    F     = alpha * F_I + (1 - alpha) * A

The out-projection is linear, so it is folded into the values per head on the host
(``V'_h = V_h W_o[:, h]^T``, ``heads x L x C`` per sample, tiny): one program then produces a
``BLOCK_N x BLOCK_C`` tile of ``A`` as ``sum_h P_h V'_h[:, tile]`` with every head's text keys
and folded values on chip, and the gate's ``A w_a`` term becomes ``sum_h P_h (V'_h w_a)``,
known before any channel of ``A`` is. The ``B x N x C`` attention output, the ``2C + D``-wide
concatenation the gate reads and the separate sigmoid/blend passes of the PyTorch path never
touch memory. The image stream is read through its strides, so the ``B x C x h x w`` map's
``flatten(2).transpose(1, 2)`` token view costs no copy.

Backward (FlashAttention-2 style, probabilities recomputed from q and K):

* the gate's row reductions are three memory-bound PyTorch ops on saved ``A`` and ``alpha``;
* ``dq`` and ``dK`` (and ``d(V' w_a)``): one program per (sample, head, slice of pixels)
  accumulates ``dP_h = ((1 - alpha) dF) V'_h^T + dz (V'_h w_a)^T`` over channel tiles; each
  slice writes its partial ``dK`` and the slices are summed (the split-KV reduction of
  flash-decoding, so the result is deterministic: no atomics);
* ``dV'_h = P_h^T ((1 - alpha) dF)``: one program per (sample, head, channel tile, slice).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from .triton_common import (
    LOG2E, autotune, block, dot_precision, empty_heads_last, num_splits, softmax_grad, softmax_rows,
)

_INTERPRET_CONFIG = triton.Config({"BLOCK_N": 32, "BLOCK_C": 32}, num_warps=4)
_FWD_CONFIGS = [
    triton.Config({"BLOCK_N": n, "BLOCK_C": c}, num_warps=w, num_stages=2)
    for n in (32, 64, 128) for c in (64, 128) for w in (4, 8)
]
_BWD_CONFIGS = [
    triton.Config({"BLOCK_N": n, "BLOCK_C": c}, num_warps=w, num_stages=2)
    for n in (32, 64) for c in (64, 128) for w in (4, 8)
]
_KEY = ["N", "C", "L", "D"]


@triton.jit
def _head_probs(q_ptr, s_qn, s_qd, k, keep, n, n_ok, d, d_ok, qk_scale, PRECISION: tl.constexpr):
    """Load one head's ``BLOCK_N`` queries and return (softmax over the text keys, the queries)."""
    q = tl.load(q_ptr + n[:, None] * s_qn + d[None, :] * s_qd, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
    return softmax_rows(tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale, keep), q


@triton.jit
def _text_tile(ptr, s_l, s_d, l, l_ok, d, d_ok):
    """A ``BLOCK_L x BLOCK_*`` tile of text-side values (keys, folded values)."""
    return tl.load(ptr + l[:, None] * s_l + d[None, :] * s_d, mask=l_ok[:, None] & d_ok[None, :], other=0.0)


@autotune(_FWD_CONFIGS, _INTERPRET_CONFIG, key=_KEY)
@triton.jit
def _fwd_kernel(
    x, z0, q, k, vf, u, bias, keep_ptr, out, a_out, alpha_out,
    N, C, L, D, heads,
    s_xb, s_xn, s_xc, s_qb, s_qh, s_qn, s_qd, s_kb, s_kh, s_kl, s_kd, s_ob, s_on, s_oc,
    qk_scale,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
    STORE_A: tl.constexpr, PRECISION: tl.constexpr,
):
    b = tl.program_id(2)
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    l = tl.arange(0, BLOCK_L)
    d = tl.arange(0, BLOCK_D)
    n_ok, c_ok, l_ok, d_ok = n < N, c < C, l < L, d < D
    keep = tl.load(keep_ptr + b * L + l, mask=l_ok, other=0) != 0

    z = tl.load(z0 + b * N + n, mask=n_ok, other=0.0).to(tl.float32)
    acc = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
    for h in range(heads):
        kh = _text_tile(k + b * s_kb + h * s_kh, s_kl, s_kd, l, l_ok, d, d_ok)
        p, _ = _head_probs(q + b * s_qb + h * s_qh, s_qn, s_qd, kh, keep, n, n_ok, d, d_ok, qk_scale, PRECISION)
        bh = b * heads + h
        z += tl.sum(p * tl.load(u + bh * L + l, mask=l_ok, other=0.0).to(tl.float32)[None, :], 1)
        vh = _text_tile(vf + bh * L * C, C, 1, l, l_ok, c, c_ok)
        acc += tl.dot(p.to(vh.dtype), vh, input_precision=PRECISION)
    acc += tl.load(bias + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]

    alpha = tl.sigmoid(z)
    tile = n_ok[:, None] & c_ok[None, :]
    xt = tl.load(x + b * s_xb + n[:, None] * s_xn + c[None, :] * s_xc, mask=tile, other=0.0).to(tl.float32)
    blend = alpha[:, None] * xt + (1.0 - alpha[:, None]) * acc
    dst = b * s_ob + n[:, None] * s_on + c[None, :] * s_oc
    tl.store(out + dst, blend.to(out.dtype.element_ty), mask=tile)
    if STORE_A:  # saved for the gate's backward
        tl.store(a_out + dst, acc.to(a_out.dtype.element_ty), mask=tile)
        if tl.program_id(1) == 0:
            tl.store(alpha_out + b * N + n, alpha, mask=n_ok)


@autotune(_BWD_CONFIGS, _INTERPRET_CONFIG, key=_KEY)
@triton.jit
def _bwd_q_kernel(
    grad, alpha_ptr, dz_ptr, q, k, vf, u, keep_ptr, dq, dk_part, du_part,
    N, C, L, D, heads, split_len,
    s_gb, s_gn, s_gc, s_qb, s_qh, s_qn, s_qd, s_kb, s_kh, s_kl, s_kd, s_db, s_dh, s_dn, s_dd,
    qk_scale, scale,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // heads
    h = bh % heads
    l = tl.arange(0, BLOCK_L)
    d = tl.arange(0, BLOCK_D)
    l_ok, d_ok = l < L, d < D
    keep = tl.load(keep_ptr + b * L + l, mask=l_ok, other=0) != 0
    kh = _text_tile(k + b * s_kb + h * s_kh, s_kl, s_kd, l, l_ok, d, d_ok)
    uh = tl.load(u + bh * L + l, mask=l_ok, other=0.0).to(tl.float32)

    dk = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32)
    du = tl.zeros((BLOCK_L,), dtype=tl.float32)
    start = split * split_len
    end = tl.minimum(start + split_len, N)
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_ok = n < end
        p, qh = _head_probs(q + b * s_qb + h * s_qh, s_qn, s_qd, kh, keep, n, n_ok, d, d_ok, qk_scale, PRECISION)
        beta = 1.0 - tl.load(alpha_ptr + b * N + n, mask=n_ok, other=1.0)
        dz = tl.load(dz_ptr + b * N + n, mask=n_ok, other=0.0)
        # dP = dA V'^T with dA = (1 - alpha) dF, plus the gate's path through A w_a = P (V' w_a).
        dp = dz[:, None] * uh[None, :]
        for c0 in range(0, C, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            c_ok = c < C
            g = tl.load(grad + b * s_gb + n[:, None] * s_gn + c[None, :] * s_gc,
                        mask=n_ok[:, None] & c_ok[None, :], other=0.0)
            vh = _text_tile(vf + bh * L * C, C, 1, l, l_ok, c, c_ok)
            da = (g.to(tl.float32) * beta[:, None]).to(vh.dtype)
            dp += tl.dot(da, tl.trans(vh), input_precision=PRECISION)
        # Rows past ``end`` have dz = dA = 0, hence ds = 0: they add nothing below.
        ds = softmax_grad(p, dp)
        dqh = tl.dot(ds.to(kh.dtype), kh, input_precision=PRECISION) * scale
        tl.store(dq + b * s_db + h * s_dh + n[:, None] * s_dn + d[None, :] * s_dd, dqh.to(dq.dtype.element_ty),
                 mask=n_ok[:, None] & d_ok[None, :])
        dk += tl.dot(tl.trans(ds).to(qh.dtype), qh, input_precision=PRECISION)
        du += tl.sum(p * dz[:, None], 0)
    part = bh * tl.num_programs(1) + split
    tl.store(dk_part + (part * BLOCK_L + l[:, None]) * BLOCK_D + d[None, :], dk * scale)
    tl.store(du_part + part * BLOCK_L + l, du)


@autotune(_BWD_CONFIGS, _INTERPRET_CONFIG, key=_KEY)
@triton.jit
def _bwd_v_kernel(
    grad, alpha_ptr, q, k, keep_ptr, dv_part,
    N, C, L, D, heads, split_len,
    s_gb, s_gn, s_gc, s_qb, s_qh, s_qn, s_qd, s_kb, s_kh, s_kl, s_kd,
    qk_scale,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    bh = tl.program_id(0)
    split = tl.program_id(2)
    b = bh // heads
    h = bh % heads
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    l = tl.arange(0, BLOCK_L)
    d = tl.arange(0, BLOCK_D)
    c_ok, l_ok, d_ok = c < C, l < L, d < D
    keep = tl.load(keep_ptr + b * L + l, mask=l_ok, other=0) != 0
    kh = _text_tile(k + b * s_kb + h * s_kh, s_kl, s_kd, l, l_ok, d, d_ok)

    acc = tl.zeros((BLOCK_L, BLOCK_C), dtype=tl.float32)
    start = split * split_len
    end = tl.minimum(start + split_len, N)
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_ok = n < end
        p, _ = _head_probs(q + b * s_qb + h * s_qh, s_qn, s_qd, kh, keep, n, n_ok, d, d_ok, qk_scale, PRECISION)
        beta = 1.0 - tl.load(alpha_ptr + b * N + n, mask=n_ok, other=1.0)
        g = tl.load(grad + b * s_gb + n[:, None] * s_gn + c[None, :] * s_gc,
                    mask=n_ok[:, None] & c_ok[None, :], other=0.0)
        da = (g.to(tl.float32) * beta[:, None]).to(g.dtype)
        acc += tl.dot(tl.trans(p).to(g.dtype), da, input_precision=PRECISION)
    part = split * tl.num_programs(0) + bh
    tl.store(dv_part + (part * BLOCK_L + l[:, None]) * C + c[None, :], acc, mask=c_ok[None, :])


def _meta(q: Tensor, k: Tensor) -> dict:
    return dict(BLOCK_L=block(k.shape[2]), BLOCK_D=block(q.shape[3]), PRECISION=dot_precision(q.dtype))


class _GatedCrossAttention(torch.autograd.Function):
    """``F = alpha * x + (1 - alpha) * A`` with ``A`` and ``alpha`` as in the module docstring."""

    @staticmethod
    def forward(ctx, x: Tensor, z0: Tensor, q: Tensor, k: Tensor, v_fold: Tensor, u: Tensor, bias: Tensor,
                keep: Tensor) -> Tensor:
        b, heads, n, d = q.shape
        c, l = x.shape[-1], k.shape[2]
        z0, u, v_fold = z0.contiguous(), u.contiguous(), v_fold.contiguous()
        out = torch.empty(b, n, c, dtype=torch.promote_types(x.dtype, v_fold.dtype), device=x.device)
        store = any(ctx.needs_input_grad)
        a = torch.empty_like(out) if store else out
        alpha = torch.empty(b, n, dtype=torch.float32, device=x.device) if store else z0
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(c, meta["BLOCK_C"]), b)  # noqa: E731
        _fwd_kernel[grid](
            x, z0, q, k, v_fold, u, bias, keep, out, a, alpha, n, c, l, d, heads,
            *x.stride(), *q.stride(), *k.stride(), *out.stride(), LOG2E / math.sqrt(d),
            STORE_A=store, **_meta(q, k),
        )
        if store:
            ctx.save_for_backward(x, q, k, v_fold, u, keep, a, alpha)
            ctx.z0_dtype, ctx.bias_dtype = z0.dtype, bias.dtype
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, q, k, v_fold, u, keep, a, alpha = ctx.saved_tensors
        b, heads, n, d = q.shape
        c, l = x.shape[-1], k.shape[2]
        meta = _meta(q, k)
        # Gate: dF/dalpha = x - A; dalpha/dz = alpha (1 - alpha). Row reductions in fp32.
        dz = ((x - a) * grad).sum(-1, dtype=torch.float32) * alpha * (1.0 - alpha)
        beta = (1.0 - alpha).unsqueeze(-1)
        dx = (alpha.unsqueeze(-1) * grad).to(x.dtype)
        dbias = (beta * grad).sum((0, 1), dtype=torch.float32)

        dq = empty_heads_last(b, heads, n, d, q)
        splits = num_splits(n, b * heads, q.device)
        split_len = triton.cdiv(n, splits)
        dk_part = torch.empty(b * heads, splits, meta["BLOCK_L"], meta["BLOCK_D"], dtype=torch.float32, device=q.device)
        du_part = torch.empty(b * heads, splits, meta["BLOCK_L"], dtype=torch.float32, device=q.device)
        qk_scale, scale = LOG2E / math.sqrt(d), 1.0 / math.sqrt(d)
        _bwd_q_kernel[(b * heads, splits)](
            grad, alpha, dz, q, k, v_fold, u, keep, dq, dk_part, du_part, n, c, l, d, heads, split_len,
            *grad.stride(), *q.stride(), *k.stride(), *dq.stride(), qk_scale, scale, **meta,
        )
        dv_part = torch.empty(splits, b * heads, meta["BLOCK_L"], c, dtype=torch.float32, device=q.device)
        grid = lambda m: (b * heads, triton.cdiv(c, m["BLOCK_C"]), splits)  # noqa: E731
        _bwd_v_kernel[grid](
            grad, alpha, q, k, keep, dv_part, n, c, l, d, heads, split_len,
            *grad.stride(), *q.stride(), *k.stride(), qk_scale, **meta,
        )
        dk = dk_part.sum(1)[:, :l, :d].reshape(b, heads, l, d).to(k.dtype)
        du = du_part.sum(1)[:, :l].reshape(b, heads, l).to(u.dtype)
        dv = dv_part.sum(0)[:, :l].reshape(b, heads, l, c).to(v_fold.dtype)
        return dx, dz.to(ctx.z0_dtype), dq, dk, dv, du, dbias.to(ctx.bias_dtype), None


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
) -> Tensor:
    """The fused CMFM image -> text attention, gate and blend (arguments as in ``reference``)."""
    b, heads, n, d = q.shape
    c = image.shape[-1]
    v_fold = torch.einsum("bhld,chd->bhlc", v, out_weight.view(c, heads, d))
    if gate_weight is None:  # the fixed gate: alpha = 0.5 = sigmoid(0)
        z0 = image.new_zeros(b, n, dtype=torch.float32)
        u = v_fold.new_zeros(v_fold.shape[:3])
    else:
        w_a, w_i, w_p = gate_weight[0].split([c, c, gate_weight.shape[1] - 2 * c])
        u = v_fold @ w_a.to(v_fold.dtype)
        z0 = image_normed @ w_i.to(image_normed.dtype) + (text_pooled @ w_p + gate_bias + out_bias @ w_a).unsqueeze(1)
    keep = key_padding_mask if key_padding_mask is not None else q.new_ones(b, k.shape[2], dtype=torch.bool)
    keep = keep.to(torch.int8).contiguous()
    return _GatedCrossAttention.apply(image, z0, q, k.to(q.dtype), v_fold, u, out_bias, keep)
