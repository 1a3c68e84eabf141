"""Few queries over many keys: CMFM's text -> image attention, split over the keys.

``T' = softmax(Q_T K_I^T / sqrt d) V_I`` has ``L ~ 32`` text queries per head and ``N`` up to
``128 x 128`` image keys: one program per (sample, head) would leave most of the GPU idle, and
a generic flash kernel tiles over the (few) queries. This is flash-decoding (Dao et al., 2023,
"Flash-Decoding for long-context inference"): the keys are cut into slices, one program per
(sample, head, slice) keeps all queries on chip and runs FlashAttention-2's online softmax
over its slice, and a second small kernel merges the slices' partial outputs by their
log-sum-exp. The same kernel serves text self-attention (``L`` queries over ``L`` keys), with
an optional key padding mask.

Backward: the same split; each program recomputes the probabilities from the saved
log-sum-exp, writes dK and dV for its keys directly (it owns them) and a partial dQ that the
slices' sum completes (deterministic, no atomics).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from .triton_common import LOG2E, autotune, block, dot_precision, empty_heads_last, num_splits

MAX_QUERIES = 128  # all queries of a head live in one tile
_CONFIGS = [
    triton.Config({"BLOCK_N": n}, num_warps=w, num_stages=s) for n in (32, 64, 128) for w in (4, 8) for s in (2, 3)
]
_INTERPRET_CONFIG = triton.Config({"BLOCK_N": 32}, num_warps=4)
_KEY = ["M", "N", "D"]


@triton.jit
def _tile(ptr, s_r, s_d, r, r_ok, d, d_ok):
    return tl.load(ptr + r[:, None] * s_r + d[None, :] * s_d, mask=r_ok[:, None] & d_ok[None, :], other=0.0)


@triton.jit
def _keys_ok(keep_ptr, b, n, n_ok, N, HAS_MASK: tl.constexpr):
    if HAS_MASK:
        n_ok = n_ok & (tl.load(keep_ptr + b * N + n, mask=n_ok, other=0) != 0)
    return n_ok


@autotune(_CONFIGS, _INTERPRET_CONFIG, key=_KEY)
@triton.jit
def _fwd_kernel(
    q, k, v, keep_ptr, o_part, lse_part, M, N, D, heads, split_len,
    s_qb, s_qh, s_qm, s_qd, s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd, qk_scale,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_MASK: tl.constexpr, PRECISION: tl.constexpr,
):
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // heads
    h = bh % heads
    m = tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    m_ok, d_ok = m < M, d < D
    qt = _tile(q + b * s_qb + h * s_qh, s_qm, s_qd, m, m_ok, d, d_ok)

    row_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    start = split * split_len
    end = tl.minimum(start + split_len, N)
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_ok = _keys_ok(keep_ptr, b, n, n < end, N, HAS_MASK)
        kt = _tile(k + b * s_kb + h * s_kh, s_kn, s_kd, n, n_ok, d, d_ok)
        vt = _tile(v + b * s_vb + h * s_vh, s_vn, s_vd, n, n_ok, d, d_ok)
        s = tl.dot(qt, tl.trans(kt), input_precision=PRECISION) * qk_scale
        s = tl.where(n_ok[None, :], s, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(s, 1))
        # A block with every key masked leaves the max at -inf; shift by 0 then (no inf - inf).
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        p = tl.exp2(s - shift[:, None])
        rescale = tl.exp2(row_max - shift)
        row_sum = row_sum * rescale + tl.sum(p, 1)
        acc = acc * rescale[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=PRECISION)
        row_max = new_max
    part = bh * tl.num_programs(1) + split
    # An empty (or fully masked) slice gets lse = -inf: the merge gives it weight 0.
    empty = row_sum == 0.0
    row_sum = tl.where(empty, 1.0, row_sum)
    tl.store(o_part + (part * BLOCK_M + m[:, None]) * BLOCK_D + d[None, :], acc / row_sum[:, None])
    tl.store(lse_part + part * BLOCK_M + m, tl.where(empty, float("-inf"), row_max + tl.log2(row_sum)))


@triton.jit
def _merge_kernel(
    o_part, lse_part, out, lse_out, splits, M, D, heads, s_ob, s_oh, s_om, s_od,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    bh = tl.program_id(0)
    m = tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    top = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    for s in range(splits):
        top = tl.maximum(top, tl.load(lse_part + (bh * splits + s) * BLOCK_M + m))
    weight_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for s in range(splits):
        part = bh * splits + s
        weight = tl.exp2(tl.load(lse_part + part * BLOCK_M + m) - top)
        weight_sum += weight
        acc += weight[:, None] * tl.load(o_part + (part * BLOCK_M + m[:, None]) * BLOCK_D + d[None, :])
    b = bh // heads
    h = bh % heads
    ok = (m[:, None] < M) & (d[None, :] < D)
    tl.store(out + b * s_ob + h * s_oh + m[:, None] * s_om + d[None, :] * s_od,
             (acc / weight_sum[:, None]).to(out.dtype.element_ty), mask=ok)
    tl.store(lse_out + bh * BLOCK_M + m, top + tl.log2(weight_sum))


@autotune(_CONFIGS, _INTERPRET_CONFIG, key=_KEY)
@triton.jit
def _bwd_kernel(
    q, k, v, keep_ptr, do, lse, delta, dq_part, dk, dv, M, N, D, heads, split_len,
    s_qb, s_qh, s_qm, s_qd, s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd, s_gb, s_gh, s_gm, s_gd,
    s_dkb, s_dkh, s_dkn, s_dkd, qk_scale, scale,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_MASK: tl.constexpr, PRECISION: tl.constexpr,
):
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // heads
    h = bh % heads
    m = tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    m_ok, d_ok = m < M, d < D
    qt = _tile(q + b * s_qb + h * s_qh, s_qm, s_qd, m, m_ok, d, d_ok)
    dot_ = _tile(do + b * s_gb + h * s_gh, s_gm, s_gd, m, m_ok, d, d_ok)
    row_lse = tl.load(lse + bh * BLOCK_M + m)
    row_delta = tl.load(delta + bh * BLOCK_M + m)  # rowsum(dO * O); 0 on padded query rows

    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    start = split * split_len
    end = tl.minimum(start + split_len, N)
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_ok = _keys_ok(keep_ptr, b, n, n < end, N, HAS_MASK)
        kt = _tile(k + b * s_kb + h * s_kh, s_kn, s_kd, n, n_ok, d, d_ok)
        vt = _tile(v + b * s_vb + h * s_vh, s_vn, s_vd, n, n_ok, d, d_ok)
        s = tl.dot(qt, tl.trans(kt), input_precision=PRECISION) * qk_scale
        p = tl.where(m_ok[:, None] & n_ok[None, :], tl.exp2(s - row_lse[:, None]), 0.0)
        dvt = tl.dot(tl.trans(p).to(dot_.dtype), dot_, input_precision=PRECISION)
        ds = p * (tl.dot(dot_, tl.trans(vt), input_precision=PRECISION) - row_delta[:, None])
        dkt = tl.dot(tl.trans(ds).to(qt.dtype), qt, input_precision=PRECISION) * scale
        dq += tl.dot(ds.to(kt.dtype), kt, input_precision=PRECISION)
        # dK and dV share one layout (both made by ``empty_heads_last``).
        dst = b * s_dkb + h * s_dkh + n[:, None] * s_dkn + d[None, :] * s_dkd
        ok = (n[:, None] < end) & d_ok[None, :]
        tl.store(dk + dst, dkt.to(dk.dtype.element_ty), mask=ok)
        tl.store(dv + dst, dvt.to(dv.dtype.element_ty), mask=ok)
    part = bh * tl.num_programs(1) + split
    tl.store(dq_part + (part * BLOCK_M + m[:, None]) * BLOCK_D + d[None, :], dq * scale)


def _meta(q: Tensor, has_mask: bool) -> dict:
    return dict(BLOCK_M=block(q.shape[2]), BLOCK_D=block(q.shape[3]), HAS_MASK=has_mask,
                PRECISION=dot_precision(q.dtype))


class _DecodeAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, keep: Tensor | None) -> Tensor:
        b, heads, m, d = q.shape
        n = k.shape[2]
        meta = _meta(q, keep is not None)
        splits = num_splits(n, b * heads, q.device)
        split_len = triton.cdiv(n, splits)
        o_part = torch.empty(b * heads, splits, meta["BLOCK_M"], meta["BLOCK_D"], dtype=torch.float32, device=q.device)
        lse_part = torch.empty(b * heads, splits, meta["BLOCK_M"], dtype=torch.float32, device=q.device)
        qk_scale = LOG2E / math.sqrt(d)
        _fwd_kernel[(b * heads, splits)](
            q, k, v, q if keep is None else keep, o_part, lse_part, m, n, d, heads, split_len,
            *q.stride(), *k.stride(), *v.stride(), qk_scale, **meta,
        )
        out = empty_heads_last(b, heads, m, d, q, dtype=torch.promote_types(q.dtype, v.dtype))
        lse = torch.empty(b * heads, meta["BLOCK_M"], dtype=torch.float32, device=q.device)
        _merge_kernel[(b * heads,)](o_part, lse_part, out, lse, splits, m, d, heads, *out.stride(),
                                    BLOCK_M=meta["BLOCK_M"], BLOCK_D=meta["BLOCK_D"])
        ctx.save_for_backward(q, k, v, keep, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        q, k, v, keep, out, lse = ctx.saved_tensors
        b, heads, m, d = q.shape
        n = k.shape[2]
        meta = _meta(q, keep is not None)
        delta = torch.zeros(b * heads, meta["BLOCK_M"], dtype=torch.float32, device=q.device)
        delta[:, :m] = (grad * out).sum(-1, dtype=torch.float32).reshape(b * heads, m)
        splits = num_splits(n, b * heads, q.device)
        dq_part = torch.empty(b * heads, splits, meta["BLOCK_M"], meta["BLOCK_D"], dtype=torch.float32, device=q.device)
        dk = empty_heads_last(b, heads, n, d, k)
        dv = empty_heads_last(b, heads, n, d, v)
        _bwd_kernel[(b * heads, splits)](
            q, k, v, q if keep is None else keep, grad, lse, delta, dq_part, dk, dv, m, n, d, heads,
            triton.cdiv(n, splits), *q.stride(), *k.stride(), *v.stride(), *grad.stride(), *dk.stride(),
            LOG2E / math.sqrt(d), 1.0 / math.sqrt(d), **meta,
        )
        dq = dq_part.sum(1)[:, :m, :d].reshape(b, heads, m, d).to(q.dtype)
        return dq, dk, dv, None


def attention(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
    """Softmax attention of ``B x H x M x d`` queries (``M <= MAX_QUERIES``) over ``B x H x N x d`` keys.

    ``key_padding_mask``: ``B x N``, True for real keys; every query must keep one key.
    """
    keep = None if key_padding_mask is None else key_padding_mask.to(torch.int8).contiguous()
    return _DecodeAttention.apply(q, k.to(q.dtype), v.to(q.dtype), keep)
