"""Helpers shared by the Triton kernels: interpreter detection, autotuning, block sizes, splits.

Imported only when a Triton kernel is about to run (``dispatch`` imports it lazily), so
``cmgnet.kernels`` works without Triton installed. Compatible with Triton 3.6 and later.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import torch
import triton
import triton.language as tl

try:  # Triton >= 3.4 reads its environment through ``knobs``
    INTERPRET: bool = bool(triton.knobs.runtime.interpret)
except AttributeError:  # pragma: no cover - older Triton
    INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")

# Smallest tile side ``tl.dot`` accepts on NVIDIA GPUs.
MIN_DOT = 16
# Kernels keep logits in log2 units so the softmax runs on ``exp2`` (FlashAttention-2's trick).
LOG2E = 1.4426950408889634


def autotune(configs: Sequence[triton.Config], interpret: triton.Config, key: list[str]) -> Callable:
    """``triton.autotune`` over ``configs`` on a GPU; the single ``interpret`` config under the interpreter.

    The interpreter would otherwise benchmark every config, each hundreds of times slower than
    a GPU launch; its single config uses blocks small enough that tests with tiny shapes still
    cover the multi-block loops and the masks.
    """
    return triton.autotune(configs=[interpret] if INTERPRET else list(configs), key=key)


def block(n: int) -> int:
    """Power-of-two tile side covering ``n`` (at least what ``tl.dot`` needs)."""
    return max(MIN_DOT, triton.next_power_of_2(n))


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` precision matching PyTorch's own fp32 matmul setting (TF32 only if allowed)."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"  # ignored for 16-bit inputs


def num_splits(items: int, programs: int, device: torch.device, min_items: int = 64) -> int:
    """How many slices to cut a reduction over ``items`` into (flash-decoding's split-KV).

    Enough slices that ``programs * splits`` fills every SM about four times, but none smaller
    than ``min_items`` so each slice amortises its prologue and the partial results stay small.
    """
    if device.type != "cuda":  # interpreter: two slices, so the tests cover the cross-slice reduction
        return max(1, min(2, triton.cdiv(items, MIN_DOT)))
    target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(target, programs), triton.cdiv(items, min_items)))


@triton.jit
def softmax_rows(scores, key_ok):
    """Row softmax of ``scores`` given in log2 units (``exp2`` is the fast path), masked keys -> 0.

    Every row must keep at least one key (the callers guarantee it or discard such rows).
    """
    scores = tl.where(key_ok[None, :], scores, float("-inf"))
    p = tl.exp2(scores - tl.max(scores, 1)[:, None])
    return p / tl.sum(p, 1)[:, None]


@triton.jit
def softmax_grad(p, dp):
    """Gradient w.r.t. the logits of a row softmax: ``P * (dP - rowsum(P * dP))``."""
    return p * (dp - tl.sum(p * dp, 1)[:, None])


def empty_heads_last(b: int, heads: int, n: int, d: int, like: torch.Tensor,
                     dtype: torch.dtype | None = None) -> torch.Tensor:
    """A ``B x heads x n x d`` tensor stored as ``B x n x heads x d``.

    That is the layout of the projections heads are split from (``B x n x heads*d``), so
    merging heads back, or the projection's backward, needs no copy.
    """
    return torch.empty(b, n, heads, d, dtype=dtype or like.dtype, device=like.device).transpose(1, 2)
