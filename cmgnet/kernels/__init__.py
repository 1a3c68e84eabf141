"""Attention ops for CMG-Net behind one dispatch point.

Every attention in the model goes through the functions exported here. Each op has a
PyTorch reference (``reference.py``); ``dispatch.py`` picks the implementation per call:
the written-out reference math, PyTorch's fused ``scaled_dot_product_attention`` (SDPA), or
a Triton kernel where the benchmark-derived table (``dispatch_table.py``) says it wins.
The kernels (Triton, optional):

* ``triton_axial``: MASA's row and column attention in one launch, in place on
  ``B x C x h x w`` maps;
* ``triton_gated_cross``: CMFM's image -> text attention with the gate and blend fused;
* ``triton_decode``: few queries over many keys (text -> image), split over the keys.

Installed as ``cmgnet.kernels``.
"""

from .dispatch import (
    BACKENDS,
    HAS_TRITON,
    attention,
    axial_attention,
    channel_attention,
    gated_cross_attention,
    get_backend,
    multi_axis_attention,
    set_backend,
    shape_key,
    use_backend,
)

__all__ = [
    "BACKENDS",
    "HAS_TRITON",
    "attention",
    "axial_attention",
    "channel_attention",
    "gated_cross_attention",
    "get_backend",
    "multi_axis_attention",
    "set_backend",
    "shape_key",
    "use_backend",
]
